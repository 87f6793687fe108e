"""dsgd bench's rows: the numbers come from the case that ran (dsgd.bench.run_case, in-process)."""
from __future__ import annotations

import json

import pytest

from dsgd.bench import run_case


def test_state_bytes_are_what_the_slots_hold(tmp_path):
    wl = tmp_path / "one.json"
    wl.write_text(json.dumps([{"name": "w", "shape": [64, 32], "dtype": "float32"}]))
    rows = {impl: run_case(dict(workload=str(wl), mesh="batch=8", layout="replicated", implementation=impl, steps=2))
            for impl in ("auto", "sharded_state")}
    for impl, r in rows.items():
        assert r["status"] == "ok" and r["impl_used"] in (("grouped", "per_shard") if impl == "auto" else (impl,)), r
        assert r["median_ms"] > 0 and r["p10_ms"] <= r["p90_ms"] and 0 < r["roofline_frac"]
    momentum = 64 * 32 * 4  # one replicated float32 slot on each device
    assert rows["auto"]["state_bytes_per_device"] == momentum
    assert rows["sharded_state"]["state_bytes_per_device"] == momentum // 8  # ZeRO-1 over batch=8


def test_paired_rows_one_per_implementation_and_a_failure_kept(tmp_path):
    """Implementations of one configuration measured side by side: a row each, in order, with
    the requested number of timed steps; one that cannot be built is a failed row, the others
    are still measured."""
    from dsgd.bench import BLOCK, _jobs, run_paired
    from dsgd.measure import Case

    wl = tmp_path / "two.json"
    wl.write_text(json.dumps([{"name": "w", "shape": [64, 32]}, {"name": "b", "shape": [32]}]))
    steps = BLOCK + 1  # a partial last round
    res = run_paired(dict(workload=str(wl), mesh="batch=2,model=4", layout="sharded",
                          implementation=["auto", "no-such-implementation", "reference"], steps=steps))
    auto, bad, ref = res["rows"]
    assert bad["status"] == "failed" and "no-such-implementation" in bad["error"]
    for row, impl in ((auto, "auto"), (ref, "reference")):
        assert row["status"] == "ok" and row["implementation"] == impl and row["paired"], row
        assert row["steps"] == steps and 0 < row["min_ms"] <= row["median_ms"] and row["first_step_s"] > 0

    cases = [Case(workload="one-big", mesh=m, implementation=i) for m in ("1", "batch=8") for i in ("auto", "reference")]
    cases.append(Case(workload="one-big", mesh="1", implementation="auto", options="full"))
    jobs = _jobs(cases, steps=3, paired=True)
    assert [(f, idx) for f, _, idx in jobs] == [("run_paired", [0, 1]), ("run_paired", [2, 3]), ("run_case", [4])]
    assert jobs[0][1]["implementation"] == ["auto", "reference"]
    assert [idx for _, _, idx in _jobs(cases, steps=3, paired=False)] == [[i] for i in range(5)]


def test_eager_floor_script(tmp_path):
    """scripts/eager_floor.py as a user runs it: a table with the floor's parts, which add up."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    wl = tmp_path / "three.json"
    wl.write_text(json.dumps([{"name": f"v{i}", "shape": [16, 8]} for i in range(3)]))
    proc = subprocess.run([sys.executable, "scripts/eager_floor.py", "--workload", str(wl), "--mesh", "batch=8",
                           "--layout", "replicated", "--repeats", "3", "--no-reference"],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, row = [line.split() for line in proc.stdout.splitlines()[:2]]
    values = dict(zip(header, row))
    assert values["tensors"] == "3" and values["impl_used"] in ("grouped", "per_shard")
    feeds = [float(values["unpack_ms"]) + float(values["inputs_ms"])]
    if "direct_ms" in values:  # dsgd's C++ dispatch is built here: the cheaper feed counts
        feeds.append(float(values["direct_ms"]))
    stream = float(values["stream_ms"])
    assert all(f > 0 for f in feeds) and stream > 0
    assert abs(min(feeds) + stream - float(values["floor_ms"])) < 0.02


def test_kernel_bandwidth_script():
    """scripts/kernel_bandwidth.py as a user runs it: three ways over the same bytes, the copy, and
    (--ceiling) the same update in plain C++ next to memcpy."""
    import subprocess
    import sys
    from pathlib import Path

    from dsgd import kernels

    if kernels.unavailable_reason() is not None:
        pytest.skip(kernels.unavailable_reason())
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "scripts/kernel_bandwidth.py", "--params", "80000", "--rounds", "3",
                           "--ceiling"], capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "GB/s" in line]
    # 3 ways + the copy, then the plain C++ ceiling: 3 update loops (2 without AVX) + memcpy
    assert len(lines) in (7, 8) and all(float(line.split("GB/s")[0].split()[-1]) > 0 for line in lines)
    assert any("prefetch" in line for line in lines) and "memcpy" in lines[-1]


def test_modes_graph_and_fit_side_by_side(tmp_path):
    """``--mode graph``: apply_gradients in a tf.function for dsgd (its in-graph kernel) and tf_keras;
    ``--mode fit``: one model.fit step of a model, beside the no-update floor, and the optimizer's
    share of the step (step - floor) with its speed-up over tf_keras' share."""
    import numpy as np
    import pandas as pd

    from dsgd.bench import add_ratios, make_cases, run_paired
    from dsgd.measure import NO_UPDATE

    cases = make_cases(["one-big"], ["1"], ["sharded"], ["float32"], ["auto", "reference"], [False], ["momentum"],
                       modes=["eager", "graph", "fit"], models=["resmlp-small"])
    assert [(c.mode, c.workload, c.implementation) for c in cases] == [
        ("eager", "one-big", "auto"), ("eager", "one-big", "reference"), ("graph", "one-big", "auto"),
        ("graph", "one-big", "reference"), ("fit", "resmlp-small", "auto"), ("fit", "resmlp-small", "reference"),
        ("fit", "resmlp-small", NO_UPDATE)]

    wl = tmp_path / "two.json"
    wl.write_text(json.dumps([{"name": "w", "shape": [64, 32]}, {"name": "b", "shape": [32]}]))
    graph = run_paired(dict(workload=str(wl), mesh="batch=2,model=4", mode="graph", steps=2,
                            implementation=["auto", "reference"]))["rows"]
    fit = run_paired(dict(workload="resmlp-small", mesh="1", mode="fit", steps=2,
                          implementation=["auto", "reference", NO_UPDATE]))["rows"]
    assert [r["status"] for r in graph + fit] == ["ok"] * 5, graph + fit
    assert graph[0]["impl_used"] == "grouped_graph" and fit[0]["impl_used"] == "grouped_graph"
    assert fit[2]["impl_used"] == NO_UPDATE
    base = dict(workload="w", mesh="m", layout="sharded", dtype="float32", xla=False, options="momentum",
                mode="fit", status="ok", first_step_s=1.0)
    df = add_ratios(pd.DataFrame([dict(base, implementation="auto", median_ms=12.0),
                                  dict(base, implementation="reference", median_ms=30.0),
                                  dict(base, implementation=NO_UPDATE, median_ms=10.0)]))
    auto, ref, floor = df.to_dict("records")
    assert auto["share_ms"] == 2.0 and ref["share_ms"] == 20.0 and auto["share_speedup"] == 10.0
    assert np.isnan(floor["share_ms"]) and np.isnan(floor["speedup"]) and auto["speedup"] == 2.5
