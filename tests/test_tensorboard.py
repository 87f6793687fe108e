"""The real TensorBoard dashboard over ``dsgd profile`` output.

``python -m dsgd profile`` captures two tiny configs (XLA on and off) for a made-up commit into a
temporary ``profiles/``; then ``tensorboard --logdir <it> --port <free> --host 127.0.0.1`` is
started, and its HTTP API (gzip-compressed answers) must list the ``<commit>/<config>`` runs in
the Profile plugin with their tools and the XLA run's HLO modules, and the per-run and
per-commit history runs in the Scalars plugin.  The server is stopped at the end.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "feedface0001"
TINY = [{"name": "dense/kernel", "shape": [32, 16]}, {"name": "dense/bias", "shape": [16]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_text(port: int, path: str, timeout: float = 60) -> tuple[str, str]:
    """GET an answer (the profile plugin gzips its answers), decompressed; and its encoding."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        encoding = r.headers.get("Content-Encoding")
    if encoding == "gzip" or body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    return body.decode(), encoding


def _get(port: int, path: str, timeout: float = 60):
    text, encoding = _get_text(port, path, timeout)
    return json.loads(text), encoding


def _tensorboard_cmd() -> list[str]:
    exe = shutil.which("tensorboard")
    if exe:
        return [exe]
    return [sys.executable, "-m", "tensorboard.main"]


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    wl = root / "tiny.json"
    wl.write_text(json.dumps(TINY))
    out = root / "profiles"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "dsgd", "profile", "--out", str(out), "--workload", str(wl), "--mesh", "1",
         "--xla", "both", "--steps", "1", "--time-steps", "2", "--commit", COMMIT],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 captured, 0 skipped, 0 failed" in proc.stdout, proc.stdout
    return out


@pytest.fixture(scope="module")
def server(profiles):
    port = _free_port()
    proc = subprocess.Popen(_tensorboard_cmd() + ["--logdir", str(profiles), "--port", str(port),
                                                  "--host", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                runs, _ = _get(port, "/data/plugin/profile/runs", timeout=10)
                if len(runs) >= 2:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("tensorboard did not list the profile runs within 120 s")
            time.sleep(1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


XLA_RUN = f"tiny_1dev_xla-on_auto/{COMMIT}"
PLAIN_RUN = f"tiny_1dev_xla-off_auto/{COMMIT}"


def test_profile_runs_are_config_slash_commit(server):
    runs, encoding = _get(server, "/data/plugin/profile/runs")
    assert encoding == "gzip"
    bases = {r.rsplit("/", 1)[0] for r in runs}  # "<config>/<commit>/<session>"
    assert bases == {XLA_RUN, PLAIN_RUN}, runs
    # the session picker shows about 28 characters: the runs differ within them
    assert len({r[:20] for r in runs}) == len(runs), runs


def test_tools_and_hlo_modules_of_a_run(server):
    runs, _ = _get(server, "/data/plugin/profile/runs")
    xla = [r for r in runs if r.startswith(XLA_RUN + "/")][0]
    q = urllib.parse.quote(xla, safe="")
    tools, _ = _get(server, f"/data/plugin/profile/run_tools?run={q}")
    assert {"trace_viewer@", "framework_op_stats", "overview_page", "memory_profile"} <= set(tools), tools
    assert "graph_viewer" in tools or "hlo_stats" in tools  # the trace carries HLO
    modules, _ = _get_text(server, f"/data/plugin/profile/module_list?run={q}")
    assert "dsgd_xla_step" in modules, modules[:500]
    stats, _ = _get(server, f"/data/plugin/profile/data?run={q}&tag=framework_op_stats&host=")
    table = stats[0] if isinstance(stats, list) else stats
    assert any("dsgd_xla_step" in json.dumps(row) for row in table["rows"])


def test_framework_op_stats_of_the_eager_run_are_not_only_idle(server):
    runs, _ = _get(server, "/data/plugin/profile/runs")
    plain = [r for r in runs if r.startswith(PLAIN_RUN + "/")][0]
    q = urllib.parse.quote(plain, safe="")
    stats, _ = _get(server, f"/data/plugin/profile/data?run={q}&tag=framework_op_stats&host=")
    table = stats[0] if isinstance(stats, list) else stats
    types = [row["c"][2]["v"] for row in table["rows"]]  # column 2: operation type
    assert [t for t in types if t != "IDLE"], types


def test_scalars_history(server):
    runs, _ = _get(server, "/data/runs")
    assert XLA_RUN in runs and PLAIN_RUN in runs
    hist = "history/tiny_1dev_xla-on_auto"
    assert hist in runs, runs
    tags, _ = _get(server, "/data/plugin/scalars/tags")
    assert "step_ms/median" in tags[hist] and "step_ms" in tags[XLA_RUN]
    q = urllib.parse.urlencode({"run": hist, "tag": "step_ms/median"})
    points, _ = _get(server, f"/data/plugin/scalars/scalars?{q}")
    assert len(points) == 1 and points[0][2] > 0  # [wall time, step (commit order), value]
