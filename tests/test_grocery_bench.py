"""Smoke run of the Grocery Store benchmark (--quick: Lite0, 8 classes); skipped without the data set."""

from __future__ import annotations

import subprocess

import pytest

from bench.grocery import GROCERY
from conftest import ROOT, run_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (GROCERY / "val.txt").exists(), reason="../shared/data/grocery-store is absent")]


def test_evaluate_grocery_quick(python):
    out = subprocess.run([python, "-m", "bench.evaluate_grocery", "--quick"], cwd=ROOT, env=run_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for text in ("base: GeM p=3, L2", "+ PCA-", "flip-avg", "learned", "ms", "top1=", "r@5=", "mAP=",
                 "| (a) top-1 | (a) recall@5 | (a) mAP | (b) top-1 | (b) recall@5 | (b) mAP |"):
        assert text in out.stdout, (text, out.stdout[-3000:])
