"""Smoke runs of every benchmark (--quick), so none rots; they check that each runs, not its timings."""

from __future__ import annotations

import subprocess

import pytest

from bench.coil import COIL
from conftest import ROOT, run_env

pytestmark = pytest.mark.slow


def quick(module: str, python: str, *args: str, timeout: int = 600) -> str:
    out = subprocess.run([python, "-m", module, "--quick", *args], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_ann_scale(python):
    assert '"n": 20000' in quick("bench.ann_scale", python)


def test_embedder_speed(python):
    assert "matmul_peak_gflops" in quick("bench.embedder_speed", python)


@pytest.mark.skipif(not (COIL / "labels.csv").exists(), reason="../shared/data/coil-100 is absent")
def test_evaluate_coil(python):
    assert "raw pixels" in quick("bench.evaluate_coil", python)


def test_serving(python):
    assert "saturation_rps_over_bare_embedder_batch1" in quick("bench.serving", python)


def test_builder_speed(python):
    assert "whole_build_images_per_s" in quick("bench.builder_speed", python)


def test_overhead(python):
    out = quick("bench.overhead", python, "--before", "", "--upload", "page")  # phone photos, downscaled as the page does
    assert '"served_over_bare"' in out and '"http_over_bare"' in out


def test_ab_serving(python):
    out = quick("bench.ab_serving", python, "--env", "IMAGESEARCH_EMBED_DEADLINE_S=2")
    assert '"before (HEAD)"' in out and '"this checkout IMAGESEARCH_EMBED_DEADLINE_S=2"' in out
    assert '"median_embedder_cpu_ms"' in out and '"median_p99_ms"' in out


def test_oversubscribe(python):
    out = quick("bench.oversubscribe", python)
    assert "| 2 threads, another worker busy on 1 |" in out and "| 1 thread, alone |" in out


def test_decode(python):
    out = quick("bench.decode", python)
    assert '"reduced_ms"' in out and '"page_ms"' in out
