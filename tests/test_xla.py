"""The ``xla`` implementation: correct against float64, and provably XLA (real HLO modules).

* numerics: 5 steps against :mod:`dsgd.reference64` for momentum, Nesterov + weight decay,
  clipnorm / global_clipnorm + EMA with overwrite, clipvalue on plain SGD, a row-sharded sparse
  gradient, float64 and bfloat16 variables with float32 momentum — on meshes ``1``,
  ``batch=8`` and ``batch=2,model=4``, with replicated and sharded variables;
* ``jit_compile=True`` makes ``auto`` choose ``xla``;
* :func:`dsgd.impl.xla.capture_hlo` writes non-empty HLO modules (before and after XLA's
  optimisation passes) for every device program, with fusions; a path that claims XLA and has
  no HLO raises;
* in a fresh process, ``XLA_FLAGS=--xla_dump_to`` shows XLA really compiled the step programs.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from _helpers import U, assert_close, check_subprocess, dgrad, dsgd, dvar, r64, randn, run_subprocess, value
from dsgd.impl import xla as X

STEPS = 5

# name -> (dsgd.SGD kwargs, float64 options)
OPTIONS = {
    "momentum": dict(learning_rate=0.1, momentum=0.9),
    "nesterov_wd": dict(learning_rate=0.0625, momentum=0.8, nesterov=True, weight_decay=0.1),
    "gclip_ema": dict(learning_rate=0.1, momentum=0.5, global_clipnorm=0.5, use_ema=True, ema_momentum=0.7,
                      ema_overwrite_frequency=2),
    "clipnorm_ema": dict(learning_rate=0.1, momentum=0.9, clipnorm=0.3, use_ema=True, ema_momentum=0.9),
    "clipvalue_sgd": dict(learning_rate=0.2, clipvalue=0.5),
}

# (name, shape, layout per mesh kind); "model" specs only on meshes with a model axis
VARS = [("table", (16, 8), {"1": [U, U], "batch=8": [U, U], "batch=2,model=4": ["model", U]}),
        ("kernel", (8, 12), {"1": [U, U], "batch=8": [U, U], "batch=2,model=4": [U, "model"]}),
        ("bias", (12,), {"1": [U], "batch=8": [U], "batch=2,model=4": [U]}),
        ("conv", (3, 3, 2, 8), {"1": [U] * 4, "batch=8": [U, U, U, "batch"], "batch=2,model=4": [U, U, "batch", "model"]})]


def _o64(kw: dict) -> r64.Options64:
    return r64.Options64(**{k: v for k, v in kw.items() if k in r64.Options64.__dataclass_fields__})


def _run(mesh_spec, meshes, kw, dtype="float32", sparse=False, momentum_dtype=None, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    mesh = meshes(mesh_spec)
    init = [randn(rng, shape, dtype) for _, shape, _ in VARS]
    variables = [dvar(w, mesh, specs[mesh_spec], dtype=dtype, name=n) for w, (n, _, specs) in zip(init, VARS)]
    opt = dsgd.SGD(mesh=mesh, implementation="xla", momentum_dtype=momentum_dtype, **kw)
    o64 = _o64(kw)
    state = r64.init_state(init, o64)
    for step in range(steps):
        grads, grads64 = [], []
        for i, (v, (_, shape, _)) in enumerate(zip(variables, VARS)):
            if sparse and i == 0:
                idx = np.array([1, 5, 5, 14], np.int32)  # a duplicate row and rows on several shards
                vals = randn(rng, (len(idx), shape[1]), dtype)
                grads.append(tf.IndexedSlices(dgrad(vals, _replicated_like(mesh, 2, dtype)),
                                              dgrad(idx, _replicated_like(mesh, 1, "int32")),
                                              tf.constant(shape, tf.int64)))
                grads64.append((vals, idx))
            else:
                g = randn(rng, shape, dtype)
                grads.append(dgrad(g, v))
                grads64.append(g)
        opt.apply_gradients(zip(grads, variables))
        r64.step(state, grads64, o64)
    return opt, variables, state


def _replicated_like(mesh, rank, dtype):
    return dvar(np.zeros([1] * rank), mesh, [U] * rank, dtype=dtype)


def _check(opt, variables, state, dtype, factor=1.0, steps=STEPS):
    for v, w in zip(variables, state.weights):
        assert_close(value(v), w, dtype, f"weights of {v.name}", factor)
    if opt.momentum:
        for m, w in zip(opt.momentums, state.momenta):
            assert_close(value(m), w, m.dtype if m.dtype != tf.bfloat16 else "float32", f"momentum {m.name}", factor)
    for a, w in zip(getattr(opt, "_model_variables_moving_average", []), state.averages):
        assert_close(value(a), w, dtype, f"average {a.name}", factor)
    assert int(value(opt.iterations)) == steps


def _impls_used(opt) -> set[str]:
    return set(opt.implementations_used())


# every option set on meshes 1 and batch=2,model=4 (plain momentum there: test_jit_compile_...);
# the replicated 8-device mesh with two of them (each 8-device case compiles one program per device)
GRID = ([("1", o) for o in OPTIONS] + [("batch=2,model=4", o) for o in OPTIONS if o != "momentum"]
        + [("batch=8", "nesterov_wd"), ("batch=8", "gclip_ema")])


@pytest.mark.parametrize("mesh_spec,opts", GRID)
def test_against_float64(meshes, mesh_spec, opts):
    opt, variables, state = _run(mesh_spec, meshes, OPTIONS[opts])
    assert _impls_used(opt) == {"xla"}
    _check(opt, variables, state, "float32")


@pytest.mark.parametrize("mesh_spec", ["batch=2,model=4"])
def test_sparse_gradient(meshes, mesh_spec):
    opt, variables, state = _run(mesh_spec, meshes, OPTIONS["gclip_ema"], sparse=True, seed=3)
    _check(opt, variables, state, "float32")


@pytest.mark.parametrize("dtype,momentum_dtype,factor", [("float64", None, 1.0), ("bfloat16", "float32", 1.0)])
def test_dtypes(meshes, dtype, momentum_dtype, factor):
    kw = OPTIONS["nesterov_wd"]
    opt, variables, state = _run("batch=2,model=4", meshes, kw, dtype=dtype, momentum_dtype=momentum_dtype, seed=5)
    if momentum_dtype:
        assert {m.dtype.name for m in opt.momentums} == {momentum_dtype}
    _check(opt, variables, state, dtype, factor)


def test_jit_compile_makes_auto_choose_xla(meshes):
    mesh = meshes("batch=2,model=4")
    v = dvar(np.ones((8, 4), np.float32), mesh, ["model", U])
    opt = dsgd.SGD(learning_rate=0.1, momentum=0.9, mesh=mesh, jit_compile=True)
    opt.apply_gradients([(dgrad(np.ones((8, 4)), v), v)])
    assert _impls_used(opt) == {"xla"}
    np.testing.assert_allclose(value(v), 0.9 * np.ones((8, 4)), rtol=1e-6)
    assert opt.get_config()["jit_compile"] is True


def test_capture_hlo(meshes, tmp_path):
    opt, _, _ = _run("batch=2,model=4", meshes, OPTIONS["clipnorm_ema"], seed=7, steps=1)
    groups = len(opt.plan)
    paths = X.capture_hlo(opt, str(tmp_path))
    # per group: the step program and the clipnorm sums-of-squares program (the 8 devices share
    # shapes, so one file each), before and after optimisation
    assert len(paths) == groups * 2 * 2
    manifest = json.loads((tmp_path / "hlo_programs.json").read_text())
    assert all(len(m["devices"]) == 8 for m in manifest.values())
    before = [p for p in paths if p.endswith("before_optimizations.hlo.txt")]
    after = [p for p in paths if p.endswith("after_optimizations.hlo.txt")]
    assert len(before) == len(after) == len(paths) // 2
    for p in paths:
        assert open(p).read().startswith("HloModule"), p
    step_after = [open(p).read() for p in after if ".step." in p]
    assert step_after and all(X.count_fusions(t) >= 1 for t in step_after), "optimized step HLO has no fusion"
    # all variables of a group are in one module: one parameter per handle/gradient
    g0 = [g for g in opt.plan][0]
    one = open([p for p in before if ".step." in p and p.split("/")[-1].startswith("group0")][0]).read()
    assert one.count("parameter(") >= 4 * len(g0.entries)  # var, momentum, average, gradient each
    per_dev = X.capture_hlo(opt, str(tmp_path / "per_device"), per_device=True)
    assert len(per_dev) == groups * 2 * 2 * 8


def test_capture_hlo_refuses_a_path_without_xla(meshes, tmp_path):
    mesh = meshes("1")
    v = dvar(np.ones((4,), np.float32), mesh, [U])
    opt = dsgd.SGD(learning_rate=0.1, mesh=mesh, implementation="per_shard")
    opt.apply_gradients([(dgrad(np.ones(4), v), v)])
    with pytest.raises(X.NoHLOError, match="xla"):
        X.capture_hlo(opt, str(tmp_path))
    fresh = dsgd.SGD(learning_rate=0.1, mesh=mesh, jit_compile=True)  # claims XLA, never stepped
    with pytest.raises(X.NoHLOError):
        X.capture_hlo(fresh, str(tmp_path))


def test_count_fusions():
    text = """HloModule m
fused_computation {
  p = f32[4]{0} parameter(0)
  ROOT m = f32[4]{0} multiply(p, p)
}
ENTRY e {
  a = f32[4]{0} parameter(0)
  f.1 = f32[4]{0} fusion(a), kind=kLoop, calls=fused_computation
  ROOT %fusion.2 = f32[4]{0} fusion(f.1), kind=kLoop, calls=fused_computation
}"""
    assert X.count_fusions(text) == 2


def test_xla_dump_in_fresh_process(tmp_path):
    """XLA_FLAGS=--xla_dump_to: the step programs are compiled by XLA (DTensor jit_compile is not)."""
    dump = tmp_path / "dump"
    proc = run_subprocess(f"""
        from dsgd.meshspec import make_mesh
        mesh = make_mesh("batch=2,model=4")
        lay = dtensor.Layout(["model", "unsharded"], mesh)
        v = dtensor.DVariable(to_layout(np.ones((8, 4), np.float32), lay))
        g = to_layout(np.ones((8, 4), np.float32), lay)
        # DTensor + jit_compile: executes, but XLA compiles nothing
        fn = tf.function(lambda: v.assign_sub(0.1 * g), jit_compile=True)
        fn()
        print("after-dtensor-jit", len(os.listdir({str(dump)!r})) if os.path.isdir({str(dump)!r}) else 0)
        opt = dsgd.SGD(learning_rate=0.1, momentum=0.9, mesh=mesh, jit_compile=True)
        opt.apply_gradients([(g, v)])
        print("value", float(to_numpy(v)[0, 0]))
    """, env={"XLA_FLAGS": f"--xla_dump_to={dump}"}, timeout=240)
    out = check_subprocess(proc)
    assert "after-dtensor-jit 0" in out, out
    files = os.listdir(dump)
    before = [f for f in files if "dsgd_xla_step" in f and f.endswith("before_optimizations.txt")]
    after = [f for f in files if "dsgd_xla_step" in f and "after_optimizations.txt" in f]
    assert len(before) == 8 and len(after) >= 8, sorted(files)[:20]  # one compilation per device
    value_line = [line for line in out.splitlines() if line.startswith("value ")][0]
    assert abs(float(value_line.split()[1]) - 0.8) < 1e-6  # 1 - 0.1 (the DTensor step) - 0.1 (momentum step)
