"""dsgd bench's rows: the numbers come from the case that ran (dsgd.harness.bench_run.run_case, in-process)."""
from __future__ import annotations

import json
import os

import pytest

from dsgd.harness.bench_run import run_case


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
    from dsgd.harness.bench_run import BLOCK, _jobs, run_paired
    from dsgd.harness.measure import Case

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
    """``--mode graph``: apply_gradients in a tf.function for dsgd (its in-graph kernel) and tf_keras,
    beside a function taking the same gradients and variables and applying nothing (the floor);
    ``--mode fit``: one model.fit step of a model, beside the no-update floor, and the optimizer's
    share of the step (step - floor) with its speed-up over tf_keras' share."""
    import numpy as np
    import pandas as pd

    from dsgd.harness.bench_frame import add_ratios
    from dsgd.harness.bench_run import run_paired
    from dsgd.harness.grid import make_cases
    from dsgd.harness.measure import NO_UPDATE

    cases = make_cases(["one-big"], ["1"], ["sharded"], ["float32"], ["auto", "reference"], [False], ["momentum"],
                       modes=["eager", "graph", "fit"], models=["resmlp-small"])
    assert [(c.mode, c.workload, c.implementation) for c in cases] == [
        ("eager", "one-big", "auto"), ("eager", "one-big", "reference"), ("graph", "one-big", "auto"),
        ("graph", "one-big", "reference"), ("graph", "one-big", NO_UPDATE), ("fit", "resmlp-small", "auto"),
        ("fit", "resmlp-small", "reference"), ("fit", "resmlp-small", NO_UPDATE)]

    wl = tmp_path / "two.json"
    wl.write_text(json.dumps([{"name": "w", "shape": [64, 32]}, {"name": "b", "shape": [32]}]))
    graph = run_paired(dict(workload=str(wl), mesh="batch=2,model=4", mode="graph", steps=2,
                            implementation=["auto", "reference", NO_UPDATE]))["rows"]
    fit = run_paired(dict(workload="resmlp-small", mesh="1", mode="fit", steps=2,
                          implementation=["auto", "reference", NO_UPDATE]))["rows"]
    assert [r["status"] for r in graph + fit] == ["ok"] * 6, graph + fit
    assert graph[0]["impl_used"] == "grouped_graph" and fit[0]["impl_used"] == "grouped_graph"
    assert graph[2]["impl_used"] == fit[2]["impl_used"] == NO_UPDATE
    # the floor's function has the inputs the optimizers' have: the gradients and the variables' handles
    import tensorflow as tf

    from dsgd.harness import measure, models

    built = measure.build_case(measure.Case(workload=str(wl), mesh="1", mode="graph", implementation=NO_UPDATE))
    opt = models.no_update_optimizer(built.mesh)
    fn = tf.function(lambda: opt.apply_gradients(zip(built.grads, built.variables)))
    captured = [t for t, _ in fn.get_concrete_function().graph.captures]
    for x in list(built.grads) + [v.handle for v in built.variables]:
        assert any(x is t for t in captured), x
    base = dict(workload="w", mesh="m", layout="sharded", dtype="float32", xla=False, options="momentum",
                mode="fit", status="ok", first_step_s=1.0)
    df = add_ratios(pd.DataFrame([dict(base, implementation="auto", median_ms=12.0),
                                  dict(base, implementation="reference", median_ms=30.0),
                                  dict(base, implementation=NO_UPDATE, median_ms=10.0)]))
    auto, ref, floor = df.to_dict("records")
    assert auto["share_ms"] == 2.0 and ref["share_ms"] == 20.0 and auto["share_speedup"] == 10.0
    assert np.isnan(floor["share_ms"]) and np.isnan(floor["speedup"]) and auto["speedup"] == 2.5
    # a share within the noise (twice the standard error of the difference of the medians, from the
    # p10-p90 spreads over 4 steps: 2 * hypot(1.2533 * 3 / 2.563 / 2, 1.2533 * 1 / 2.563 / 2) = 1.55 ms) is no ratio
    noisy = add_ratios(pd.DataFrame([dict(base, implementation="auto", median_ms=10.6, p10_ms=9.0, p90_ms=12.0,
                                          roofline_ms=1.0, steps=4),
                                     dict(base, implementation="reference", median_ms=30.0, p10_ms=29.0, p90_ms=31.0,
                                          roofline_ms=1.0, steps=4),
                                     dict(base, implementation=NO_UPDATE, median_ms=10.0, p10_ms=9.5, p90_ms=10.5,
                                          roofline_ms=1.0, steps=4)]))
    a, r, _ = noisy.to_dict("records")
    assert a["share_ms"] == pytest.approx(0.6) and np.isnan(a["share_speedup"]) and np.isnan(a["roofline_frac"])
    assert r["roofline_frac"] == pytest.approx(1.0 / 20.0)
    from dsgd.harness.bench_frame import compact

    assert np.isnan(compact(noisy)["share_speedup"].iloc[0])
    from dsgd.harness.bench_render import render

    text = render(df.assign(p10_ms=df["median_ms"], p90_ms=df["median_ms"], impl_used="grouped_graph"))
    assert "floor" in text and "10.00x" in text and "(optimizer's share of a whole training step)" in text
    assert max(map(len, text.splitlines())) <= 120


# ------------------------------------------------------------------------------- the output
def _frame(workloads=("one-big", "bert-mini", "many-small"), meshes=("1", "batch=8", "batch=2,model=4"),
           layouts=("sharded",), impls=("auto",), extra=None):
    """Rows as dsgd.harness.bench_run.run makes them (plain data): dsgd k times faster than the reference."""
    import pandas as pd

    from dsgd.harness.bench_frame import add_ratios
    from dsgd.harness.measure import Case

    rows = []
    k = 1
    for w in workloads:
        for m in meshes:
            for lay in layouts:
                k += 1
                for impl in (*impls, "reference"):
                    ms = 10.0 * k if impl == "reference" else 10.0
                    row = dict(vars(Case(workload=w, mesh=m, layout=lay, implementation=impl)), **(extra or {}))
                    row.update(status="ok", impl_used="grouped" if impl == "auto" else impl, median_ms=ms,
                               p10_ms=0.9 * ms, p90_ms=1.2 * ms, steps=10, first_step_s=0.5, roofline_frac=0.9 / k,
                               copy_gbps=30.0, build_s=21.0 if not rows else 0.0, paired=True, error=None)
                    rows.append(row)
    return add_ratios(pd.DataFrame(rows))


def test_compact_frame_puts_dsgd_and_the_reference_side_by_side():
    from dsgd.harness.bench_frame import compact

    df = _frame()
    c = compact(df)
    assert len(c) == 9 and (c["implementation"] == "auto").all()  # one row per configuration
    assert list(c["speedup"]) == [float(k) for k in range(2, 11)]
    assert (c["reference_ms"] == c["median_ms"] * c["speedup"]).all()
    assert c["spread"].round(6).eq(0.3).all() and (c["status"] == "ok").all()
    # every Case field but the implementation is part of the configuration: one added later (e.g. a
    # mode) splits configurations by itself
    df2 = _frame(extra={"mode": "graph"})
    both = compact(df.__class__(list(df.to_dict("records")) + list(df2.to_dict("records"))))
    assert len(both) == 18 and set(both["mode"]) == {"eager", "graph"}


def test_default_table_fits_120_columns_and_ends_with_the_verdict():
    from dsgd.harness.bench_render import render

    df = _frame()
    text = render(df, "table", run_s=372)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120
    assert lines[0].startswith("every row: layout sharded")  # constant values hoisted above the table
    assert sum(ln.split(" ")[0] in ("one-big", "bert-mini", "many-small") for ln in lines) == 9
    flat = " ".join(text.split())  # the notes are wrapped to 120 columns
    v = flat[flat.index("verdict:"):]
    geo = (2 * 3 * 4 * 5 * 6 * 7 * 8 * 9 * 10) ** (1 / 9)
    assert f"{geo:.2f}x faster" in v and "worst 2.00x (workload one-big, mesh 1)" in v
    assert "run time 6 min 12 s" in flat
    assert any(ln.startswith("A row: one optimizer step") for ln in lines)
    assert "21.0 s before the first step" in flat  # the one-time build, reported on its own
    assert "batch=2,model=4" in render(df, "wide") and len(render(df, "wide").splitlines()[0]) > 120


def test_table_stays_within_120_columns_when_everything_varies():
    """Every key varying, long JSON workload names, several implementations, a failure: still <= 120."""
    from dsgd.harness.bench_render import render

    import pandas as pd

    kw = dict(workloads=("a-really-long-workload-file-name-for-testing.json", "one-big"),
              meshes=("batch=2,model=4", "batch=4,model=2"), layouts=("replicated", "sharded"),
              impls=("auto", "fused", "sharded_state"))
    df = pd.concat([_frame(**kw, extra={"dtype": d, "xla": x}) for d in ("float32", "bfloat16") for x in (False, True)],
                   ignore_index=True)
    df.loc[3, ["status", "error", "median_ms"]] = ["failed", "ValueError: " + "x" * 500, float("nan")]  # a reference
    text = render(df, "table", run_s=5)
    assert max(map(len, text.splitlines())) <= 120, text
    assert "3 rows with a failed case (below)" in text  # auto, fused and sharded_state lack their reference
    assert text.count("ValueError") == 1  # the failure itself, once
    assert text.count("verdict: dsgd") == 3  # one per dsgd implementation


def test_json_and_csv_keep_every_field():
    import io

    import pandas as pd

    from dsgd.harness.bench_render import render

    df = _frame(workloads=("one-big",), meshes=("1",))
    assert json.loads(render(df, "json"))[0]["build_s"] == 21.0
    assert list(pd.read_csv(io.StringIO(render(df, "csv"))).columns) == list(df.columns)


def test_kernel_build_is_not_a_first_step(monkeypatch, tmp_path):
    """run_job builds/loads the kernels before the case is built and timed, and reports that time as build_s."""
    import time

    from dsgd import kernels
    from dsgd.harness import bench_run, measure

    def slow_prepare():
        time.sleep(1.5)
        return 1.5

    monkeypatch.setattr(kernels, "prepare", slow_prepare)
    wl = tmp_path / "one.json"
    wl.write_text(json.dumps([{"name": "w", "shape": [8, 4]}]))
    row = bench_run.run_job(dict(_func="run_case", workload=str(wl), mesh="1", implementation="auto", steps=2))
    assert row["status"] == "ok" and row["build_s"] == 1.5 and row["first_step_s"] < 1.5
    assert measure.prepare_kernels(["reference"]) == 0.0  # the reference needs no kernels


def test_verdict_says_slower_when_slower():
    from dsgd.harness.bench_frame import compact
    from dsgd.harness.bench_render import verdict

    df = _frame(workloads=("one-big",), meshes=("1",))
    df.loc[df["implementation"] == "auto", "median_ms"] = 40.0  # the reference takes 20
    assert "2.00x slower than tf_keras (speed-up 0.50x)" in verdict(compact(df))[0]


# ------------------------------------------------------------------------------- the default run
def test_default_grid_and_full():
    """The default run: each mode (eager, graph, fit) on the three headline workloads on the 8-device
    two-axis mesh; ``--full`` is the whole grid (3 workloads x meshes 1, batch=8, batch=2,model=4, the
    same modes, resmlp for fit), and options given replace a grid's values one by one."""
    from dsgd.cli import build_parser
    from dsgd.harness.bench_args import DEFAULT_IMPLEMENTATIONS, grid_for
    from dsgd.harness.grid import cases_from_args

    def cases(argv):
        args = build_parser().parse_args(["bench", *argv])
        g = grid_for(args)
        return cases_from_args(args, workloads=g.workloads, meshes=args.mesh or g.meshes,
                               implementations=DEFAULT_IMPLEMENTATIONS, modes=args.mode or g.modes,
                               models=args.model or g.models)

    default = cases([])
    configs = sorted({(c.mode, c.workload, c.mesh) for c in default})
    assert configs == sorted([(m, w, "batch=2,model=4") for m in ("eager", "graph")
                              for w in ("one-big", "bert-mini", "many-small")] + [("fit", "resmlp", "batch=2,model=4")])
    assert {c.implementation for c in default if c.mode == "eager"} == {"auto", "reference"}
    assert {c.implementation for c in default if c.mode != "eager"} == {"auto", "reference", "no-update"}
    full = {(c.mode, c.workload, c.mesh, c.implementation) for c in cases(["--full"])}
    meshes = ("1", "batch=8", "batch=2,model=4")
    assert full == ({("eager", w, m, i) for w in ("one-big", "bert-mini", "many-small") for m in meshes
                     for i in ("auto", "reference")}
                    | {("graph", w, m, i) for w in ("one-big", "bert-mini", "many-small") for m in meshes
                       for i in ("auto", "reference", "no-update")}
                    | {("fit", "resmlp", m, i) for m in meshes for i in ("auto", "reference", "no-update")})
    assert {c.mesh for c in cases(["--full", "--mesh", "1"])} == {"1"}
    assert {(c.mode, c.workload) for c in cases(["--mode", "eager", "--workload", "bert-mini"])} == \
        {("eager", "bert-mini")}


def test_multiclient_default_meshes_span_the_cluster():
    from dsgd.harness.bench_args import DEFAULT_GRID, FULL_GRID, default_meshes

    assert default_meshes(DEFAULT_GRID) == ["batch=2,model=4"]
    assert default_meshes(FULL_GRID, 8) == ["batch=8", "batch=2,model=4"]
    assert default_meshes(DEFAULT_GRID, 4) == ["batch=4"]


def test_job_cost_weighs_what_takes_time():
    """The progress bar advances by each job's estimated cost: tf_keras' first step over many variables
    on many devices dominates (many-small's reference on 8 devices, ~19 s here; one-big's, ~0.4 s)."""
    from dsgd.harness.bench_run import job_cost
    from dsgd.harness.measure import Case

    def cost(w, m, impls=("auto", "reference"), mode="eager"):
        return job_cost([Case(workload=w, mesh=m, implementation=i, mode=mode) for i in impls], steps=10)

    assert cost("many-small", "batch=2,model=4") > 4 * cost("one-big", "batch=2,model=4")
    assert cost("many-small", "batch=2,model=4") > cost("many-small", "1") > cost("many-small", "1", ("auto",))
    assert 10 < cost("many-small", "batch=2,model=4", mode="graph") < 40
    assert 0 < cost("resmlp", "batch=2,model=4", ("auto", "reference", "no-update"), mode="fit") < 20
    assert cost("no-such-workload", "1") > 0  # a bad case fails in its job, not in the estimate


def test_run_starts_the_worker_first_and_reports_the_kernel_build(tmp_path, monkeypatch):
    """run(): a start job builds/loads the kernels and measures the copy bandwidth before any case, so no
    case pays them; the build time is reported on the first job's rows, as a row's own would be."""
    from dsgd.harness import bench_run
    from dsgd.harness.measure import Case

    built = []  # as dsgd.kernels.prepare: the time it took the first time in a process, then 0

    def prepare(impls):
        seconds = 2.5 if "auto" in impls and not built else 0.0
        built.append(impls)
        return seconds

    monkeypatch.setattr(bench_run, "prepare_kernels", prepare)
    monkeypatch.setattr(bench_run, "_COPY_GBPS", 40.0)
    calls = []
    real = bench_run.run_job
    monkeypatch.setattr(bench_run, "run_job", lambda p: calls.append(p["_func"]) or real(p))
    wl = tmp_path / "one.json"
    wl.write_text(json.dumps([{"name": "w", "shape": [8, 4]}]))
    cases = [Case(workload=str(wl), mesh=m, implementation=i) for m in ("1", "batch=2") for i in ("auto", "reference")]
    df = bench_run.run(cases, steps=2, isolate=False, progress=True)
    assert calls == ["start", "run_paired", "run_paired"]
    assert list(df["status"]) == ["ok"] * 4 and (df["copy_gbps"] == 40.0).all()
    assert list(df["build_s"]) == [2.5, 2.5, 0.0, 0.0] and built[0] == ["auto", "reference"]


def _modes_frame():
    """Rows of every default mode (plain data): eager and graph steps, and a fit step with its floor."""
    import pandas as pd

    from dsgd.harness.bench_frame import add_ratios

    rows = []
    for mode, w, times in (("eager", "one-big", (14, 36, None)), ("eager", "many-small", (9, 75, None)),
                           ("graph", "one-big", (14.7, 40.6, 0.6)), ("graph", "many-small", (21.8, 55, 19.2)),
                           ("fit", "resmlp", (57.2, 66.8, 49.8))):
        for impl, ms in zip(("auto", "reference", "no-update"), times):
            if ms is not None:
                rows.append(dict(workload=w, mesh="batch=2,model=4", layout="sharded", dtype="float32", xla=False,
                                 options="momentum", device="CPU", mode=mode, implementation=impl, status="ok",
                                 median_ms=ms, p10_ms=0.95 * ms, p90_ms=1.05 * ms, steps=10, first_step_s=1.0,
                                 roofline_ms=5.0, copy_gbps=40.0, impl_used="grouped", paired=True, build_s=0.0))
    return add_ratios(pd.DataFrame(rows))


def test_one_verdict_line_per_implementation_from_the_step_times():
    """The run ends with one verdict per dsgd implementation: the optimizer step (eager, graph) and the whole
    training step (fit) as tf_keras ms / dsgd ms -- not the share, a small difference of two noisy medians."""
    from dsgd.harness.bench_frame import compact
    from dsgd.harness.bench_render import render, verdict

    df = _modes_frame()
    (line,) = verdict(compact(df), run_s=95)
    geo = ((36 / 14) * (75 / 9) * (40.6 / 14.7) * (55 / 21.8)) ** 0.25
    assert line.startswith(f"verdict: dsgd (auto) per optimizer step: {geo:.2f}x faster than tf_keras, geometric "
                           "mean of 4 configurations; worst 2.52x (workload many-small, mode graph)")
    assert f"per whole training step: {66.8 / 57.2:.2f}x faster than tf_keras (workload resmlp, mode fit)" in line
    assert line.endswith("; run time 1 min 35 s")
    text = render(df, run_s=95)
    assert text.count("verdict:") == 1 and max(map(len, text.splitlines())) <= 120


def test_the_legend_explains_the_columns_shown_and_only_those():
    from dsgd.harness.bench_render import render

    def header_and_legend(text):
        lines = text.splitlines()
        return " ".join(lines[:3]), " ".join(" ".join(lines[lines.index("") + 1:]).split())

    head, legend = header_and_legend(render(_modes_frame()))  # everything fits: every column shown and explained
    for column, entry in (("spread", "spread = (p90 - p10)"), ("floor", "floor = the same step with an optimizer that "
                          "brings every gradient to its variable's layout and hands them to one stateful no-op: the "
                          "forward and backward pass and the gradient reductions every optimizer needs, nothing "
                          "applied"), ("share", "share speed-up ="), ("roofline", "roofline ="),
                          ("first step", "first step s =")):
        assert column in head and entry in legend, column
    assert "eager: apply_gradients" in legend and "fit: one model.fit step" in legend and "train_step:" not in legend

    eager = _frame(workloads=("a-really-long-workload-file-name-for-testing.json", "one-big"),
                   meshes=("batch=2,model=4", "batch=4,model=2"), layouts=("replicated", "sharded"))
    from dsgd.harness.bench_render import format_compact
    from dsgd.harness.bench_frame import compact

    _, columns = format_compact(compact(eager), width=80)  # too narrow: optional columns dropped
    assert "spread" not in columns and "first" not in columns
    text = render(eager.assign(xla=[True, True, False, False] * 4), "table")
    head, legend = header_and_legend(text)
    for column, entry in (("spread", "spread ="), ("first step", "first step s ="), ("roofline", "roofline =")):
        assert (column in head) == (entry in legend), column
    assert "floor" not in legend and "share" not in legend and "graph:" not in legend


def test_a_floor_slower_than_a_real_step_is_flagged():
    """A floor must never be slower than a real optimizer's step: where it clearly is (beyond the
    medians' noise), the table says so instead of reporting shares over it."""
    import pandas as pd

    from dsgd.harness.bench_frame import add_ratios, floor_violations
    from dsgd.harness.bench_render import render
    from dsgd.harness.measure import NO_UPDATE

    base = dict(workload="mlp", mesh="batch=2,model=4", layout="sharded", dtype="float32", xla=False,
                options="momentum", mode="fit", status="ok", first_step_s=1.0, steps=30, impl_used="grouped_graph")

    def frame(floor_ms):
        return add_ratios(pd.DataFrame([
            dict(base, implementation="auto", median_ms=70.0, p10_ms=68.0, p90_ms=72.0),
            dict(base, implementation="reference", median_ms=80.0, p10_ms=78.0, p90_ms=82.0),
            dict(base, implementation=NO_UPDATE, median_ms=floor_ms, p10_ms=floor_ms - 2, p90_ms=floor_ms + 2)]))

    assert floor_violations(frame(60.0)) == []
    assert floor_violations(frame(70.5)) == []  # within the noise
    bad = floor_violations(frame(76.0))
    assert [(v["implementation"], v["floor_ms"], v["step_ms"]) for v in bad] == [("auto", 76.0, 70.0)]
    assert "WARNING: the floor (76 ms) is slower than auto's whole step (70 ms)" in " ".join(
        render(frame(76.0)).split())
    assert "WARNING" not in render(frame(60.0))


def test_a_users_model_and_layout_map_through_the_whole_step_modes(tmp_path):
    """``dsgd bench --mode fit --model module:function --layout FILE`` as a user runs it: their own model
    (which knows nothing of meshes), laid out by a layout-map file (what ``dsgd layouts --emit-layout-map``
    writes), beside tf_keras and the floor; the file's layouts are the variables' own."""
    import subprocess
    import sys

    from dsgd.harness import models
    DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

    model, layout = f"{DATA}/tiny_user_model.py:build", f"{DATA}/tiny_user_layout.json"
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "dsgd", "bench", "--mode", "fit", "--model", model, "--layout", layout,
                           "--mesh", "batch=2,model=4", "--steps", "2", "--quiet", "--format", "json", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert sorted(r["implementation"] for r in rows) == ["auto", "no-update", "reference"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert {r["impl_used"] for r in rows if r["implementation"] == "auto"} == {"grouped_graph"}
    # the same model and map give the layouts the file names (sharded over model), others replicated
    check = subprocess.run([sys.executable, "-c", f"""
from dsgd.devices import configure_devices; configure_devices(8)
from dsgd.harness import models
from dsgd.meshspec import make_mesh
m = models.build_model(models.get_model_spec({model!r}), make_mesh("batch=2,model=4"), {layout!r})
print({{v.name: v.layout.sharding_specs for v in m.trainable_variables}})
"""], capture_output=True, text=True, timeout=300)
    specs = eval(check.stdout.strip().splitlines()[-1])
    assert specs["up/kernel:0"] == ["unsharded", "model"] and specs["down/kernel:0"] == ["model", "unsharded"]
    assert specs["head/kernel:0"] == ["unsharded", "unsharded"]
    assert models.is_user_model(model) and not models.is_user_model("mlp")


def test_a_users_model_needs_a_layout_map_or_replicated():
    """A ``module:function`` model has no sharding rules of its own: ``--layout sharded`` is refused
    (exit 2, naming what to give) before anything runs; so is a layout that is no .json file."""
    import subprocess
    import sys

    model = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_user_model.py") + ":build"
    for layout, needle in (("sharded", "layout map"), ("nope.txt", "layout-map .json file")):
        proc = subprocess.run([sys.executable, "-m", "dsgd", "bench", "--mode", "fit", "--model", model, "--layout",
                               layout, "--mesh", "batch=2,model=4"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr, (layout, proc.stderr[-1000:])
