"""``grouped`` (the multi-tensor C++ kernel): against the float64 model and against
``per_shard`` on the same inputs, on 1, 8 and 2x4 devices, replicated and sharded, every
option, float32/bfloat16/float16 (and bfloat16 with float32 momentum), dense and sparse.

The kernel is compiled on first use (~15 s of CPU, cached); without a compiler every test
skips with the reason.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import dsgd
from dsgd import kernels, meshspec
from dsgd import reference64 as r64
from dsgd.harness.measure import resolved_implementations
from dsgd.state import to_layout, to_numpy

U = meshspec.UNSHARDED
_REASON = kernels.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"grouped kernel unavailable: {_REASON}")

# Layouts per mesh: each a list of (shape, layout spec) — several groups, replication 8/4/2/1.
VARS = {
    "1": [((8, 12), [U, U]), ((12,), [U]), ((3, 4, 8), [U, U, U])],
    "batch=8": [((16, 6), ["batch", U]), ((6,), [U]), ((4, 8), [U, U]), ((8, 8), [U, "batch"])],
    "batch=2,model=4": [((8, 12), [U, "model"]), ((12,), [U]), ((8, 4), ["batch", "model"]),
                        ((4, 6), ["model", U]), ((6, 4), [U, U])],
}
OPTIONS = {
    "sgd": dict(learning_rate=0.1),
    "momentum": dict(learning_rate=0.05, momentum=0.9),
    "nesterov": dict(learning_rate=0.05, momentum=0.9, nesterov=True),
    "decay": dict(learning_rate=0.05, momentum=0.9, weight_decay=0.1),  # variable 1 excluded
    "clipnorm": dict(learning_rate=0.05, momentum=0.9, clipnorm=0.5),
    "global_clipnorm": dict(learning_rate=0.05, momentum=0.5, global_clipnorm=1.0),
    "clipvalue": dict(learning_rate=0.1, momentum=0.9, clipvalue=0.3),
    "ema": dict(learning_rate=0.1, momentum=0.9, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=2),
    "full": dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, global_clipnorm=2.0,
                 use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
}
STEPS = 5


def _model(meshes, mesh_spec, dtype, seed=0, replicated=False):
    mesh = meshes(mesh_spec)
    rng = np.random.default_rng(seed)
    variables, layouts = [], []
    for i, (shape, spec) in enumerate(VARS[mesh_spec]):
        layout = dtensor.Layout([U] * len(shape) if replicated else spec, mesh)
        init = rng.normal(size=shape).astype(np.float32)
        variables.append(dtensor.DVariable(to_layout(init, layout, tf.as_dtype(dtype)), name=f"v{i}_{'bias' if i == 1 else 'w'}"))
        layouts.append(layout)
    return mesh, variables, layouts


def _grads(variables, layouts, step, dtype, scale=1.0):
    rng = np.random.default_rng(100 + step)
    return [to_layout((scale * rng.normal(size=v.shape)).astype(np.float32), lay, tf.as_dtype(dtype))
            for v, lay in zip(variables, layouts)]


def _run(meshes, mesh_spec, impl, opts, dtype="float32", replicated=False, momentum_dtype=None, steps=STEPS):
    """Train STEPS steps with random gradients; returns (optimizer, variables, float64 state, per-step grads)."""
    mesh, variables, layouts = _model(meshes, mesh_spec, dtype, replicated=replicated)
    opt = dsgd.SGD(mesh=mesh, implementation=impl, momentum_dtype=momentum_dtype, **opts)
    if opts.get("weight_decay"):
        opt.exclude_from_weight_decay(var_names=["bias"])
    o64 = r64.Options64(**{k: v for k, v in opts.items() if k in r64.Options64.__dataclass_fields__},
                        decay_mask=[i != 1 for i in range(len(variables))])
    state = r64.init_state([to_numpy(v) for v in variables], o64)
    for k in range(steps):
        clipping = any(opts.get(c) for c in ("clipnorm", "global_clipnorm", "clipvalue"))
        grads = _grads(variables, layouts, k, dtype, scale=3.0 if clipping else 1.0)  # so clipping bites
        opt.apply_gradients(zip(grads, variables))
        r64.step(state, [to_numpy(g) for g in grads], o64)
    return opt, variables, state


def _check_against_float64(variables, state, dtype):
    tol = r64.TOLERANCE[dtype]
    for v, w in zip(variables, state.weights):
        err = r64.max_rel_error(to_numpy(v), w)
        assert err <= tol, f"{v.name}: max relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("mesh_spec", ["1", "batch=8", "batch=2,model=4"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_float32_against_float64_and_per_shard(meshes, mesh_spec, option):
    opts = OPTIONS[option]
    opt, variables, state = _run(meshes, mesh_spec, "grouped", opts)
    assert resolved_implementations(opt) == "grouped"
    _check_against_float64(variables, state, "float32")
    if opts.get("use_ema"):
        for avg, a64 in zip(opt._model_variables_moving_average, state.averages):
            assert r64.max_rel_error(to_numpy(avg), a64) <= r64.TOLERANCE["float32"]
    # per_shard on the same inputs: the same float32 arithmetic (norms are summed differently)
    _, ref_vars, _ = _run(meshes, mesh_spec, "per_shard", opts)
    exact = not (opts.get("clipnorm") or opts.get("global_clipnorm"))
    for v, r in zip(variables, ref_vars):
        a, b = to_numpy(v), to_numpy(r)
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=f"{v.name} ({option}, {mesh_spec})")
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{v.name} ({option}, {mesh_spec})")


@pytest.mark.parametrize("mesh_spec", ["1", "batch=8", "batch=2,model=4"])
@pytest.mark.parametrize("option", ["full", "clipnorm", "nesterov"])
def test_direct_feed_equals_unpack_feed(meshes, mesh_spec, option, monkeypatch):
    """The C++ dispatch (components by address, every device in one call) and dtensor.unpack
    (one call per device) feed the kernels the same bytes: bit-identical results over several
    steps without norm clipping; with it the one-call sums add the devices' partial sums in
    double, not float, so results may differ in the last bit.  Float64-checked too."""
    from dsgd import eager_dtensor

    from _helpers import require_direct

    require_direct(meshes(mesh_spec))
    opts = OPTIONS[option]
    opt, direct_vars, state = _run(meshes, mesh_spec, "grouped", opts)
    _check_against_float64(direct_vars, state, "float32")
    with monkeypatch.context() as m:
        m.setattr(eager_dtensor, "direct", lambda mesh: None)
        _, unpack_vars, _ = _run(meshes, mesh_spec, "grouped", opts)
    exact = not (opts.get("clipnorm") or opts.get("global_clipnorm"))
    for a, b in zip(direct_vars, unpack_vars):
        if exact:
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=f"{a.name} ({option}, {mesh_spec})")
        else:
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7, err_msg=f"{a.name} ({option})")


@pytest.mark.parametrize("mesh_spec", ["batch=8", "batch=2,model=4"])
def test_replicated_layouts(meshes, mesh_spec):
    _, variables, state = _run(meshes, mesh_spec, "grouped", OPTIONS["full"], replicated=True)
    _check_against_float64(variables, state, "float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mesh_spec", ["1", "batch=2,model=4"])
def test_half_precision(meshes, mesh_spec, dtype):
    opts = dict(OPTIONS["full"], learning_rate=0.01)
    _, variables, state = _run(meshes, mesh_spec, "grouped", opts, dtype=dtype)
    _check_against_float64(variables, state, dtype)
    # per_shard rounds every intermediate to the variables' dtype; grouped computes in float32
    _, ref_vars, _ = _run(meshes, mesh_spec, "per_shard", opts, dtype=dtype)
    for v, r in zip(variables, ref_vars):
        assert r64.max_rel_error(to_numpy(v), to_numpy(r).astype(np.float64)) <= r64.TOLERANCE[dtype]


@pytest.mark.parametrize("mesh_spec", ["1", "batch=2,model=4"])
def test_bfloat16_with_float32_momentum(meshes, mesh_spec):
    opts = dict(learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=0.05)
    opt, variables, state = _run(meshes, mesh_spec, "grouped", opts, dtype="bfloat16", momentum_dtype="float32")
    assert {m.dtype for m in opt.momentums} == {tf.float32}
    _check_against_float64(variables, state, "bfloat16")
    # the float32 momentum tracks the float64 model's momentum far better than bfloat16 could
    for m, m64 in zip(opt.momentums, state.momenta):
        assert r64.max_rel_error(to_numpy(m), m64) < 1e-2


def _sparse_case(meshes, impl, opts, steps=3):
    """An embedding table (replicated and row-sharded) with IndexedSlices gradients (duplicated rows)."""
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(7)
    layouts = [dtensor.Layout([U, U], mesh), dtensor.Layout(["model", U], mesh), dtensor.Layout([U, "model"], mesh)]
    inits = [rng.normal(size=(16, 8)).astype(np.float32) for _ in layouts]
    variables = [dtensor.DVariable(to_layout(x, lay), name=f"table{i}") for i, (x, lay) in enumerate(zip(inits, layouts))]
    opt = dsgd.SGD(mesh=mesh, implementation=impl, **opts)
    o64 = r64.Options64(**{k: v for k, v in opts.items() if k in r64.Options64.__dataclass_fields__})
    state = r64.init_state(inits, o64)
    rep1, rep2 = dtensor.Layout.replicated(mesh, 1), dtensor.Layout.replicated(mesh, 2)
    for k in range(steps):
        idx = np.array([1, 5, 5, 14, 3 + k, 1], np.int64)
        vals = [rng.normal(size=(len(idx), 8)).astype(np.float32) for _ in variables]
        sparse = [tf.IndexedSlices(to_layout(v, rep2), to_layout(idx, rep1), tf.constant([16, 8], tf.int64)) for v in vals]
        dense = to_layout(rng.normal(size=(16, 8)).astype(np.float32), layouts[2])
        opt.apply_gradients(zip(sparse[:2] + [dense], variables))
        r64.step(state, [(v, idx) for v in vals[:2]] + [to_numpy(dense)], o64)
    return variables, state


@pytest.mark.parametrize("option", ["clipvalue", "clipnorm", "decay"])
def test_sparse_gradients(meshes, option):
    opts = OPTIONS[option]
    variables, state = _sparse_case(meshes, "grouped", opts)
    _check_against_float64(variables, state, "float32")
    ref_vars, _ = _sparse_case(meshes, "per_shard", opts)
    for v, r in zip(variables, ref_vars):
        np.testing.assert_allclose(to_numpy(v), to_numpy(r), rtol=1e-6, atol=1e-6)


def test_plain_variables_and_copy_on_write():
    """No mesh: plain tf.Variables; a value read before the step keeps its old contents."""
    rng = np.random.default_rng(3)
    v = tf.Variable(rng.normal(size=(32, 4)).astype(np.float32))
    b = tf.Variable(rng.normal(size=(4,)).astype(np.float32))
    opts = OPTIONS["full"]
    opt = dsgd.SGD(implementation="grouped", **opts)
    o64 = r64.Options64(**{k: val for k, val in opts.items() if k in r64.Options64.__dataclass_fields__})
    state = r64.init_state([v.numpy(), b.numpy()], o64)
    for k in range(STEPS):
        before = v.read_value()  # shares v's buffer: the kernel must copy, not overwrite it
        snapshot = before.numpy().copy()
        grads = [tf.constant(rng.normal(size=x.shape).astype(np.float32)) for x in (v, b)]
        opt.apply_gradients(zip(grads, [v, b]))
        r64.step(state, [g.numpy() for g in grads], o64)
        np.testing.assert_array_equal(before.numpy(), snapshot)
    assert resolved_implementations(opt) == "grouped"
    for x, w in zip((v, b), state.weights):
        assert r64.max_rel_error(x.numpy(), w) <= r64.TOLERANCE["float32"]


def test_subset_and_order_of_gradients(meshes):
    """Gradients for some variables only, in another order than at build: same as per_shard."""
    outs = []
    for impl in ("grouped", "per_shard"):
        mesh, variables, layouts = _model(meshes, "batch=2,model=4", "float32")
        opt = dsgd.SGD(mesh=mesh, implementation=impl, learning_rate=0.1, momentum=0.9)
        opt.build(variables)
        for k in range(3):
            grads = _grads(variables, layouts, k, "float32")
            pairs = list(zip(grads, variables))
            opt.apply_gradients(pairs[::-1] if k % 2 else pairs[1:4])
        outs.append([to_numpy(v) for v in variables])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_auto_picks_grouped_eagerly(meshes):
    mesh, variables, layouts = _model(meshes, "batch=2,model=4", "float32")
    opt = dsgd.SGD(mesh=mesh, learning_rate=0.1, momentum=0.9)
    opt.apply_gradients(zip(_grads(variables, layouts, 0, "float32"), variables))
    assert resolved_implementations(opt) == "grouped"


def test_supports_and_unavailable_reason(meshes, tmp_path, monkeypatch):
    from dsgd.impl.grouped import Grouped
    from dsgd.plan import Group

    mesh = meshes("batch=8")
    group = Group("replicated", tf.bfloat16, mesh, [])
    ok = dsgd.SGD(mesh=mesh, momentum=0.9, momentum_dtype="float32")
    assert Grouped.supports(group, ok) is None
    bad = dsgd.SGD(mesh=mesh, momentum=0.9, momentum_dtype="float64")
    assert "momentum_dtype=float64" in Grouped.supports(group, bad)
    assert "int32" in Grouped.supports(Group("replicated", tf.int32, mesh, []), ok)
    # a failing compiler: the reason carries its output, and nothing is left in the cache
    monkeypatch.setenv("DSGD_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(kernels.KernelUnavailable, match="failed"):
        kernels.build(force=True)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setenv("CXX", "no-such-compiler-dsgd")
    with pytest.raises(kernels.KernelUnavailable, match="no C\\+\\+ compiler"):
        kernels.build()


@pytest.mark.parametrize("feed", ["direct", "unpack"])
def test_one_call_per_device_for_all_layouts_and_norms_summed_once_per_shard(meshes, monkeypatch, feed):
    """batch=2,model=4 with five layouts (replication 8, 4, 2, 2, 8): the step is one kernel
    call for every variable (``direct``: components fed from C++, dsgd/kernels/dispatch.cc,
    one DsgdMultiSgdAll for all devices; ``unpack``: dtensor.unpack and one DsgdMultiSgd per
    device), and the sums of squares behind the global norm are taken only on the devices
    holding each shard's first replica (batch coordinate 0 on the axes a layout does not
    shard), each element summed exactly once."""
    from dsgd import eager_dtensor

    if feed == "unpack":
        monkeypatch.setattr(eager_dtensor, "direct", lambda mesh: None)
    mesh, variables, layouts = _model(meshes, "batch=2,model=4", "float32")
    opt = dsgd.SGD(mesh=mesh, implementation="grouped", **OPTIONS["global_clipnorm"])
    grads = _grads(variables, layouts, 0, "float32", scale=3.0)
    opt.apply_gradients(zip(grads, variables))  # builds the plans
    ops = kernels.load()
    calls = {"sgd": [], "sumsq": []}
    real_sgd, real_sumsq = ops.dsgd_multi_sgd, ops.dsgd_multi_sum_sq

    def sgd(**kw):
        calls["sgd"].append(len(kw["grads"]))
        return real_sgd(**kw)

    def sumsq(grads_, index, **kw):
        out = real_sumsq(grads_, index, **kw)
        calls["sumsq"].append((grads_[0].device, list(index.numpy()), out.numpy()))
        return out

    monkeypatch.setattr(ops, "dsgd_multi_sgd", sgd)
    monkeypatch.setattr(ops, "dsgd_multi_sum_sq", sumsq)
    if feed == "direct":
        from _helpers import require_direct

        mod = require_direct(mesh)
        real_run_all = mod.run_all

        def run_all(ctx, comps, select, op, device, *rest):  # every device's work in one call
            out = real_run_all(ctx, comps, select, op, device, *rest)
            if op == "DsgdMultiSgdAll":
                calls["sgd"].append(8 * len(variables))
            else:
                calls["sumsq"].append((device, [i for sel in select for i in sel], out.numpy()))
            return out

        monkeypatch.setattr(mod, "run_all", run_all)
    opt.apply_gradients(zip(grads, variables))
    # one call per device (unpack feed), or one call for all eight devices' shards (C++ feed)
    assert calls["sgd"] == ([8 * len(variables)] if feed == "direct" else [len(variables)] * 8)
    # the per-variable sums over the calls are the gradients' exact sums of squares
    total = np.zeros(len(variables))
    for _, index, out in calls["sumsq"]:
        total += out
    want = [float(np.sum(to_numpy(g).astype(np.float64) ** 2)) for g in grads]
    np.testing.assert_allclose(total, want, rtol=1e-5)
    # each shard summed on one device only: as many (device, variable) sums as there are shards
    shards = sum(8 // e.replication for g in opt.plan for e in g.entries)
    assert sum(len(index) for _, index, _ in calls["sumsq"]) == shards < 8 * len(variables)


@pytest.mark.parametrize("case", ["clips", "below", "zero", "nan", "inf"])
def test_global_clip_scale_op_equals_rules(case):
    """DsgdGlobalClipScale (one op for global_clipnorm's coefficient) equals the TF ops of
    rules.global_clip_scale: within float32 rounding of the sum, NaN stays NaN, a zero norm
    and a norm under the limit give clipnorm * float32(1 / clipnorm)."""
    from dsgd import rules
    from dsgd.impl.grouped import Grouped

    rng = np.random.default_rng(5)
    clipnorm = 0.7
    sumsq = {"clips": rng.uniform(1, 50, size=37), "below": rng.uniform(0, 0.01, size=5), "zero": np.zeros(3),
             "nan": np.array([1.0, np.nan, 2.0]), "inf": np.array([1.0, np.inf])}[case].astype(np.float32)
    fake = Grouped.__new__(Grouped)  # only the op handle
    fake._ops = kernels.load()
    got = float(fake.global_clip_scale(tf.constant(sumsq), clipnorm).numpy())
    want = float(rules.global_clip_scale(tf.reduce_sum(tf.constant(sumsq)), clipnorm).numpy())
    if case == "nan":
        assert np.isnan(got) and np.isnan(want)
        return
    assert np.isfinite(got)
    if case == "clips":
        exact = clipnorm / np.sqrt(sumsq.astype(np.float64).sum())
        assert got == pytest.approx(exact, rel=3e-7) and got == pytest.approx(want, rel=3e-7) and got < 1
    else:
        assert got == want  # the same float32 steps, no rounding of a sum involved
        assert got == pytest.approx(0.0 if case == "inf" else 1.0, abs=1e-7)


def _replicas_agree(v) -> None:
    """Every device's copy of each block of ``v`` (a variable or slot) is bit-equal to its first replica's."""
    from dsgd.impl.local import local_entry
    from dsgd.plan import new_entry, variable_layout

    layout = variable_layout(v)
    entry = new_entry(0, v, id(v), None, None, True, layout)
    offsets = local_entry(entry).offsets
    comps = [c.numpy() for c in dtensor.unpack(v.read_value())]
    for k, off in enumerate(offsets):
        first = offsets.index(off)
        np.testing.assert_array_equal(comps[k], comps[first], err_msg=f"{v.name}: device {k}'s copy of its block")


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("mesh_spec", ["batch=8", "batch=2,model=4"])
@pytest.mark.parametrize("option", ["momentum", "full"])
def test_every_replica_of_a_block_is_written(meshes, mesh_spec, option, mode):
    """The kernel computes each replicated block once and copies the results to the other devices
    holding it: after several steps every device's weights, momentum and average equal their first
    replica's, bit for bit, and the float64 model (eagerly through the by-address call, inside
    ``tf.function`` through the in-graph node's replica map)."""
    mesh, variables, layouts = _model(meshes, mesh_spec, "float32")
    opts = OPTIONS[option]
    opt = dsgd.SGD(mesh=mesh, implementation="grouped", **opts)
    o64 = r64.Options64(**{k: v for k, v in opts.items() if k in r64.Options64.__dataclass_fields__})
    state = r64.init_state([to_numpy(v) for v in variables], o64)
    step = tf.function(lambda gs: opt.apply_gradients(zip(gs, variables))) if mode == "function" else \
        (lambda gs: opt.apply_gradients(zip(gs, variables)))
    for k in range(3):
        grads = _grads(variables, layouts, k, "float32")
        step(grads)
        r64.step(state, [to_numpy(g) for g in grads], o64)
    assert resolved_implementations(opt) == ("grouped_graph" if mode == "function" else "grouped")
    _check_against_float64(variables, state, "float32")
    for v in variables + list(opt.momentums) + list(opt._model_variables_moving_average):
        _replicas_agree(v)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_a_replicated_block_is_computed_once_from_its_first_replica(meshes, mode):
    """What the copying means: a replicated gradient is the same on every device (DTensor's invariant,
    an all-reduce's result), so only its first replica is read.  Packed by hand with a different value
    on each device, every device's copy of the weights gets the first device's update."""
    mesh = meshes("batch=8")
    lay = dtensor.Layout([U], mesh)
    v = dtensor.DVariable(to_layout(np.zeros(4, np.float32), lay))
    opt = dsgd.SGD(0.5, mesh=mesh, implementation="grouped")
    g = dtensor.pack([tf.fill([4], float(k + 1)) for k in range(8)], lay)
    if mode == "function":
        tf.function(lambda g: opt.apply_gradients([(g, v)]))(g)
    else:
        opt.apply_gradients([(g, v)])
    comps = [c.numpy() for c in dtensor.unpack(v.read_value())]
    for c in comps:
        np.testing.assert_array_equal(c, np.full(4, -0.5, np.float32))
