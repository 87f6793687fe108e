"""The cost model: exact bytes, explicit collectives, NNLS fitting that recovers known costs, validation."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from dsgd import meshspec
from dsgd.advisor import costmodel, plans
from dsgd.harness.measure import OPTION_PRESETS
from dsgd.workloads import VarSpec, get_workload

MESH = [("batch", 2), ("model", 4)]
U = "unsharded"
SPECS = [VarSpec("a", (512, 64)), VarSpec("b", (256,)), VarSpec("c", (64, 256), "bfloat16")]
LAYOUTS = [("batch", "model"), (U,), (U, "model")]


# ------------------------------------------------------------------------------- bytes (exact, by hand)
def test_bytes_by_hand_full_options():
    # a: (512,64) f32 over batch x model -> (256,16) local = 4096 el * 4 B = 16384
    # b: (256,) f32 replicated -> 1024;  c: (64,256) bf16 over model on dim 1 -> (64,64) * 2 B = 8192
    b = costmodel.plan_bytes(SPECS, LAYOUTS, MESH, OPTION_PRESETS["full"])
    assert b.params_per_device == 16384 + 1024 + 8192 == 25600
    assert b.momentum_per_device == 25600
    assert b.ema_per_device == 25600
    # traffic: every device moves its shards 8 times (5 momentum + 2 EMA + 1 norm): 25600 * 8 devices * 8
    assert b.step_traffic_total == 25600 * 8 * 8
    f = costmodel.features(SPECS, LAYOUTS, MESH, OPTION_PRESETS["full"])
    assert f["bytes_per_device"] == 76800
    assert f["host_bytes"] == 25600 * 8 * 8  # one host drives all 8 devices here
    assert f["var_device_ops"] == 3 * 8 and f["local_devices"] == 8 and f["variables"] == 3
    # per-device kernels of 8 logical devices share the host's cores: 2 cores run them 2 at a time
    assert costmodel.features(SPECS, LAYOUTS, MESH, OPTION_PRESETS["full"], cores=2)["parallel_var_device_ops"] == 12
    assert costmodel.features(SPECS, LAYOUTS, MESH, OPTION_PRESETS["full"], cores=16)["parallel_var_device_ops"] == 3
    one = costmodel.features(SPECS, [plans.replicated(s) for s in SPECS], [("batch", 1)], OPTION_PRESETS["full"], cores=2)
    assert one["parallel_var_device_ops"] == one["var_device_ops"] == 3  # one device: one lane
    assert one["lane_bytes"] == one["host_bytes"] and one["multi_device"] == 0.0
    two_lanes = costmodel.features(SPECS, LAYOUTS, MESH, OPTION_PRESETS["full"], cores=2)
    assert two_lanes["lane_bytes"] == two_lanes["host_bytes"] / 2 and two_lanes["multi_device"] == 1.0


def test_bytes_reference_keeps_momentum_slot_without_momentum():
    sgd = OPTION_PRESETS["sgd"]
    mine = costmodel.plan_bytes(SPECS, LAYOUTS, MESH, sgd, "auto")
    ref = costmodel.plan_bytes(SPECS, LAYOUTS, MESH, sgd, "reference")
    assert mine.momentum_per_device == 0 and mine.params_per_device == 25600
    assert ref.momentum_per_device == 25600  # tf_keras makes the slot even with momentum=0


def test_bytes_sharded_state_zero1():
    b = costmodel.plan_bytes(SPECS, LAYOUTS, MESH, OPTION_PRESETS["momentum"], "sharded_state")
    # as sharded_state lays its slots out (meshspec.zero1_entries): a uses both axes (16384 stays); b takes the
    # largest free axis, model=4 -> 1024 / 4 = 256; c: batch on dim 0 (64 % 2 == 0) -> 8192 / 2 = 4096
    assert b.momentum_per_device == 16384 + 256 + 4096
    assert meshspec.zero1_entries((U,), MESH, (256,)) == ["model"]
    assert meshspec.zero1_entries((U, "model"), MESH, (64, 256)) == ["batch", "model"]
    assert meshspec.zero1_entries(("model",), MESH, (256,)) == ["model"]  # no unsharded dimension: as it is


def test_bytes_replicated_vs_sharded_bert_mini():
    specs = get_workload("bert-mini")
    n = sum(s.size for s in specs)
    repl = costmodel.plan_bytes(specs, [plans.replicated(s) for s in specs], MESH, OPTION_PRESETS["momentum"])
    assert repl.params_per_device == 4 * n and repl.momentum_per_device == 4 * n


# ------------------------------------------------------------------------------- collectives
def test_collectives_none_for_plain_momentum():
    assert costmodel.step_collectives(SPECS, LAYOUTS, MESH, OPTION_PRESETS["momentum"]) == []
    assert costmodel.step_collectives(SPECS, LAYOUTS, MESH, OPTION_PRESETS["momentum"], "reference") == []


def test_collectives_global_norm_dsgd_one_vs_reference_per_variable():
    full = OPTION_PRESETS["full"]
    mine = costmodel.step_collectives(SPECS, LAYOUTS, MESH, full, "auto")
    assert len(mine) == 1 and mine[0].kind == "all-reduce" and mine[0].group == 8
    assert mine[0].payload_bytes == 4 * 3 and mine[0].count == 1 and mine[0].steps == 3
    ref = costmodel.step_collectives(SPECS, LAYOUTS, MESH, full, "reference")
    assert sorted((c.axes, c.group, c.count) for c in ref) == [(("batch", "model"), 8, 1), (("model",), 4, 1)]
    f = costmodel.features(SPECS, LAYOUTS, MESH, full, "reference")
    assert f["collective_steps"] == 3 + 2 and f["n_collectives"] == 2
    # replicated everything: the reference needs no reduction at all, dsgd still its one
    repl = [plans.replicated(s) for s in SPECS]
    assert costmodel.step_collectives(SPECS, repl, MESH, full, "reference") == []
    assert len(costmodel.step_collectives(SPECS, repl, MESH, full, "auto")) == 1


def test_collectives_sharded_state_all_gathers():
    cs = costmodel.step_collectives(SPECS, LAYOUTS, MESH, OPTION_PRESETS["momentum"], "sharded_state")
    assert len(cs) == 1 and cs[0].kind == "all-gather" and cs[0].count == 2 and cs[0].axes == ("batch",)


def test_devices_per_host_caps_local_devices():
    big = [("batch", 16), ("model", 64)]
    specs = [VarSpec("w", (1024, 4096))]
    f = costmodel.features(specs, [(U, "model")], big, OPTION_PRESETS["momentum"], devices_per_host=8)
    assert f["local_devices"] == 8 and f["var_device_ops"] == 8
    # per device: 1024 x 64 floats; the host moves 8 devices' worth, 5 passes
    assert f["params_bytes_per_device"] == 1024 * 64 * 4
    assert f["host_bytes"] == 1024 * 64 * 4 * 5 * 8


# ------------------------------------------------------------------------------- fitting
def test_nnls_matches_lstsq_when_positive_and_clamps_otherwise(rng):
    A = rng.uniform(0, 1, (40, 4))
    x = np.array([1.0, 2.0, 0.5, 3.0])
    assert np.allclose(costmodel.nnls(A, A @ x), x, atol=1e-8)
    b = A @ np.array([1.0, -2.0, 0.5, 3.0])
    got = costmodel.nnls(A, b)
    assert (got >= 0).all() and got[1] == 0.0
    # it is the best non-negative fit: no feasible perturbation improves it
    base = np.linalg.norm(A @ got - b)
    for k in range(4):
        for d in (1e-3, -1e-3):
            y = got.copy()
            y[k] = max(0.0, y[k] + d)
            assert np.linalg.norm(A @ y - b) >= base - 1e-9


def _synthetic_rows(truth: dict, rng, noise=0.01):
    rows = []
    for w in ("one-big", "bert-mini", "many-small", "resnet-ish"):
        specs = get_workload(w)
        for mesh in costmodel.FIT_MESHES + costmodel.TEST_MESHES:
            dims = meshspec.parse_mesh_spec(mesh)
            for p in costmodel.validation_plans(specs, dims):
                for opt in ("momentum", "full"):
                    f = costmodel.features(specs, p.layouts, dims, OPTION_PRESETS[opt], "auto", cores=2)
                    t = sum(truth[k] * f[k] for k in costmodel.FEATURES) * (1 + noise * rng.standard_normal())
                    rows.append({**f, "workload": w, "mesh": mesh, "plan": p.name, "implementation": "auto",
                                 "options": opt, "median_ms": t, "measured_bytes_per_device": f["bytes_per_device"]})
    return rows


TRUTH = {"const": 0.4, "host_bytes": 1 / 20e6, "lane_bytes": 1 / 40e6, "variables": 0.02, "var_device_ops": 0.003,
         "parallel_var_device_ops": 0.03, "multi_device": 0.2, "collective_steps": 0.15}


def test_fit_recovers_known_costs(rng):
    rows = _synthetic_rows(TRUTH, rng, noise=0.0)
    model = costmodel.CostModel.fit(rows)
    for opt in ("momentum", "full"):
        c = model.fits[("auto", opt)].coef
        for k in ("const", "host_bytes", "lane_bytes", "variables", "var_device_ops", "parallel_var_device_ops",
                  "multi_device"):
            assert c[k] == pytest.approx(TRUTH[k], rel=1e-6), (opt, k)
    assert model.fits[("auto", "full")].coef["collective_steps"] == pytest.approx(TRUTH["collective_steps"], rel=1e-6)
    assert model.fits[("auto", "momentum")].coef["collective_steps"] == 0.0  # no collectives seen: no cost


def test_validate_on_synthetic_data_predicts_8_devices(rng):
    rows = _synthetic_rows(TRUTH, rng, noise=0.02)
    per_row, summary, model = costmodel.validate(rows)
    assert set(per_row["mesh"]) == set(costmodel.TEST_MESHES)
    assert len(summary) == 8  # 4 workloads x 2 option presets
    assert (summary["max_abs_error_pct"] < 10).all()
    assert summary["bytes_exact"].all()
    # identical work on the three 8-device meshes: its spread is the noise floor (2% noise here)
    assert (summary["noise_pct"] < 6).all() and (summary["vs_consensus_pct"] < 10).all()
    # a wrong byte count is caught
    rows[-1]["measured_bytes_per_device"] += 4
    _, summary2, _ = costmodel.validate(rows)
    assert not summary2["bytes_exact"].all()


# ------------------------------------------------------------------------------- real measurements
# The validation grid measured on this project's 2-core machine with dsgd 2193260 (the format
# `dsgd layouts --validate --save-measurements` wrote then: no host_cores, no per-variable or
# per-lane features), three passes, each job's median pass (measurements.combine_repeats).
MEASURED = Path(__file__).parent / "data" / "layouts_validation_measurements.jsonl.gz"

# mean |error| per (workload, implementation) the model reaches on them, with a little slack; a
# model change that loses accuracy fails here.  The model of 2193260 (no per-variable or per-lane
# term) on the same file: many-small reference 25.0% mean (this one 12.5), resnet-ish reference
# 30.0 / 77.7 max (26.2 / 47.1), bert-mini reference 13.9 / 29.0 max (16.0 / 21.5); dsgd's the same.
MEAN_ERROR_BOUND = {("bert-mini", "auto"): 10, ("bert-mini", "reference"): 18, ("many-small", "auto"): 31,
                    ("many-small", "reference"): 15, ("resnet-ish", "auto"): 18, ("resnet-ish", "reference"): 29,
                    ("one-big", "auto"): 43, ("one-big", "reference"): 23}


def test_refit_of_measurements_saved_by_an_older_version():
    from dsgd.advisor import measurements

    raw = measurements.load_measurements(str(MEASURED))
    assert len(raw) == 120 and not any("variables" in r or "host_cores" in r for r in raw), "the old format"
    rows = measurements.refresh_features(raw)
    assert all(r["host_cores"] >= 1 and r["variables"] >= 1 for r in rows)
    per_row, summary, model = costmodel.validate(rows)
    assert summary["bytes_exact"].all() and len(summary) == 8
    got = {(r.workload, r.implementation): r.mean_abs_error_pct for r in summary.itertuples()}
    over = {k: round(v, 1) for k, v in got.items() if v > MEAN_ERROR_BOUND[k]}
    assert not over, over
    # the thread-pool term carries tf_keras' per-device kernels (several logical devices, 2 cores)
    assert model.fits[("reference", "momentum")].coef["parallel_var_device_ops"] > 0


def test_combine_repeats_keeps_each_jobs_median_pass():
    from dsgd.advisor import measurements

    base = {"workload": "w", "mesh": "batch=2", "plan": "replicated", "implementation": "auto", "options": "momentum"}
    rows = [dict(base, median_ms=12.0), dict(base, median_ms=10.0), dict(base, median_ms=15.0),
            dict(base, plan="two", median_ms=9.0), dict(base, plan="two", median_ms=7.0),
            dict(base, plan="batch", median_ms=5.0), dict(base, plan="x", status="failed", error="boom")]
    got = {r["plan"]: r for r in measurements.combine_repeats(rows)}
    assert got["replicated"]["median_ms"] == 12.0 and got["replicated"]["repeats"] == 3
    assert got["replicated"]["repeat_spread_pct"] == pytest.approx(50.0)
    assert got["two"]["median_ms"] == 7.0  # of two, the faster
    assert got["batch"]["repeats"] == 1 and got["x"]["status"] == "failed"


def test_load_measurements_reads_what_an_interrupted_run_left(tmp_path, capsys):
    """A run killed while writing (``--save-measurements``): a .gz without its end, a last line cut in
    two.  What was written is read and the cut line skipped with a warning; a bad line elsewhere is an error."""
    from dsgd.advisor import measurements
    from dsgd.workloads import WorkloadError

    rows = [{"workload": "w", "mesh": "batch=2", "median_ms": float(k)} for k in range(1, 4)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(text.encode())[:-12])  # no end-of-stream, the last line cut short
    got = measurements.load_measurements(str(cut))
    assert 1 <= len(got) <= 2 and got == rows[:len(got)]
    assert "cut short" in capsys.readouterr().err
    plain = tmp_path / "cut.jsonl"
    plain.write_text(text[:-10])
    assert measurements.load_measurements(str(plain)) == rows[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text.replace("batch=2", 'batch"=2', 1))
    with pytest.raises(WorkloadError, match="line 1 is not valid JSON"):
        measurements.load_measurements(str(bad))


def test_pass_noise_splits_what_a_block_shares_from_the_rest():
    """A block (the jobs of one workload on one mesh in one pass) sped up or slowed down as a whole
    shows in ``block_pct``; jobs moving on their own in ``within_pct``; one pass gives None."""
    from dsgd.advisor import measurements

    rng = np.random.default_rng(0)

    def grid(block_sd, job_sd, passes=6):
        rows = []
        for _ in range(passes):
            for mesh in ("batch=1", "batch=2", "batch=4", "batch=8"):
                f = np.exp(rng.normal(0, block_sd))
                for plan in ("replicated", "batch", "model", "batch+model"):
                    rows.append({"workload": "w", "mesh": mesh, "plan": plan, "implementation": "auto",
                                 "options": "momentum", "median_ms": 10 * f * np.exp(rng.normal(0, job_sd))})
        return rows

    spells = measurements.pass_noise([grid(0.2, 0.0)])
    assert spells["within_pct"] < 1e-6 and 10 < spells["block_pct"] < 30 and spells["passes"] == 6
    alone = measurements.pass_noise([grid(0.0, 0.2)])
    assert alone["within_pct"] > 1.5 * alone["block_pct"] and 10 < alone["within_pct"] < 30
    # two files of 3 passes each count as 6 passes of each job; a job's median of them: ~ 1.25 SD / sqrt(6)
    two = measurements.pass_noise([grid(0.2, 0.0, 3), grid(0.2, 0.0, 3)])
    assert two["passes"] == 6 and two["target_pct"] == pytest.approx(
        np.sqrt(np.pi / 2) * np.hypot(two["block_pct"], two["within_pct"]) / np.sqrt(6), rel=0.05)
    assert measurements.pass_noise([grid(0.2, 0.1, 1)]) is None


def test_validate_cli_refits_several_saved_files(tmp_path, capsys):
    from dsgd.advisor import measurements
    from dsgd.cli import main

    rows = measurements.load_measurements(str(MEASURED))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    # the files --save-measurements writes: JSON lines, gzip-compressed for .gz
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b.write_bytes(gzip.compress("".join(json.dumps(dict(r, median_ms=r["median_ms"] * 1.5)) + "\n"  # a slower pass
                                        for r in rows).encode()))
    assert main(["layouts", "--validate", "--from-measurements", str(a), "--from-measurements", str(b)]) == 0
    out = capsys.readouterr().out
    assert "goal_met" in out and "bert-mini" in out and "us_per_var_device_per_lane" in out
    assert "pass to pass (2 passes per job)" in out  # a.jsonl and b.jsonl.gz: two passes of each job
    assert main(["layouts", "--validate", "--from-measurements", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the saved validation grids
# Six validation grids measured on idle machines (load < 2; 2-core VMs of one kind), each with `dsgd layouts
# --validate --repeats N --save-measurements`, re-fitted by this version's model (features refreshed, as
# `--from-measurements` does; each job's median pass).  Each grid's table holds the model's mean / max |error|
# per (workload, implementation), with a little slack: a change to the model or to how passes combine that loses
# accuracy fails here.  On A-C what is left is mostly the machine (the same work on two meshes of one size
# measured up to 1.6x apart); on D, whose noise floor is 2-4%, steps that do not grow from 4 to 8 devices as they
# did from 1 to 4 (docs/layouts.md, "How good are the predictions?").
DATA = Path(__file__).parent / "data"
_WA, _WR = "auto", "reference"


def _pairs(*items) -> frozenset:
    return frozenset(items)


@dataclass(frozen=True)
class Grid:
    """One saved grid: its file, how it was measured, and the error bounds the model keeps on it."""

    file: str
    how: str
    bound: dict  # (workload, implementation) -> (mean |error| %, max |error| %)


GRIDS = {
    "A": Grid("layouts_validation_idle.jsonl.gz", "dsgd c4bc01b, one worker for the whole grid, 3 passes",
              {("one-big", _WA): (11, 19), ("one-big", _WR): (9, 14), ("bert-mini", _WA): (7, 11),
               ("bert-mini", _WR): (10, 20), ("resnet-ish", _WA): (21, 57), ("resnet-ish", _WR): (15, 30),
               ("many-small", _WA): (15, 32), ("many-small", _WR): (14, 23)}),
    "B": Grid("layouts_validation_idle2.jsonl.gz", "another VM, dsgd c8c06ab, one worker for the grid, 3 passes",
              {("one-big", _WA): (22, 45), ("one-big", _WR): (34, 56), ("bert-mini", _WA): (6, 8),
               ("bert-mini", _WR): (10, 15), ("resnet-ish", _WA): (10, 28), ("resnet-ish", _WR): (18, 35),
               ("many-small", _WA): (13, 19), ("many-small", _WR): (13, 16)}),
    "C": Grid("layouts_validation_idle3.jsonl.gz", "dsgd b1059eb, a fresh worker per workload and mesh, 3 passes",
              {("one-big", _WA): (8, 15), ("one-big", _WR): (11, 30), ("bert-mini", _WA): (5, 7),
               ("bert-mini", _WR): (8, 12), ("resnet-ish", _WA): (18, 32), ("resnet-ish", _WR): (15, 27),
               ("many-small", _WA): (15, 21), ("many-small", _WR): (5, 8)}),
    "D": Grid("layouts_validation_idle4.jsonl.gz", "as C, a mesh's jobs timed interleaved in rounds (dsgd a3a97dd)",
              {("one-big", _WA): (5, 10), ("one-big", _WR): (10, 17), ("bert-mini", _WA): (8, 15),
               ("bert-mini", _WR): (12, 22), ("resnet-ish", _WA): (10, 26), ("resnet-ish", _WR): (17, 40),
               ("many-small", _WA): (18, 25), ("many-small", _WR): (4, 9)}),
    "E": Grid("layouts_validation_idle5.jsonl.gz", "as D (dsgd 4d5ef48), after the pooled A-D result was written down",
              {("one-big", _WA): (10, 18), ("one-big", _WR): (10, 25), ("bert-mini", _WA): (12, 19),
               ("bert-mini", _WR): (7, 11), ("resnet-ish", _WA): (9, 18), ("resnet-ish", _WR): (7, 16),
               ("many-small", _WA): (20, 26), ("many-small", _WR): (13, 20)}),
    "F": Grid("layouts_validation_idle6.jsonl.gz", "one session, nine passes (dsgd b1bad62; --repeats 12 stopped after "
              "pass 9 as fixed before passes 6-9 were seen; 2 h)",
              {("one-big", _WA): (9, 16), ("one-big", _WR): (7, 10), ("bert-mini", _WA): (5, 7),
               ("bert-mini", _WR): (12, 16), ("resnet-ish", _WA): (17, 38), ("resnet-ish", _WR): (17, 38),
               ("many-small", _WA): (29, 48), ("many-small", _WR): (8, 10)}),
}


@dataclass(frozen=True)
class GridCase:
    """What one grid shows, re-fitted alone: which pairs meet the 15% / 30% goal, and checks of how it was
    measured (``rounds`` per job, the noise floor, the passes and their pass-to-pass noise)."""

    grid: str
    met_includes: frozenset = frozenset()
    met_excludes: frozenset = frozenset()
    met_count: Optional[int] = None
    met_exactly: Optional[frozenset] = None
    rounds: Optional[int] = None  # every row timed in this many interleaved rounds
    noise_below: Optional[float] = None  # the noise floor of every pair (%)
    repeats: Optional[int] = None  # every job's passes
    pass_noise: Optional[tuple] = None  # (passes, block % above, block % below, within % below)


GRID_CASES = [
    pytest.param(GridCase("A", met_includes=frozenset({(w, _WR) for w in costmodel.VALIDATION_WORKLOADS})
                          | _pairs(("one-big", _WA), ("bert-mini", _WA))), id="A-idle"),
    pytest.param(GridCase("B", met_includes=_pairs(("bert-mini", _WA), ("bert-mini", _WR), ("resnet-ish", _WA),
                                                   ("many-small", _WA), ("many-small", _WR))), id="B-second-idle"),
    pytest.param(GridCase("C", met_count=7, met_excludes=_pairs(("resnet-ish", _WA))), id="C-fresh-worker-per-mesh"),
    # D's misses: sharded tf_keras resnet-ish is faster on 8 devices than on 4 here (scripts/per_device_cost.py
    # --workload resnet-ish), and D's replicated dsgd many-small on 8 devices is the fastest of the four grids
    # (7.4-8.1 ms; 7.4-16.7 on A-D); its noise floor is 2-4% for every pair, against 2-13% on C
    pytest.param(GridCase("D", met_count=6, met_excludes=_pairs(("resnet-ish", _WR), ("many-small", _WA)),
                          rounds=4, noise_below=5), id="D-interleaved"),
    # E: alone 7 of 8 (replicated dsgd many-small misses, 18.8 / 24.6)
    pytest.param(GridCase("E", met_count=7, met_excludes=_pairs(("many-small", _WA))), id="E-after-the-pooled-claim"),
    # F: 5 of 8, as each of its 3-pass thirds: more passes in one session do not reach the goal here.  Misses:
    # many-small dsgd 26.8 / 46.1, resnet-ish 15.4 / 36.0 and 15.1 / 36.0.  Its jobs measured together moved
    # together by 14% from pass to pass and against each other by 6%
    pytest.param(GridCase("F", met_exactly=_pairs(("one-big", _WA), ("one-big", _WR), ("bert-mini", _WA),
                                                  ("bert-mini", _WR), ("many-small", _WR)),
                          repeats=9, pass_noise=(9, 10, 20, 8)), id="F-nine-passes"),
]


@pytest.mark.parametrize("case", GRID_CASES)
def test_model_accuracy_on_a_saved_grid(case: GridCase):
    """Each grid re-fitted alone: no pair's error past its bound, and the pairs that meet the goal as recorded."""
    from dsgd.advisor import measurements

    grid = GRIDS[case.grid]
    rows = measurements_for(DATA / grid.file)
    assert len(rows) == 120
    _, summary, _ = costmodel.validate(rows)
    assert summary["bytes_exact"].all() and len(summary) == 8
    over = {(r.workload, r.implementation): (round(r.mean_abs_error_pct, 1), round(r.max_abs_error_pct, 1))
            for r in summary.itertuples()
            if r.mean_abs_error_pct > grid.bound[(r.workload, r.implementation)][0]
            or r.max_abs_error_pct > grid.bound[(r.workload, r.implementation)][1]}
    assert not over, over
    met = {(r.workload, r.implementation) for r in summary.itertuples() if r.goal_met}
    assert case.met_includes <= met and case.met_excludes.isdisjoint(met), met
    if case.met_count is not None:
        assert len(met) == case.met_count, met
    if case.met_exactly is not None:
        assert met == case.met_exactly
    if case.rounds is not None:
        assert all(r["rounds"] == case.rounds for r in rows)
    if case.noise_below is not None:
        assert summary["noise_pct"].max() < case.noise_below
    if case.repeats is not None:
        assert all(r["repeats"] == case.repeats for r in rows)
    if case.pass_noise is not None:
        passes, block_above, block_below, within_below = case.pass_noise
        noise = measurements.pass_noise([measurements.load_measurements(str(DATA / grid.file))])
        assert noise["passes"] == passes and block_above < noise["block_pct"] < block_below
        assert noise["within_pct"] < within_below


@dataclass(frozen=True)
class PooledCase:
    """Several grids pooled (``--from-measurements`` once per file): each job's median of all its passes, the
    best estimate of its step time here.  ``missed``: the pairs that do not meet the goal."""

    grids: str
    repeats: int
    missed: frozenset
    mean_below: float
    max_below: float
    bytes_exact: bool = True  # also check the bytes and that the summary has all 8 pairs


POOLED_CASES = [
    # A-D: the goal met for all 8 pairs; a single grid's 3 passes meet it for 5-7, as the 8-device readings vary
    # between sessions (replicated dsgd many-small on 8 devices: 7.4-16.7 ms)
    pytest.param(PooledCase("ABCD", 12, frozenset(), 14, 24), id="A-D"),
    # A-E: all 8 (worst: tf_keras resnet-ish, 11.9 / 20.3)
    pytest.param(PooledCase("ABCDE", 15, frozenset(), 13, 22), id="A-E"),
    # A-F (24 passes per job, 9 of them F's): F's replicated dsgd many-small pulls that pair past the goal
    # (17.9 / 31.0); the A-D and A-E pooled claims do not survive a sixth session
    pytest.param(PooledCase("ABCDEF", 24, _pairs(("many-small", _WA)), 19, 32, bytes_exact=False), id="A-F"),
]


@pytest.mark.parametrize("case", POOLED_CASES)
def test_model_accuracy_on_pooled_grids(case: PooledCase):
    rows = measurements_for(*(DATA / GRIDS[g].file for g in case.grids))
    assert len(rows) == 120 and all(r["repeats"] == case.repeats for r in rows)
    _, summary, _ = costmodel.validate(rows)
    if case.bytes_exact:
        assert summary["bytes_exact"].all() and len(summary) == 8
    missed = {(r.workload, r.implementation) for r in summary.itertuples() if not r.goal_met}
    assert missed == case.missed, summary
    assert summary["mean_abs_error_pct"].max() < case.mean_below and summary["max_abs_error_pct"].max() < case.max_below


def measurements_for(*paths: Path) -> list[dict]:
    """The grids saved in ``paths`` as ``--from-measurements`` reads them: refreshed, each job's median pass."""
    from dsgd.advisor import measurements

    return measurements.combine_repeats(sum((measurements.refresh_features(measurements.load_measurements(str(p)))
                                             for p in paths), []))


def test_per_device_cost_script(tmp_path):
    """scripts/per_device_cost.py (the README's direct look at the per-(variable, device) term) as a
    user runs it: the reference's step on 1, 2, 4 and 8 devices, replicated and sharded."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def run(*args):
        proc = subprocess.run([sys.executable, "scripts/per_device_cost.py", "--rounds", "2", "--steps", "2", *args],
                              capture_output=True, text=True, cwd=root, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [line.split() for line in proc.stdout.splitlines() if "1/2/4/8 devices" in line]
        for r in rows:
            ms = [float(x) for x in r[r.index("devices:") + 1:r.index("devices:") + 8:2]]
            assert len(ms) == 4 and all(m > 0 for m in ms), r
        return {r[0]: int(r[1]) for r in rows}  # group -> variables

    assert run("--variables", "3", "--shape", "16,8") == {"replicated": 3, "sharded": 3}
    model = tmp_path / "two.json"  # one variable large enough to shard, one too small
    model.write_text(json.dumps([{"name": "w", "shape": [4096, 64], "dtype": "float32"},
                                 {"name": "b", "shape": [64], "dtype": "float32"}]))
    assert run("--workload", str(model)) == {"all": 2, "sharded": 1, "replicated": 1}
