"""``dsgd layouts``: plan enumeration and pruning, layout maps (emitted, loaded, used by a
tf_keras model), bad inputs, and a small end-to-end run in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsgd import layoutmap, meshspec
from dsgd.advisor import advice as advice_mod, plans, ranking, read_model, report
from dsgd.workloads import VarSpec, WorkloadError, get_workload

U = "unsharded"
MESH = [("batch", 2), ("model", 4)]
ROOT = Path(__file__).resolve().parents[1]


def test_enumerate_plans_bert_mini_rules():
    specs = get_workload("bert-mini")
    ps = plans.enumerate_plans(specs, MESH)
    names = [p.name for p in ps]
    assert names[0] == "replicated" and len(ps) <= 8
    assert len({p.layouts for p in ps}) == len(ps)  # de-duplicated
    assert {"model", "batch", "batch+model", "model/top90"} <= set(names)
    by = {p.name: dict(zip([s.name for s in specs], p.layouts)) for p in ps}
    # largest dimension that divides: the embedding's 256 columns (30522 rows do not divide by 4)
    assert by["model"]["embeddings/word_embeddings"] == (U, "model")
    assert by["model"]["encoder/layer_0/intermediate/kernel"] == (U, "model")  # (256, 1024)
    assert by["model"]["encoder/layer_0/output/kernel"] == ("model", U)  # (1024, 256)
    # 2-D: the larger axis on the largest dimension, the other on the next
    assert by["batch+model"]["embeddings/word_embeddings"] == ("batch", "model")
    # threshold: biases and layer norms (1 KiB) stay replicated
    for p in ps:
        assert by[p.name]["encoder/layer_0/attention/query/bias"] == (U,)
        assert by[p.name]["embeddings/layer_norm/gamma"] == (U,)
    # tied variables share a layout in every plan
    for g in plans.tie_groups(specs):
        for p in ps:
            assert len({p.layouts[i] for i in g}) == 1
    # "largest first": the top plan shards fewer variables, but the largest one
    top, full = next(p for p in ps if p.name == "model/top90"), next(p for p in ps if p.name == "model")
    assert 0 < top.sharded_count() < full.sharded_count()
    assert by["model/top90"]["embeddings/word_embeddings"] == (U, "model")


def test_plan_search_says_why_plans_are_not_candidates():
    # many-small: every variable is under --min-shard-bytes, so only 'replicated' is a candidate -- and it says so
    s = plans.search_plans(get_workload("many-small"), MESH)
    assert [p.name for p in s.plans] == ["replicated"]
    (note,) = s.left_out()
    assert note.status == "not built" and "--min-shard-bytes" in note.why and "16384" in note.why, note
    assert any("400 of 400 variables" in g for g in s.general)
    # one device: nothing to shard over
    one = plans.search_plans(get_workload("bert-mini"), [("batch", 1)])
    assert [p.name for p in one.plans] == ["replicated"] and "one device" in one.left_out()[0].why
    # one-big: covering 90% takes its only variable, so no '/top90' plans; --max-plans cuts the rest
    big = plans.search_plans(get_workload("one-big"), MESH, max_plans=2)
    why = {n.name: (n.status, n.why) for n in big.notes}
    assert why["replicated"][0] == why["batch+model"][0] == "candidate"
    assert why["model/top90"][0] == "not built" and "would equal 'model'" in why["model/top90"][1]
    assert why["model"][0] == why["batch"][0] == "over --max-plans"
    # a plan that comes out the same as another is merged, and named
    same = plans.search_plans([VarSpec("w", (1024, 6))], [("model", 4)], min_shard_bytes=0)
    assert [p.name for p in same.plans] == ["replicated", "model"]
    assert plans.enumerate_plans(get_workload("bert-mini"), MESH) == plans.search_plans(get_workload("bert-mini"), MESH).plans


def test_render_says_what_was_considered_and_why_each_mesh_was_measured():
    specs = get_workload("many-small")
    search = plans.search_plans(specs, MESH)
    advice = advice_mod.Advice("many-small", "batch=2,model=4", "momentum", "auto", specs, search.plans, None, [], None,
                            plan_search=search, measured_meshes=[
                                {"mesh": "batch=2,model=4", "plans": ["replicated"], "why": "the mesh to advise on (--mesh)"},
                                {"mesh": "batch=1", "plans": ["replicated"], "why": "calibration for the cost model only"}])
    text = "\n".join(report.render_considered(advice))
    assert "candidate plans on batch=2,model=4 (1, built by rules" in text
    assert "not candidates:\n  - (any sharded plan): no variable reaches --min-shard-bytes" in text
    assert "  - batch=1 [replicated]: calibration for the cost model only" in text
    doc = report._search_dict(search)
    assert doc["plans"] == ["replicated"] and doc["considered"][-1]["status"] == "not built"


def test_tie_groups_by_shape_and_stem():
    specs = [VarSpec("l0/q/kernel", (8, 8)), VarSpec("l1/q/kernel", (8, 8)), VarSpec("l2/q/kernel", (8, 4)),
             VarSpec("l0/k/kernel", (8, 8))]
    assert plans.tie_groups(specs) == [[0, 1], [2], [3]]


def test_min_shard_bytes_and_single_axis_mesh():
    specs = [VarSpec("big", (1024, 1024)), VarSpec("small", (64, 64))]
    ps = plans.enumerate_plans(specs, [("batch", 8)], min_shard_bytes=1 << 20)
    assert [p.name for p in ps] == ["replicated", "batch"]
    assert ps[1].layouts == (("batch", U), (U, U))
    assert plans.enumerate_plans(specs, [("batch", 1)])[0].name == "replicated"
    assert len(plans.enumerate_plans(specs, [("batch", 1)])) == 1  # nothing to shard on


def test_forced_layouts_and_errors_name_the_variable():
    specs = [VarSpec("emb", (30522, 256)), VarSpec("w", (256, 256))]
    ps = plans.enumerate_plans(specs, MESH, force=["^emb$=replicated"])
    assert all(p.layouts[0] == (U, U) for p in ps)
    with pytest.raises(plans.PlanError, match=r"'emb'.*dimension 0 \(size 30522\) does not divide.*'model'"):
        plans.enumerate_plans(specs, MESH, force=["emb=model,unsharded"])
    with pytest.raises(plans.PlanError, match=r"variable 'odd'.*axis 'model'.*no candidate layout fits"):
        plans.enumerate_plans([VarSpec("odd", (3, 5))], MESH, force=["odd=model"])
    with pytest.raises(plans.PlanError, match="REGEX=LAYOUT"):
        plans.enumerate_plans(specs, MESH, force=["nonsense"])
    with pytest.raises(plans.PlanError, match="'w'.*not an axis"):
        plans.enumerate_plans(specs, MESH, force=["^w$=unsharded,tensor"])


# ------------------------------------------------------------------------------- layout maps
def test_plan_layout_map_compresses_tied_groups_and_round_trips():
    specs = get_workload("bert-mini")
    p = next(p for p in plans.enumerate_plans(specs, MESH) if p.name == "model")
    m = layoutmap.emit(specs, p.layouts, groups=plans.tie_groups(specs))
    assert m["^encoder/layer_\\d+/intermediate/kernel$"] == "unsharded,model"
    assert len(m) < p.sharded_count()  # 4 layers share one entry
    assert layoutmap.apply(m, specs) == p.layouts
    exact = layoutmap.emit(specs, p.layouts)
    assert layoutmap.apply(exact, specs) == p.layouts
    assert all(k.startswith("^") and k.endswith("$") for k in exact)


def test_emitted_layout_map_loads_and_is_used_by_a_tf_keras_model(tmp_path, meshes):
    import tensorflow as tf
    import tf_keras
    from tensorflow.experimental import dtensor

    mod = tmp_path / "tinymodel.py"
    mod.write_text(textwrap.dedent("""
        import tf_keras
        def build():
            inputs = tf_keras.Input((16,), batch_size=8)
            x = tf_keras.layers.Dense(32, name="d1")(inputs)
            out = tf_keras.layers.Dense(8, name="d2")(x)
            return tf_keras.Model(inputs, out)
    """))
    # the variables are read by the keys tf_keras' LayoutMap looks them up with (in-process here;
    # the CLI does it in a worker)
    res = read_model.read_model_variables({"target": f"{mod}:build"})
    specs = [VarSpec(v["name"], tuple(v["shape"]), v["dtype"]) for v in res["variables"]]
    assert [(s.name, s.shape) for s in specs] == [("d1.kernel", (16, 32)), ("d1.bias", (32,)),
                                                 ("d2.kernel", (32, 8)), ("d2.bias", (8,))]
    plan = next(p for p in plans.enumerate_plans(specs, MESH, min_shard_bytes=0) if p.name == "model")
    assert plan.layouts == ((U, "model"), ("model",), ("model", U), ("model",))
    path = tmp_path / "layouts.json"
    layoutmap.write(path, specs, plan.layouts, mesh="batch=2,model=4", plan=plan.name, groups=plans.tie_groups(specs))
    mesh = meshes("batch=2,model=4")
    lmap = layoutmap.load_layout_map(path, mesh)  # one call
    assert isinstance(lmap, tf_keras.dtensor.experimental.LayoutMap)
    with lmap.scope():  # tf_keras.dtensor.experimental.LayoutMap.scope (layout_map_scope)
        inputs = tf_keras.Input((16,), batch_size=8)
        x = tf_keras.layers.Dense(32, name="d1")(inputs)
        out = tf_keras.layers.Dense(8, name="d2")(x)
        model = tf_keras.Model(inputs, out)
    got = {v.name.split(":")[0]: tuple(dtensor.fetch_layout(v).sharding_specs) for v in model.trainable_variables}
    assert got == {"d1/kernel": (U, "model"), "d1/bias": ("model",), "d2/kernel": ("model", U), "d2/bias": ("model",)}
    assert all(dtensor.fetch_layout(v).mesh == mesh for v in model.trainable_variables)
    # and the same file drives dsgd's own layout policy
    from dsgd.layoutmap import layout_entries

    assert [tuple(layout_entries(s, MESH, str(path))) for s in specs] == list(plan.layouts)


def test_load_layout_map_rejects_unknown_axes(tmp_path, meshes):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"layouts": {"^w$": "unsharded,tensor"}}))
    with pytest.raises(meshspec.SpecError, match="tensor"):
        layoutmap.load_layout_map(path, meshes("batch=2,model=4"))


# ------------------------------------------------------------------------------- bad input
def test_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"name": "w", "shape": [4, 4]},\n {"name": "v" "shape": [4]}\n]\n')
    with pytest.raises(WorkloadError, match=rf"{p}.*not valid JSON: line 3"):
        read_model.load_model(str(p))
    lm = tmp_path / "badmap.json"
    lm.write_text('{\n "^w$": "model",\n}')
    with pytest.raises(WorkloadError, match=rf"{lm}.*line 3"):
        layoutmap.read(lm)


def test_non_integer_dimension_names_the_variable(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps([{"name": "ok", "shape": [4]}, {"name": "enc/kernel", "shape": [4, "8"]}]))
    with pytest.raises(WorkloadError, match=r"'enc/kernel'.*positive integers"):
        read_model.load_model(str(p))


def test_mesh_that_does_not_fit_and_unknown_model():
    with pytest.raises(meshspec.SpecError, match=r"needs 16 devices.*--devices 16"):
        advice_mod.advise("bert-mini", "batch=4,model=4", devices=8)
    with pytest.raises(meshspec.SpecError, match="integer"):
        advice_mod.advise("bert-mini", "batch=two", devices=8)
    with pytest.raises(WorkloadError, match="not a named workload"):
        read_model.load_model("no-such-model")


# ------------------------------------------------------------------------------- ranking
def test_rank_prefers_fewest_bytes_within_noise_and_skips_fsdp():
    import pandas as pd

    df = pd.DataFrame([
        {"plan": "replicated", "axes": "-", "bytes_per_device": 800, "step_ms": 10.0, "n_collectives": 0},
        {"plan": "model", "axes": "model", "bytes_per_device": 200, "step_ms": 10.5, "n_collectives": 0},
        {"plan": "batch+model", "axes": "batch+model", "bytes_per_device": 100, "step_ms": 9.0, "n_collectives": 0},
        {"plan": "slow", "axes": "model", "bytes_per_device": 100, "step_ms": 20.0, "n_collectives": 0},
    ]).assign(sharded_vars=1, vars=2, sharded_bytes_frac=0.5, collectives=[[]] * 4, speedup=1.0)
    r = ranking.rank(df, "step_ms", data_axes={"batch"})
    assert r.iloc[0]["plan"] == "model" and r.iloc[0]["recommended"] and r.iloc[0]["rank"] == 1
    assert "FSDP" in r.set_index("plan").loc["batch+model", "reasons"]
    r2 = ranking.rank(df, "step_ms", data_axes={"batch"}, allow_fsdp=True)
    assert r2.iloc[0]["plan"] == "batch+model"
    r3 = ranking.rank(df, "step_ms", data_axes={"batch"}, memory_budget=150)
    assert r3.iloc[0]["plan"] == "slow"


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_end_to_end_tiny_json(tmp_path):
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps([
        {"name": "emb/table", "shape": [512, 64], "dtype": "float32"},
        {"name": "layer_0/kernel", "shape": [64, 128]},
        {"name": "layer_1/kernel", "shape": [64, 128]},
        {"name": "layer_0/bias", "shape": [128]},
    ]))
    out_png, out_map, out_json = tmp_path / "out.png", tmp_path / "map.json", tmp_path / "advice.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "dsgd", "layouts", "--model", str(model), "--mesh", "model=2", "--devices", "2",
           "--target-mesh", "batch=4,model=8", "--min-shard-bytes", "4096", "--steps", "2",
           "--calibration-meshes", "", "--max-plans", "2", "--plot", str(out_png), "--emit-layout-map", str(out_map),
           "--format", "json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    local = {r["plan"]: r for r in doc["local"]}
    assert set(local) == {"replicated", "model"}
    for r in local.values():
        assert r["step_ms"] > 0 and r["reference_ms"] > 0
        assert r["measured_bytes_per_device"] == r["bytes_per_device"]  # exact, counted on the devices
    # replicated: (512*64 + 2*64*128 + 128) floats, plus momentum
    assert local["replicated"]["bytes_per_device"] == (512 * 64 + 2 * 64 * 128 + 128) * 4 * 2
    assert sum(r["recommended"] for r in doc["local"]) == 1
    assert doc["target_mesh"] == "batch=4,model=8" and doc["target"]
    assert doc["candidates"]["plans"] == ["replicated", "model"] and doc["target_candidates"]["considered"]
    assert [m["mesh"] for m in doc["measured_meshes"]] == ["model=2"]  # --calibration-meshes '': no calibration mesh
    assert all(r["predicted_ms"] is not None and r["predicted_ms"] > 0 for r in doc["target"])
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:4] == b"\x89PNG"
    emitted = json.loads(out_map.read_text())
    assert emitted["mesh"] == "batch=4,model=8" and emitted["plan"] == doc["target_recommended"]["plan"]
    assert emitted["layouts"] == doc["target_recommended"]["layouts"]


def test_cli_bad_mesh_exits_2(capsys):
    from dsgd.cli import main

    assert main(["layouts", "--model", "bert-mini", "--mesh", "batch=4,model=4"]) == 2
    assert "needs 16 devices" in capsys.readouterr().err
    assert main(["layouts", "--model", "bert-mini", "--mesh", "batch=2,model=4", "--force", "word_embeddings=model,unsharded"]) == 2
    assert "'embeddings/word_embeddings'" in capsys.readouterr().err


def _tiny_jobs(tmp_path, impls):
    model = tmp_path / "tiny.json"
    specs = [VarSpec("w", (64, 32), "float32"), VarSpec("b", (32,), "float32")]
    model.write_text(json.dumps([{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs]))
    lm = tmp_path / "plan.json"
    lm.write_text(json.dumps(layoutmap.emit(specs, [("model", U), (U,)])))
    return [{"workload": str(model), "mesh": "model=2", "layout": str(lm), "implementation": i, "options": "momentum",
             "steps": 4} for i in impls]


def test_a_meshs_jobs_are_timed_interleaved_and_a_failure_is_kept(tmp_path, monkeypatch):
    """The jobs of one mesh are timed in rounds, every job once a round (reversed on odd rounds), so
    that a slow spell of the machine falls on every plan alike; one that cannot be built is a failed
    row and the others are still measured, with their real bytes."""
    from dsgd.advisor import measure_plans as mp

    order = []
    real = mp._time_round
    monkeypatch.setattr(mp, "MIN_TIMED_S", 0.02)
    monkeypatch.setattr(mp, "_time_round", lambda built, steps, rounds: order.append(built.case.implementation)
                        or real(built, steps, rounds))
    res = mp.measure_plans({"jobs": _tiny_jobs(tmp_path, ["auto", "no-such-implementation", "reference"]), "steps": 4})
    auto, bad, ref = res["rows"]
    assert bad["status"] == "failed" and "no-such-implementation" in bad["error"]
    assert order == ["auto", "reference", "reference", "auto"] * (mp.ROUNDS // 2)
    for row in (auto, ref):
        assert row["status"] == "ok" and row["rounds"] == mp.ROUNDS and row["steps"] >= 4, row
        assert 0 < row["min_ms"] <= row["median_ms"] and row["first_step_s"] > 0
        assert row["measured_params_bytes_per_device"] == (32 * 32 + 32) * 4  # w split over model=2, b whole


def test_the_probe_is_timed_in_a_meshs_rounds_when_asked(tmp_path, monkeypatch):
    """``"probe": True`` (what ``--validate`` asks): every ok row of the worker carries the probe's times
    from the same rounds; without it, none."""
    from dsgd.advisor import measure_plans as mp

    monkeypatch.setattr(mp, "MIN_TIMED_S", 0.02)
    monkeypatch.setattr(mp, "PROBE_S", 0.01)
    rows = mp.measure_plans({"jobs": _tiny_jobs(tmp_path, ["auto", "reference"]), "steps": 4, "probe": True})["rows"]
    for row in rows:
        assert row["status"] == "ok" and 0 < row["probe_min_ms"] <= row["probe_ms"] < 1e3, row
    assert rows[0]["probe_ms"] == rows[1]["probe_ms"]  # one probe per worker
    plain = mp.measure_plans({"jobs": _tiny_jobs(tmp_path, ["auto"]), "steps": 4})["rows"]
    assert "probe_ms" not in plain[0]


def test_run_jobs_measures_a_failed_job_again_alone(monkeypatch):
    """A job that failed in its mesh's worker (an eager DTensor error poisons the process, so it may
    have failed for another job's sake) is measured again in a worker of its own; the others are not."""
    from dsgd.advisor import measure_plans as mp
    from dsgd.harness import isolate

    specs = get_workload("one-big")
    plan = plans.enumerate_plans(specs, [("batch", 2)])[0]
    jobs = [mp.Job("one-big", "batch=2", plan, specs, i, "momentum") for i in ("auto", "reference")]
    calls = []

    def fake(func, payloads, **kw):
        calls.append((func.split(":")[1], [p.get("implementation") for p in payloads]))
        if func.endswith(":measure_plans"):
            return [{"status": "ok", "rows": [{"status": "ok", "median_ms": 1.0},
                                              {"status": "failed", "error": "poisoned"}]}]
        return [{"status": "ok", "median_ms": 2.0} for _ in payloads]

    monkeypatch.setattr(isolate, "run_isolated", fake)
    rows = mp.run_jobs(jobs, progress=False)
    assert calls == [("measure_plans", [None]), ("measure_plan", ["reference"])]
    assert [(r["implementation"], r["status"], r["median_ms"]) for r in rows] == [("auto", "ok", 1.0),
                                                                                  ("reference", "ok", 2.0)]
