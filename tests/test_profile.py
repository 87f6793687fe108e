"""``dsgd profile``: a tiny real capture (worker processes, TensorFlow profiler, xprof summaries),
the ledger, ``--force``, bad configs reported and skipped, and the two-commit diff.

One module-scoped capture of a 3-variable workload: XLA on (mesh 1, the ``xla`` implementation),
XLA off (mesh ``batch=2,model=4``), and three bad configs — an unknown workload and a mesh too
large (both refused before any worker starts), and the reference with ``--xla on``, which runs
but executes no XLA (tf_keras and DTensor ignore ``jit_compile`` on CPU) and so must fail loudly.
"""
from __future__ import annotations

import glob
import json
import os
import sys

import pytest

from dsgd.harness import profile as prof
from dsgd.harness import profile_ledger
from dsgd.harness import profile_summary as ps
from dsgd.harness.measure import Case

TINY = [{"name": "dense/kernel", "shape": [64, 32]}, {"name": "dense/bias", "shape": [32]},
        {"name": "proj/kernel", "shape": [16, 16]}]
COMMIT = "c0ffee000001"


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    wl = str(root / "tiny.json")
    with open(wl, "w") as f:
        json.dump(TINY, f)
    out = str(root / "profiles")
    cases = [
        Case(workload=wl, mesh="1", implementation="auto", xla=True),
        Case(workload=wl, mesh="batch=2,model=4", implementation="auto", xla=False),
        Case(workload="no-such-workload", mesh="1"),
        Case(workload=wl, mesh="batch=16"),
        Case(workload=wl, mesh="1", implementation="reference", xla=True),
    ]
    lines = []
    rows = prof.capture(cases, out, commit=COMMIT, steps=2, time_steps=3, echo=lines.append, timeout=600)
    return {"out": out, "wl": wl, "cases": cases, "rows": rows, "lines": lines}


def _run_dir(captured, i):
    return os.path.join(captured["out"], prof.config_name(captured["cases"][i]), COMMIT)


def test_layout_on_disk(captured):
    xla_dir, plain_dir = _run_dir(captured, 0), _run_dir(captured, 1)
    assert os.path.relpath(xla_dir, captured["out"]) == os.path.join("tiny_1dev_xla-on_auto", COMMIT)
    for d in (xla_dir, plain_dir):
        assert glob.glob(os.path.join(d, "plugins", "profile", "*", "*.xplane.pb")), d
        assert glob.glob(os.path.join(d, "events.out.tfevents.*")), "per-run scalars"
        assert json.load(open(os.path.join(d, "summary.json")))["status"] == "ok"
    hlo = glob.glob(os.path.join(xla_dir, "hlo", "*.hlo.txt"))
    assert any("before_optimizations" in h for h in hlo) and any("after_optimizations" in h for h in hlo)
    assert glob.glob(os.path.join(xla_dir, "hlo", "xla_dump", "*before_optimizations.txt"))
    assert not glob.glob(os.path.join(plain_dir, "hlo", "*.hlo.txt"))
    hist = os.path.join(captured["out"], "history", prof.config_name(captured["cases"][0]))
    assert [f for f in os.listdir(hist) if f.endswith("." + COMMIT)], "history scalars"


def test_summary_fields(captured):
    xla, plain = captured["rows"][0], captured["rows"][1]
    for r in (xla, plain):
        assert r["status"] == "ok", r.get("error")
        assert r["median_ms"] > 0 and r["p10_ms"] <= r["p90_ms"] and r["first_step_s"] > 0
        assert r["ops_per_step"] > 0 and r["op_types"] >= 1 and r["top_ops"]
        assert {"type", "name", "self_us_per_step", "pct"} <= set(r["top_ops"][0])
        assert r["peak_rss_mib"] > 0
    assert xla["impl_used"] == "xla"
    assert xla["hlo_modules"] >= 1 and xla["fusions"] >= 1, "the XLA path ran HLO modules with fusions"
    assert xla["hlo_modules_dumped"] >= 1 and xla["hlo_files"] >= 2
    assert plain["hlo_modules"] == 0 and plain["impl_used"] != "xla"


def test_dashboards_have_data_on_cpu(captured):
    """xprof's framework op stats (and so the overview) count the eager kernel calls of the default
    (XLA off) run, not only idle time; the XLA run's HLO ops are tabulated from the host trace."""
    xla_dir, plain_dir = _run_dir(captured, 0), _run_dir(captured, 1)
    plain = captured["rows"][1]
    rows = [r for r in ps.xprof_table(ps.find_xplanes(plain_dir), "framework_op_stats") if r["type"] != "IDLE"]
    assert rows and all(r["occurrences"] > 0 for r in rows), rows
    if plain["impl_used"] == "grouped":  # the default: one custom-kernel call for every variable and device
        assert "DsgdMultiSgdAll" in {r["type"] for r in rows}
    assert ps.annotate_eager_ops(ps.find_xplanes(plain_dir)) == 0, "annotated once, at capture"
    overview = ps.xprof_json(ps.find_xplanes(plain_dir), "overview_page")
    tf_op_pct = float(overview[0]["p"]["host_tf_op_percent"].rstrip("%"))
    assert tf_op_pct > 0, overview[0]["p"]
    xla = captured["rows"][0]
    assert xla["top_hlo_ops"] and xla["hlo_ops_per_step"] > 0
    assert {"module", "hlo_op", "occurrences", "us_per_step", "pct"} <= set(xla["top_hlo_ops"][0])
    import pandas as pd

    table = pd.read_csv(os.path.join(xla_dir, "hlo_op_stats.csv"))
    assert len(table) >= 1 and (table["occurrences"] > 0).all() and table["module"].str.contains("dsgd_xla_step").all()
    assert not os.path.exists(os.path.join(plain_dir, "hlo_op_stats.csv"))


def test_bad_configs_reported_and_skipped(captured):
    rows, lines = captured["rows"], captured["lines"]
    unknown, too_big, ref_xla = rows[2], rows[3], rows[4]
    assert unknown["status"] == "failed" and "unknown workload" in unknown["error"]
    assert too_big["status"] == "failed" and "needs 16 devices" in too_big["error"]
    assert ref_xla["status"] == "failed" and "claims XLA" in ref_xla["error"], ref_xla.get("error")
    assert sum(line.startswith("FAILED") for line in lines) == 3
    assert sum(line.startswith("ok") for line in lines) == 2  # the rest went on


def test_ledger(captured):
    df = profile_ledger.read_ledger(os.path.join(captured["out"], "ledger.csv"))
    assert list(df.columns) == profile_ledger.LEDGER_COLUMNS
    # the two configs refused before a worker (unknown workload, mesh too large) are not history
    assert len(df) == 3 and set(df["commit"]) == {COMMIT}
    assert not df["config"].str.contains("no-such-workload|batch=16").any()
    ok = df[df["status"] == "ok"]
    assert len(ok) == 2 and (ok["median_ms"] > 0).all()
    assert set(ok["xla"]) == {"on", "off"}


def test_force_semantics(captured):
    out, case = captured["out"], captured["cases"][1]
    run = _run_dir(captured, 1)
    trace = glob.glob(os.path.join(run, "plugins", "profile", "*", "*.xplane.pb"))[0]
    mtime = os.path.getmtime(trace)
    rows = prof.capture([case], out, commit=COMMIT, steps=1, time_steps=2, echo=lambda s: None)
    assert rows[0]["status"] == "skipped" and "--force" in rows[0]["error"]
    assert os.path.getmtime(trace) == mtime and os.path.exists(trace)
    rows = prof.capture([case], out, commit=COMMIT, steps=1, time_steps=2, force=True, echo=lambda s: None)
    assert rows[0]["status"] == "ok", rows[0].get("error")
    assert not os.path.exists(trace), "--force replaced the run"
    df = profile_ledger.read_ledger(os.path.join(out, "ledger.csv"))
    mine = df[(df["commit"] == COMMIT) & (df["config"] == prof.config_name(case))]
    assert len(mine) == 1 and int(mine["steps"].iloc[0]) == 1, "the ledger row was replaced, not duplicated"


def _synthetic_ledger(path):
    rows = []
    for commit, ms, fus in (("aaaa11112222", 10.0, 4), ("bbbb33334444", 5.0, 2)):
        for cfg in ("w_1dev_sharded_float32_auto_xla-on_momentum", "w_1dev_sharded_float32_auto_xla-off_momentum"):
            rows.append({"commit": commit, "config": cfg, "status": "ok", "median_ms": ms, "first_step_s": 1.0,
                         "ops_per_step": 12, "hlo_modules": 1 if "on" in cfg else 0, "fusions": fus, "xla": "on"})
    rows.append({"commit": "bbbb33334444", "config": "only_in_b", "status": "failed", "error": "boom"})
    profile_ledger.append_ledger(path, rows)


def test_diff(tmp_path, capsys):
    path = str(tmp_path / "ledger.csv")
    _synthetic_ledger(path)
    d = profile_ledger.diff_commits(profile_ledger.read_ledger(path), "aaaa", "bbbb")
    row = d.set_index("config").loc["w_1dev_sharded_float32_auto_xla-on_momentum"]
    assert row["median_ms_a"] == 10.0 and row["median_ms_b"] == 5.0 and row["median_ms_ratio"] == 0.5
    assert d.set_index("config").loc["only_in_b", "status_a"] == "absent"
    text = profile_ledger.render_diff(d)
    assert "10 -> 5 (0.50x)" in text and "absent -> failed" in text
    with pytest.raises(ValueError, match="not in the ledger"):
        profile_ledger.diff_commits(profile_ledger.read_ledger(path), "cccc", "aaaa")
    from dsgd.cli import main

    assert main(["profile", "--out", str(tmp_path), "--diff", "aaaa11112222", "bbbb"]) == 0
    assert "profile diff: A = aaaa11112222   B = bbbb33334444" in capsys.readouterr().out


def test_config_names_and_commit_info():
    # what tells runs apart comes first (TensorBoard's session picker shows ~28 characters)
    assert prof.config_name(Case(workload="bert-mini", mesh="batch=2,model=4", xla=True)) == "bert-mini_b2m4_xla-on_auto"
    assert prof.config_name(Case(workload="many-small", mesh="1", implementation="per_shard")) == \
        "many-small_1dev_xla-off_per-shard"
    # non-default fields are appended; "_" separates fields
    assert prof.config_name(Case(workload="/x/y/my_model.json", mesh="batch=8", layout="/x/map.json", dtype="bfloat16",
                                 options="full", mode="graph")) == "my-model_b8_xla-off_auto_map_bfloat16_full_graph"
    assert prof.mesh_tag("data=2,dcn=4") == "data2dcn4"  # shared initials: whole axis names
    names = {prof.config_name(Case(workload=w, mesh=m, xla=x, implementation=i))
             for w in ("bert-mini", "many-small") for m in ("1", "batch=2,model=4") for x in (True, False)
             for i in ("auto", "reference")}
    assert len({n[:27] for n in names}) == len(names) == 16, "distinct within what the picker shows"
    info = prof.commit_info()
    assert info["commit"] and all(c.isalnum() or c in "._+-" for c in info["commit"])
    assert len(info["commit"].split("+")[0]) == prof.COMMIT_CHARS
    with pytest.raises(ValueError):
        prof.commit_info("bad/name")


def test_profile_commits_reports_bad_commits_and_goes_on(tmp_path):
    """dsgd profile --commits (and its shim scripts/profile_commits.py): a commit whose dsgd does not
    import and one without dsgd are reported with the reason; the range goes on; the temporary
    worktrees are removed."""
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*a):
        return subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "notes.txt").write_text("no package yet\n")
    git("add", "-A")
    git("commit", "-qm", "no dsgd")
    (repo / "dsgd").mkdir()
    (repo / "dsgd" / "__init__.py").write_text("this is not python(\n")
    git("add", "-A")
    git("commit", "-qm", "broken dsgd")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "profile_commits.py")
    out = str(tmp_path / "p")
    for cmd in ([sys.executable, script, "HEAD~1", "HEAD", "--repo", str(repo), "--out", out],
                [sys.executable, "-m", "dsgd", "profile", "--commits", "HEAD~1", "HEAD", "--repo", str(repo), "--out", out]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln[:1].isalnum() and " failed " in ln}
        assert len(lines) == 2, proc.stdout
        first, second = (lines[git("rev-parse", rev)[:7]] for rev in ("HEAD~1", "HEAD"))
        assert "not from the worktree" in first or "no `dsgd profile`" in first, first
        assert "does not build/import" in second and "SyntaxError" in second, second
        assert git("worktree", "list").count("\n") == 0, "temporary worktrees removed"


def test_profile_commits_passes_on_only_the_options_given():
    import argparse

    from dsgd.harness import profile_commits

    p = argparse.ArgumentParser()
    prof.add_arguments(p)
    defaults = vars(p.parse_args([]))
    args = p.parse_args(["--commits", "HEAD~1..HEAD", "--workload", "bert-mini", "--mesh", "batch=2,model=4",
                         "--xla", "on", "--force", "--out", "elsewhere", "--commits-diff"])
    assert profile_commits.passed_on_args(args, defaults) == [
        "--workload", "bert-mini", "--mesh", "batch=2,model=4", "--xla", "on", "--force"]


def test_whole_step_profile_beside_its_floor(tmp_path):
    """``--mode fit``: the model's whole step is captured beside the floor (the same step applying
    nothing), each with its per-op-type table (op_stats.csv, the ledger's mode column), and the
    command prints where the time goes: the optimizer's extra op types against the floor's."""
    out = str(tmp_path / "profiles")
    cases = [Case(workload="resmlp-small", mesh="1", mode="fit", implementation=i)
             for i in ("auto", "no-update")]
    rows = prof.capture(cases, out, commit=COMMIT, steps=2, time_steps=3, echo=lambda *_: None, timeout=600)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert [r["impl_used"] for r in rows] == ["grouped_graph", "no-update"]
    for case, row in zip(cases, rows):
        run_dir = os.path.join(out, prof.config_name(case), COMMIT)
        assert prof.config_name(case).endswith("_fit")
        table = open(os.path.join(run_dir, "op_stats.csv")).read().splitlines()
        assert table[0] == "type,self_ms_per_step,per_step,pct" and len(table) > 3
        types = {r["type"] for r in row["op_types_table"]}
        assert {"MatMul", "_MklMatMul", "_MklNativeFusedMatMul"} & types, types  # the backward pass ran
    # the update shows under its own op type (the kernel traces itself: the executor traces an async op's dispatch only)
    assert "DsgdSgdStep" in {r["type"] for r in rows[0]["op_types_table"]}
    df = profile_ledger.read_ledger(os.path.join(out, "ledger.csv"))
    assert sorted(df["mode"]) == ["fit", "fit"]
    text = prof.where_the_time_goes(rows)
    assert text.startswith("where the time goes: resmlp-small on 1, fit")
    lines = text.splitlines()
    assert "no-update" in lines[2] and "auto" in lines[2]
    assert lines[-2].startswith("all op types") and lines[-1].startswith("step (median ms)")


def test_op_type_comparison_orders_by_difference_from_the_floor():
    floor = [{"type": "MatMul", "self_ms_per_step": 10.0, "per_step": 4, "pct": 90.0},
             {"type": "Assert", "self_ms_per_step": 0.1, "per_step": 1, "pct": 1.0}]
    opt = [{"type": "MatMul", "self_ms_per_step": 10.5, "per_step": 4, "pct": 60.0},
           {"type": "AddV2", "self_ms_per_step": 6.0, "per_step": 8, "pct": 35.0}]
    text = ps.render_op_type_comparison({"no-update": floor, "reference": opt}, {"no-update": 12.0, "reference": 19.0})
    lines = text.splitlines()
    assert lines[2].split()[0] == "AddV2" and lines[2].split()[1] == "-"  # the largest difference first
    assert lines[3].split()[0] == "MatMul"
    assert lines[-2].split()[-2:] == ["10.1", "16.5"] and lines[-1].split()[-2:] == ["12.0", "19.0"]


_PEAK_PROFILE = """
import glob, json, tempfile
from dsgd.harness.profile_summary import find_xplanes, memory_at_peak
x, w1, w2 = tf.ones([256, 64]), tf.ones([64, 1024]), tf.ones([64, 1024])

@tf.function
def f(x, w1, w2):
    c = tf.concat([tf.matmul(x, w1), tf.matmul(x, w2)], 0)  # 1 MiB + 1 MiB, then 2 MiB with both alive
    return tf.reduce_sum(tf.square(c))

with tf.device("CPU:0"):
    f(x, w1, w2)
    d = tempfile.mkdtemp()
    tf.profiler.experimental.start(d)
    f(x, w1, w2).numpy()
    tf.profiler.experimental.stop()
print(json.dumps(memory_at_peak(find_xplanes(d))))
"""


def test_memory_at_peak_names_what_the_allocator_held():
    """A step's tensors read from a real profile: their own peak is both matmuls' results and their
    concatenation (4 MiB); at the allocator's peak, its rounding apart, no collective buffers."""
    from _helpers import check_subprocess, run_subprocess

    held = json.loads(check_subprocess(run_subprocess(_PEAK_PROFILE, devices=1, timeout=240)).splitlines()[-1])
    (cpu,) = held.values()
    assert 4 * 2**20 <= cpu["tensors_peak"] <= 4.5 * 2**20, cpu
    # the allocator peaks by what it handed out (slack included), not always when the requests do
    assert 0 < cpu["tensors"] <= cpu["tensors_peak"] and cpu["collective_buffers"] == 0 and cpu["allocator_slack"] >= 0
    assert cpu["top"][0][2] <= 2 * 2**20 and any(k in cpu["top"][0][0].lower() for k in ("concat", "matmul")), cpu
    assert cpu["peak_bytes"] >= cpu["tensors"] + cpu["allocator_slack"] and cpu["smallest_traced"] >= 256 * 1024


def test_memory_at_peak_keeps_the_collective_runtime_and_the_allocator_apart(monkeypatch):
    """The classification: the allocator's specials (its unused reserve) are not held; a collective's
    temporary chunk is the runtime's; what a tensor got beyond its request is the allocator's slack."""
    def snap(op, region, got, asked):
        return {"activityMetadata": {"tfOpName": op, "regionType": region, "allocationBytes": str(got),
                                     "requestedBytes": str(asked), "tensorShape": "[4]"}}
    profile = {"memoryProfilePerAllocator": {"mklcpu": {
        "profileSummary": {"peakBytesUsageLifetime": "9000"},
        "memoryProfileSnapshots": [snap("f/MatMul", "output", 2048, 1024), snap("CollectiveAdapterImpl::TempChunk", "", 512, 500),
                                   snap("f/CollectiveReduceV2", "output", 256, 256)],
        "specialAllocations": [{"tfOpName": "unused preallocated device memory", "allocationBytes": "5000"}],
        "activeAllocations": [{"snapshotIndex": "-1", "specialIndex": "0"}, {"snapshotIndex": "0", "specialIndex": "-1"},
                              {"snapshotIndex": "1", "specialIndex": "-1"},
                              {"snapshotIndex": "2", "specialIndex": "-1", "numOccurrences": "2"}]}}}
    monkeypatch.setattr(ps, "xprof_json", lambda paths, tool: profile if tool == "memory_profile" else {})
    monkeypatch.setattr(ps, "_tensor_peaks", lambda paths: {"mklcpu": (4096, 256)})
    held = ps.memory_at_peak(["x.xplane.pb"])["mklcpu"]
    assert (held["tensors"], held["collective_buffers"], held["allocator_slack"]) == (1024 + 512, 512, 1024)
    assert held["peak_bytes"] == 9000 and held["top"][0] == ("f/MatMul", "[4]", 1024) and held["tensors_peak"] == 4096
    assert held["smallest_traced"] == 256


def test_the_tensors_own_peak_is_followed_through_the_allocations(tmp_path):
    """The program's tensors peak (150 bytes: two tensors) before the collective runtime's 500-byte chunk
    makes the allocator peak beside one tensor; its chunk is never counted as a tensor.  The smallest
    request recorded is 50 bytes."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    xs = xplane_pb2.XSpace()
    plane = xs.planes.add(name="/host:CPU")
    stat_ids = {}
    for i, name in enumerate(["allocator_name", "addr", "requested_bytes", "tf_op", "mklcpu"], start=1):
        plane.stat_metadata[i].id, plane.stat_metadata[i].name = i, name
        stat_ids[name] = i
    for i, name in ((1, "MemoryAllocation"), (2, "MemoryDeallocation")):
        plane.event_metadata[i].id, plane.event_metadata[i].name = i, name
    line = plane.lines.add(name="tf_Compute", timestamp_ns=1)
    for t, kind, addr, size, op in [(1, 1, 10, 100, "f/MatMul"), (2, 1, 20, 50, "f/Relu"), (3, 2, 20, 0, ""),
                                    (4, 1, 30, 500, "CollectiveAdapterImpl::TempChunk"), (5, 2, 30, 0, "")]:
        ev = line.events.add(metadata_id=kind, offset_ps=t)
        ev.stats.add(metadata_id=stat_ids["allocator_name"], ref_value=stat_ids["mklcpu"])
        ev.stats.add(metadata_id=stat_ids["addr"], uint64_value=addr)
        if kind == 1:
            ev.stats.add(metadata_id=stat_ids["requested_bytes"], int64_value=size)
            ev.stats.add(metadata_id=stat_ids["tf_op"], str_value=op)
    path = tmp_path / "t.xplane.pb"
    path.write_bytes(xs.SerializeToString())
    assert ps._tensor_peaks([str(path)]) == {"mklcpu": (150, 50)}
