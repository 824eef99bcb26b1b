"""The one settings object: a variable set to a value it cannot hold is named as it was set."""

from __future__ import annotations

import re
import subprocess

import pytest

from bench.server import ONE_SERVICE
from conftest import ROOT, run_env
from model_store.settings import Settings, SettingsError, get_settings


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


@pytest.mark.parametrize("command", [("bentoml", "serve", "service:ImageSearch"),
                                     (*ONE_SERVICE, "service:ImageSearch", "--service-name", "Embedder")],
                         ids=["bentoml serve", "a container's start-http-server"])
def test_a_server_with_a_wrong_setting_says_which_in_one_line(command, tmp_path):
    """The service reads the settings as it is imported: a wrong value printed BentoML's ~40-line traceback of
    the import, the one line that named the variable at its end."""
    run = subprocess.run([*command, "--port", "3199"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=run_env(IMAGESEARCH_MAX_K="ten", BENTOML_HOME=str(tmp_path)))
    said = (run.stdout + run.stderr).strip()
    assert run.returncode == 1 and "Traceback" not in said, said
    assert said.splitlines()[-1] == ("cannot start the service: IMAGESEARCH_MAX_K='ten': Input should be a valid "
                                     "integer, unable to parse string as an integer (README, Configuration)"), said


def test_every_setting_is_in_the_readmes_configuration_table():
    """A wrong value's error sends the operator to README, Configuration: every variable must be there, in full or
    after another in its row (`IMAGESEARCH_VOTE_NEIGHBOURS` / `_VOTE_TEMPERATURE`). Two had gone missing."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ", 1)[0] for line in section.splitlines() if line.startswith("| `IMAGESEARCH_")]
    named = {name for row in rows for name in re.findall(r"`(IMAGESEARCH_[A-Z0-9_]+|_[A-Z0-9_]+)`", row)}
    missing = [var for var in (f"IMAGESEARCH_{field.upper()}" for field in Settings.model_fields)
               if var not in named and not any(n.startswith("_") and var.endswith(n) for n in named)]
    assert rows and not missing, missing
