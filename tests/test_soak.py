"""The open-loop soak CLI (loadtests/soak.py): against a real `bentoml serve`, a dead port, and remote hosts."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.server import free_port
from loadtests import soak

from conftest import ROOT, run_env

RATE, SECONDS, WINDOW_S = 3, 10, 5


def run_soak(python: str, host: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m loadtests.soak` as a subprocess, its output captured."""
    cmd = [python, "-m", "loadtests.soak", "--host", host, "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_soak_of_a_healthy_server_passes_and_measures_its_process_tree(server, demo_catalogue, python, tmp_path):
    out = tmp_path / "soak.json"
    proc = run_soak(python, server.url, out, "--minutes", str(SECONDS / 60), "--rate", str(RATE),
                    "--window-s", str(WINDOW_S), "--warmup-s", "2", "--photos", str(demo_catalogue.parent / "photos"))
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-2].startswith("PASS: no failed request")
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["error_samples"] == [] and r["warmup"] == {"requests": 2 * RATE, "errors": 0}
    assert r["requests"] == r["ok"] == RATE * SECONDS
    assert {k: v["requests"] for k, v in r["by_endpoint"].items()} == {"/search": 25, "/estimate": 5}
    assert len(r["windows"]) == SECONDS // WINDOW_S
    for w in r["windows"]:
        lt = w["latency"]
        assert w["requests"] > 0 and w["errors"] == 0 and w["rss_bytes"] > 0
        assert 0 < lt["p50_ms"] <= lt["p95_ms"] <= lt["p99_ms"] <= lt["max_ms"] < 30_000
    m = r["memory"]
    assert m["root_pid"] == server.proc.pid  # found by its port, climbed from the worker to `bentoml serve`
    for end in ("start", "end"):
        assert len([p for p in m[end]["processes"] if p["rss_bytes"] > 0]) >= 2
    assert m["growth_pct"] is not None and m["growth_pct"] <= r["max_rss_growth_pct"]
    assert len(m["samples"]) == 2 + len(r["windows"])  # before the warm-up, at the start, once per window
    table = [line for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\.\d\s+\d+\s", line)]
    assert len(table) == len(r["windows"]), proc.stdout


@pytest.mark.slow
def test_soak_of_a_dead_port_fails_with_every_request_counted(demo_catalogue, python, tmp_path):
    out = tmp_path / "dead.json"
    proc = run_soak(python, f"http://127.0.0.1:{free_port()}", out, "--minutes", "0.05", "--rate", str(RATE),
                    "--window-s", "1", "--timeout-s", "5", "--photos", str(demo_catalogue.parent / "photos"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["requests"] == 9 and r["ok"] == 0 and r["errors"] == {"ConnectError": 9}
    assert r["error_samples"] and r["error_samples"][0]["kind"] == "ConnectError"
    assert r["memory"]["root_pid"] is None and r["memory"]["growth_pct"] is None
    assert not r["passed"] and r["verdict"].startswith("FAIL: 9 request(s) failed")
    assert r["verdict"] in proc.stdout


def test_a_remote_host_is_refused_before_anything_is_sent(monkeypatch, tmp_path, demo_catalogue):
    def no_client(*a, **kw):
        raise AssertionError("an HTTP client was made for a refused host")

    monkeypatch.setattr(soak.httpx, "AsyncClient", no_client)
    out = tmp_path / "never.json"
    result = CliRunner().invoke(soak.app, ["--host", "http://10.1.2.3:3000", "--out", str(out), "--minutes", "0.01",
                                           "--photos", str(demo_catalogue.parent / "photos")])
    assert result.exit_code == 2, result.output
    assert "only loopback targets" in result.output and "10.1.2.3" in result.output
    assert not out.exists()


@pytest.mark.parametrize("host, port", [
    ("http://127.0.0.1:3000", 3000), ("http://127.8.9.10:8080/", 8080), ("http://localhost", 80),
    ("https://LOCALHOST:8443", 8443), ("http://[::1]:3000", 3000),
])
def test_loopback_hosts_are_accepted(host, port):
    assert soak.loopback_port(host) == port


@pytest.mark.parametrize("host", [
    "http://10.1.2.3:3000", "http://0.0.0.0:3000", "http://127.0.0.1.nip.io:3000", "http://127.0.0.1@10.1.2.3/",
    "http://[::ffff:10.1.2.3]:3000", "http://example.com", "ftp://127.0.0.1", "127.0.0.1:3000",
])
def test_other_hosts_are_refused(host):
    with pytest.raises(ValueError):
        soak.loopback_port(host)
