"""dsgd.SGD's API: the documented examples, the EMA fix, slot/state layouts, config and
serialization round trips, the older option objects, and every method and property of the
reference (set_weights, save/load_own_variables, variables, iterations, lr, learning_rate,
minimize, compute_gradients, update_step, build, add_variable(_from_reference),
exclude_from_weight_decay, finalize_variable_values).
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tensorflow.experimental import dtensor

from _helpers import (DTENSOR_IMPLS, U, allowed_slot_layouts, assert_close, dgrad, dsgd, dvar, impl_params, layout, layout_of, r64, randn,
                      require_impl, value)


# -- the API doc's examples ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["no_mesh", "mesh_1"])
def test_doc_examples(meshes, where):
    mesh = meshes("1") if where == "mesh_1" else None

    def var(x):
        return dvar(np.float32(x), mesh) if mesh is not None else tf.Variable(x)

    opt = dsgd.SGD(learning_rate=0.1, mesh=mesh)
    v = var(1.0)
    opt.minimize(lambda: (v ** 2) / 2.0, [v])
    np.testing.assert_allclose(value(v), 0.9, rtol=1e-6)

    opt = dsgd.SGD(0.1, momentum=0.9, mesh=mesh)
    v = var(1.0)
    val0 = value(v)
    opt.minimize(lambda: (v ** 2) / 2.0, [v])
    val1 = value(v)
    np.testing.assert_allclose(val0 - val1, 0.1, rtol=1e-5)
    opt.minimize(lambda: (v ** 2) / 2.0, [v])
    val2 = value(v)
    np.testing.assert_allclose(val1 - val2, 0.18, rtol=1e-5)


# -- the EMA fix ----------------------------------------------------------------------------------
def _ema_run(mesh, impl, frequency, mode, steps=4):
    v = dvar(np.float32(1.0), mesh) if mesh is not None else tf.Variable(1.0)
    opt = dsgd.SGD(0.1, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=frequency, mesh=mesh,
                   implementation=impl)
    g = dgrad(np.float32(1.0), v) if mesh is not None else tf.constant(1.0)
    fn = (lambda: opt.apply_gradients([(g, v)]))
    if mode == "function":
        fn = tf.function(fn)
    seen = []
    for _ in range(steps):
        fn()
        seen.append(float(value(v)))
    return opt, v, seen


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("impl", impl_params())
def test_ema_fix_finalize(meshes, impl, mode):
    """lr 0.1, ema_momentum 0.5, gradient 1, w0 = 1, 4 steps: finalize gives 0.69375 on a mesh."""
    require_impl(impl)
    if mode == "function" and impl not in DTENSOR_IMPLS:
        pytest.skip(f"{impl!r} runs eagerly only")
    for spec in ("1", "batch=2,model=4"):
        opt, v, seen = _ema_run(meshes(spec), impl, None, mode)
        np.testing.assert_allclose(seen, [0.9, 0.8, 0.7, 0.6], rtol=1e-6)
        np.testing.assert_allclose(value(opt._model_variables_moving_average[0]), 0.69375, rtol=1e-6)
        opt.finalize_variable_values([v])
        np.testing.assert_allclose(value(v), 0.69375, rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("impl", impl_params())
def test_ema_overwrite_frequency(meshes, impl, mode):
    """With ema_overwrite_frequency=2 the weights are overwritten after steps 2 and 4 (as tf_keras without a mesh)."""
    require_impl(impl)
    if mode == "function" and impl not in DTENSOR_IMPLS:
        pytest.skip(f"{impl!r} runs eagerly only")
    # the documented behaviour: tf_keras without a mesh
    ref_v = tf.Variable(1.0)
    ref = tf_keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2)
    expected = []
    for _ in range(4):
        ref.apply_gradients([(tf.constant(1.0), ref_v)])
        expected.append(float(ref_v.numpy()))
    np.testing.assert_allclose(expected, [0.9, 0.875, 0.775, 0.75], rtol=1e-6)
    _, _, seen = _ema_run(meshes("batch=2,model=4"), impl, 2, mode)
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


# -- layouts of the optimizer's state ---------------------------------------------------------------
SPECS = [[U, U], ["model", U], [U, "batch"], ["batch", "model"]]


@pytest.mark.parametrize("impl", ["auto"] + [p.values[0] for p in impl_params()])
def test_slot_layouts_equal_variable_layouts(meshes, impl):
    if impl != "auto":
        require_impl(impl)
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(0)
    variables = [dvar(randn(rng, (8, 8)), mesh, s, name=f"v{i}") for i, s in enumerate(SPECS)]
    variables.append(dvar(randn(rng, (8, 8)), mesh, ["model", U], dtype="bfloat16", name="half"))
    opt = dsgd.SGD(0.1, momentum=0.9, use_ema=True, mesh=mesh, implementation=impl)
    opt.build(variables)
    assert len(opt.momentums) == len(variables) and len(opt._model_variables_moving_average) == len(variables)
    for v, m, a in zip(variables, opt.momentums, opt._model_variables_moving_average):
        for slot in (m, a):
            assert isinstance(slot, dtensor.DVariable), f"slot {slot.name} is not a DVariable"
            assert slot.shape == v.shape and slot.dtype == v.dtype
            allowed = allowed_slot_layouts(impl, v)  # the variable's (or the impl's declared slot_layout)
            assert layout_of(slot) in allowed, (
                f"{slot.name}: layout {layout_of(slot).sharding_specs} != variable's {layout_of(v).sharding_specs}")
        np.testing.assert_array_equal(value(a), value(v))  # the average starts as a copy
        np.testing.assert_array_equal(value(m), 0)
        # slots are created under one op name (DTensor's expansion cache), then named after their variable
        assert m.name == f"m/{v._shared_name}:0" and a.name == f"average/{v._shared_name}:0", (m.name, a.name)
    ids = [s._unique_id for s in opt.momentums + opt._model_variables_moving_average]
    assert len(set(ids)) == len(ids), "slots share a unique id"


@pytest.mark.parametrize("counter", ["one op", "per device"])
def test_iterations_and_learning_rate_replicated(meshes, monkeypatch, counter):
    """iterations counts steps on every device's copy, whether the grouped kernels' one op
    (DsgdIncrementAll) or one AssignAddVariableOp per device increments it."""
    from dsgd import kernels

    if counter == "per device":
        monkeypatch.setattr(kernels, "loaded", lambda: None)
    elif kernels.unavailable_reason() is not None:
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    mesh = meshes("batch=2,model=4")
    for lr in (0.1, tf_keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)):
        opt = dsgd.SGD(lr, momentum=0.9, mesh=mesh)
        v = dvar(np.ones((8, 4), np.float32), mesh, ["model", U])
        for _ in range(2):
            opt.apply_gradients([(dgrad(np.ones((8, 4)), v), v)])
        for state in (opt.iterations, opt.learning_rate):
            lay = layout_of(state)
            assert lay is not None and lay.mesh == mesh and lay.is_fully_replicated() and lay.rank == 0
        assert int(value(opt.iterations)) == 2
        assert [int(c) for c in dtensor.unpack(opt.iterations.read_value())] == [2] * 8
        assert (type(opt._engine.counter).__name__ == "Counter") == (counter == "one op")
        # a schedule's current value is the one used by the last step (computed from iterations=1)
        expected = 0.1 if isinstance(lr, float) else 0.1 * 0.5 ** 0.5
        np.testing.assert_allclose(value(opt.learning_rate), expected, rtol=1e-6)


def test_add_variable_on_mesh_is_dvariable(meshes):
    mesh = meshes("batch=2,model=4")
    opt = dsgd.SGD(0.1, mesh=mesh)
    a = opt.add_variable([3, 2], "float32", "ones", name="extra")
    assert isinstance(a, dtensor.DVariable)
    assert layout_of(a).mesh == mesh and layout_of(a).is_fully_replicated()
    np.testing.assert_array_equal(value(a), np.ones((3, 2)))
    b = opt.add_variable([4])  # defaults: floatx, zeros
    assert isinstance(b, dtensor.DVariable) and b.dtype == tf.float32
    np.testing.assert_array_equal(value(b), np.zeros(4))
    assert any(x is a for x in opt.variables) and any(x is b for x in opt.variables)
    v = dvar(np.arange(32, dtype=np.float32).reshape(8, 4), mesh, ["model", U])
    r = opt.add_variable_from_reference(v, "ref")
    assert isinstance(r, dtensor.DVariable) and layout_of(r) == layout_of(v)
    np.testing.assert_array_equal(value(r), 0)
    r2 = opt.add_variable_from_reference(v, "copy", initial_value=v)
    np.testing.assert_array_equal(value(r2), value(v))
    # without a mesh: plain variables, as the reference
    plain = dsgd.SGD(0.1).add_variable([2])
    assert layout_of(plain) is None and not isinstance(plain, dtensor.DVariable)


@pytest.mark.parametrize("impl", impl_params())
def test_momentum_zero_makes_no_slot(meshes, impl):
    require_impl(impl)
    mesh = meshes("batch=2,model=4")
    v = dvar(np.ones((8, 4), np.float32), mesh, ["model", U])
    opt = dsgd.SGD(0.1, mesh=mesh, implementation=impl)
    opt.apply_gradients([(dgrad(np.full((8, 4), 2.0), v), v)])
    assert opt.momentums == []
    assert len(opt.variables) == 1 and opt.variables[0] is opt.iterations
    np.testing.assert_allclose(value(v), 0.8, rtol=1e-6)


# -- config, serialization, older option objects -------------------------------------------------------
def _configs_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):  # a float learning rate is stored in a float32 variable
            assert a[k] == pytest.approx(b[k], rel=1e-7), f"config[{k!r}]: {a[k]!r} != {b[k]!r}"
        else:
            assert a[k] == b[k], f"config[{k!r}]: {a[k]!r} != {b[k]!r}"


@pytest.mark.parametrize("lr", ["float", "schedule", "callable"])
def test_config_round_trip(meshes, lr):
    mesh = meshes("batch=2,model=4")
    learning_rate = {"float": 0.05, "schedule": tf_keras.optimizers.schedules.ExponentialDecay(0.1, 3, 0.5),
                     "callable": lambda: 0.025}[lr]
    opt = dsgd.SGD(learning_rate, momentum=0.8, nesterov=True, amsgrad=True, weight_decay=0.01, clipnorm=1.0,
                   clipvalue=0.5, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3, jit_compile=True,
                   name="my_sgd", mesh=mesh)
    cfg = opt.get_config()
    assert cfg["mesh"] is not None and dtensor.Mesh.from_string(cfg["mesh"]) == mesh
    assert cfg["jit_compile"] is True  # kept as asked, not downgraded (no GPU here)
    assert cfg["momentum"] == 0.8 and cfg["nesterov"] is True and cfg["name"] == "my_sgd"
    if lr == "schedule":
        assert cfg["learning_rate"]["class_name"] == "ExponentialDecay"
    else:
        assert cfg["learning_rate"] == pytest.approx(0.05 if lr == "float" else 0.025)
    clone = dsgd.SGD.from_config(cfg)
    _configs_equal(clone.get_config(), cfg)
    assert clone._mesh == mesh and clone.jit_compile is True
    if lr == "schedule":
        assert isinstance(clone._learning_rate, tf_keras.optimizers.schedules.ExponentialDecay)
    # tf_keras serialization (registered as dsgd>SGD)
    ser = tf_keras.optimizers.serialize(opt)
    back = tf_keras.optimizers.deserialize(ser)
    assert isinstance(back, dsgd.SGD)
    _configs_equal(back.get_config(), cfg)
    # and through JSON
    import json

    back2 = tf_keras.optimizers.deserialize(json.loads(json.dumps(ser)))
    _configs_equal(back2.get_config(), cfg)


def test_config_without_mesh():
    opt = dsgd.SGD(0.3)
    cfg = opt.get_config()
    assert cfg["mesh"] is None and cfg["jit_compile"] is False
    _configs_equal(dsgd.SGD.from_config(cfg).get_config(), cfg)


def test_old_style_options_equal_keywords(meshes):
    mesh = meshes("batch=2,model=4")
    pairs = [
        (dict(gradients_clip_option=dsgd.GradientsClipOption(clipnorm=0.7)), dict(clipnorm=0.7)),
        (dict(gradients_clip_option=dsgd.GradientsClipOption(global_clipnorm=1.1)), dict(global_clipnorm=1.1)),
        (dict(gradients_clip_option=dsgd.GradientsClipOption(clipvalue=0.2)), dict(clipvalue=0.2)),
        (dict(ema_option=dsgd.EMAOption(use_ema=True, ema_momentum=0.6, ema_overwrite_frequency=2)),
         dict(use_ema=True, ema_momentum=0.6, ema_overwrite_frequency=2)),
    ]
    rng = np.random.default_rng(5)
    for old, new in pairs:
        w0 = randn(rng, (8, 4))
        gs = [randn(rng, (8, 4), scale=3) for _ in range(3)]
        results = []
        for kw in (old, new):
            o = dsgd.SGD(0.1, momentum=0.9, mesh=mesh, **kw)
            v = dvar(w0, mesh, ["model", U])
            for g in gs:
                o.apply_gradients([(dgrad(g, v), v)])
            results.append((o.get_config(), value(v)))
        _configs_equal(results[0][0], results[1][0])
        np.testing.assert_array_equal(results[0][1], results[1][1])


# -- weights: set_weights, save/load_own_variables, variables -------------------------------------------
def _trained(mesh, specs, steps=2, seed=0, **kw):
    rng = np.random.default_rng(seed)
    variables = [dvar(randn(rng, (8, 8)), mesh, s, name=f"v{i}") for i, s in enumerate(specs)]
    opt = dsgd.SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.7, mesh=mesh, **kw)
    for _ in range(steps):
        opt.apply_gradients([(dgrad(randn(rng, (8, 8)), v), v) for v in variables])
    return opt, variables


def test_variables_property(meshes):
    mesh = meshes("batch=2,model=4")
    opt, variables = _trained(mesh, SPECS)
    vs = opt.variables
    assert vs[0] is opt.iterations
    assert len(vs) == 1 + 2 * len(variables)
    for x in opt.momentums + opt._model_variables_moving_average:
        assert any(x is y for y in vs)
    assert int(value(opt.iterations)) == 2


def test_set_weights(meshes):
    mesh = meshes("batch=2,model=4")
    opt, variables = _trained(mesh, SPECS)
    rng = np.random.default_rng(11)
    new = [np.int64(7)] + [randn(rng, tuple(x.shape)).astype(np.float32) for x in opt.variables[1:]]
    new[0] = np.array(7, dtype=np.int64)
    opt.set_weights(new)
    for x, w in zip(opt.variables, new):
        np.testing.assert_array_equal(value(x), w)
    for x, v in zip(opt.variables[1:], opt.variables[1:]):
        assert layout_of(x) == layout_of(v)
    # tf.Variables from another optimizer work as weights too
    other, _ = _trained(mesh, SPECS, seed=3)
    opt.set_weights(other.variables)
    for x, y in zip(opt.variables, other.variables):
        np.testing.assert_array_equal(value(x), value(y))
    # a wrong shape is rejected before anything is assigned
    before = [value(x) for x in opt.variables]
    bad = [value(x) for x in opt.variables]
    bad[-1] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        opt.set_weights(bad)
    for x, b in zip(opt.variables, before):
        np.testing.assert_array_equal(value(x), b)
    with pytest.raises(ValueError, match="not yet been built"):
        dsgd.SGD(0.1, mesh=mesh).set_weights([])


def test_save_and_load_own_variables_sharded(meshes):
    mesh = meshes("batch=2,model=4")
    opt, variables = _trained(mesh, SPECS, steps=3)
    store = {}
    opt.save_own_variables(store)
    assert len(store) == len(opt.variables)
    for i, x in enumerate(opt.variables):
        np.testing.assert_array_equal(store[str(i)], value(x))
    # a fresh optimizer on the same (sharded) variables
    fresh = dsgd.SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.7, mesh=mesh)
    fresh.build(variables)
    fresh.load_own_variables(store)
    for x, y in zip(fresh.variables, opt.variables):
        np.testing.assert_array_equal(value(x), value(y))
        assert layout_of(x) == layout_of(y)
    # ... and onto other layouts (replicated on batch=8): values move, layouts stay the new ones
    mesh8 = meshes("batch=8")
    vars8 = [dvar(value(v), mesh8, [U, U]) for v in variables]
    other = dsgd.SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.7, mesh=mesh8)
    other.build(vars8)
    other.load_own_variables(store)
    for x, y in zip(other.variables, opt.variables):
        np.testing.assert_array_equal(value(x), value(y))
        assert layout_of(x).mesh == mesh8
    # training continues identically from the restored state
    g = randn(np.random.default_rng(9), (8, 8))
    opt.apply_gradients([(dgrad(g, v), v) for v in variables])
    other.apply_gradients([(dgrad(g, v), v) for v in vars8])
    for v, w in zip(variables, vars8):
        np.testing.assert_allclose(value(w), value(v), rtol=1e-6, atol=1e-7)


# -- learning rate ------------------------------------------------------------------------------------------
def test_learning_rate_property_and_setters(meshes):
    mesh = meshes("batch=2,model=4")
    opt = dsgd.SGD(0.1, mesh=mesh)
    np.testing.assert_allclose(value(opt.learning_rate), 0.1, rtol=1e-7)
    np.testing.assert_allclose(value(opt.lr), 0.1, rtol=1e-7)
    opt.lr = 0.05
    np.testing.assert_allclose(value(opt.learning_rate), 0.05, rtol=1e-7)
    opt.learning_rate = 0.5
    np.testing.assert_allclose(value(opt.lr), 0.5, rtol=1e-7)
    assert layout_of(opt.learning_rate).is_fully_replicated()
    v = dvar(np.ones((8, 4), np.float32), mesh, ["model", U])
    opt.apply_gradients([(dgrad(np.ones((8, 4)), v), v)])
    np.testing.assert_allclose(value(v), 0.5, rtol=1e-6)
    opt.learning_rate = tf.constant(0.25)
    opt.apply_gradients([(dgrad(np.ones((8, 4)), v), v)])
    np.testing.assert_allclose(value(v), 0.25, rtol=1e-6)
    # a schedule's learning rate is not settable (as the reference)
    sched = dsgd.SGD(tf_keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5), mesh=mesh)
    with pytest.raises(TypeError, match="not settable"):
        sched.learning_rate = 0.1
    # a tensor learning rate
    t = dsgd.SGD(tf.constant(0.2), mesh=mesh)
    w = dvar(np.ones((8, 4), np.float32), mesh, [U, "batch"])
    t.apply_gradients([(dgrad(np.ones((8, 4)), w), w)])
    np.testing.assert_allclose(value(w), 0.8, rtol=1e-6)


def test_callable_learning_rate_called_every_step(meshes):
    mesh = meshes("batch=2,model=4")
    values = iter([0.1, 0.1, 0.2, 0.05])  # construction reads the first value
    opt = dsgd.SGD(lambda: next(values), mesh=mesh)
    v = dvar(np.ones((8, 4), np.float32), mesh, ["model", U])
    expected = 1.0
    for lr in (0.1, 0.2, 0.05):
        opt.apply_gradients([(dgrad(np.ones((8, 4)), v), v)])
        expected -= lr
        np.testing.assert_allclose(value(v), expected, rtol=1e-6)


# -- minimize, compute_gradients, update_step, build, exclusions --------------------------------------------
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_minimize_and_compute_gradients_sharded(meshes, mode):
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(2)
    w0 = randn(rng, (8, 4))
    v = dvar(w0, mesh, ["model", U])
    opt = dsgd.SGD(0.1, momentum=0.5, mesh=mesh)
    loss = lambda: tf.reduce_sum(v * v) / 2.0  # noqa: E731  d/dv = v

    def run():
        opt.minimize(loss, [v])

    (tf.function(run) if mode == "function" else run)()
    np.testing.assert_allclose(value(v), 0.9 * w0, rtol=1e-6)
    gv = opt.compute_gradients(loss, [v])
    assert len(gv) == 1 and gv[0][1] is v
    assert layout_of(gv[0][0]) == layout_of(v)
    np.testing.assert_allclose(value(gv[0][0]), value(v), rtol=1e-6)
    with tf.GradientTape() as tape:
        t = tf.reduce_sum(v * 3.0)
    gv = opt.compute_gradients(t, [v], tape=tape)
    np.testing.assert_allclose(value(gv[0][0]), np.full((8, 4), 3.0))
    with pytest.raises(ValueError):
        opt.compute_gradients(t, [v])  # a tensor loss needs its tape


@pytest.mark.parametrize("nesterov", [False, True])
def test_update_step(meshes, nesterov):
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(4)
    w0 = randn(rng, (8, 8))
    v = dvar(w0, mesh, ["batch", "model"])
    opt = dsgd.SGD(0.1, momentum=0.9, nesterov=nesterov, mesh=mesh)
    opt.build([v])
    o64 = r64.Options64(learning_rate=0.1, momentum=0.9, nesterov=nesterov)
    state = r64.init_state([w0], o64)
    for _ in range(2):
        g = randn(rng, (8, 8))
        opt.update_step(dgrad(g, v), v)
        r64.step(state, [g], o64)
    assert_close(value(v), state.weights[0], "float32", "update_step weights")
    assert_close(value(opt.momentums[0]), state.momenta[0], "float32", "update_step momentum")
    assert int(value(opt.iterations)) == 0  # update_step is the per-variable rule only
    with pytest.raises(KeyError):
        opt.update_step(dgrad(g, v), dvar(w0, mesh, ["batch", "model"]))


def test_build_and_exclusions(meshes):
    mesh = meshes("batch=2,model=4")
    a = dvar(np.ones((8, 4), np.float32), mesh, ["model", U], name="kernel")
    b = dvar(np.ones((8,), np.float32), mesh, ["model"], name="bias")
    c = dvar(np.ones((4, 8), np.float32), mesh, [U, "batch"], name="gamma")
    opt = dsgd.SGD(0.1, weight_decay=0.5, momentum=0.9, mesh=mesh)
    opt.exclude_from_weight_decay(var_list=[c], var_names=["bia"])
    opt.build([a, b, c])
    n = len(opt.variables)
    opt.build([a, b, c])  # a second build is a no-op
    assert len(opt.variables) == n == 4
    with pytest.raises(ValueError, match="before the optimizer is built|configued before"):
        opt.exclude_from_weight_decay(var_names=["kernel"])
    zero = [dgrad(np.zeros(x.shape), x) for x in (a, b, c)]
    opt.apply_gradients(zip(zero, [a, b, c]))
    np.testing.assert_allclose(value(a), 1 - 0.1 * 0.5, rtol=1e-6)  # decayed
    np.testing.assert_allclose(value(b), 1.0)  # excluded by name
    np.testing.assert_allclose(value(c), 1.0)  # excluded by variable


def test_amsgrad_and_jit_compile_accepted(meshes):
    mesh = meshes("batch=2,model=4")
    opt = dsgd.SGD(0.1, amsgrad=True, jit_compile=True, mesh=mesh)
    assert opt.get_config()["amsgrad"] is True and opt.jit_compile is True
    v = dvar(np.ones((8, 4), np.float32), mesh, ["model", U])
    opt.apply_gradients([(dgrad(np.ones((8, 4)), v), v)])
    np.testing.assert_allclose(value(v), 0.9, rtol=1e-6)


def test_none_gradients_warned_all_none_refused_empty_list_noop(meshes, caplog):
    mesh = meshes("batch=2,model=4")
    a = dvar(np.ones((8, 4), np.float32), mesh, ["model", U], name="a")
    b = dvar(np.ones((8, 4), np.float32), mesh, [U, U], name="b")
    opt = dsgd.SGD(0.1, mesh=mesh)
    assert int(value(opt.apply_gradients([]))) == 0  # an empty list is a no-op
    assert int(value(opt.iterations)) == 0
    with caplog.at_level("WARNING", logger="dsgd"):
        opt.apply_gradients([(None, a), (dgrad(np.ones((8, 4)), b), b)])
    assert any("do not exist" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(value(a), 1.0)
    np.testing.assert_allclose(value(b), 0.9, rtol=1e-6)
    assert int(value(opt.iterations)) == 1
    # all None: tf_keras' ValueError (silently training nothing is worse), and nothing changes
    with pytest.raises(ValueError, match="No gradients provided for any variable.*'a:0', 'b:0'"):
        opt.apply_gradients([(None, a), (None, b)])
    assert int(value(opt.iterations)) == 1
    np.testing.assert_allclose(value(b), 0.9, rtol=1e-6)
