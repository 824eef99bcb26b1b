"""The one settings object: a variable set to a value it cannot hold is named as it was set."""

from __future__ import annotations

import pytest

from model_store.settings import SettingsError, get_settings


def test_a_wrong_value_names_the_variable_and_what_it_should_hold(monkeypatch):
    """pydantic's error named the field (max_k) under a traceback of its own."""
    monkeypatch.setenv("IMAGESEARCH_MAX_K", "ten")
    monkeypatch.setenv("IMAGESEARCH_STAGE", "prod")
    with pytest.raises(SettingsError) as raised:
        get_settings()
    said = str(raised.value)
    assert "IMAGESEARCH_MAX_K='ten': Input should be a valid integer" in said, said
    assert "IMAGESEARCH_STAGE='prod': Input should be 'staging' or 'production'" in said, said
    assert said.endswith("(README, Configuration)") and raised.value.__cause__ is None
