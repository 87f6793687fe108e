"""``grouped`` inside ``tf.function``: the labelled ``Assert`` node (:mod:`dsgd.impl.grouped_graph`).

The float64 grids (``test_optimizer_numerics``, ``test_sparse``) run it in their ``function``
mode and ``test_keras_fit`` under ``model.fit``; here: what is particular to the node — one
node per dtype per step, whatever the number of variables and layouts; mixed dtypes; a whole
custom training step whose gradients come back in another layout than their variables; and
XLA, which compiles ``Assert`` to nothing, so the node must never reach it.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

from _helpers import U, assert_close, check_subprocess, dgrad, dsgd, dvar, r64, randn, require_impl, run_subprocess, value
from dsgd.impl.grouped_graph import KERNEL_LABEL
from dsgd.state import to_layout


def _ran(opt) -> set:
    return set(opt.implementations_used())


def _labelled_nodes(concrete) -> int:
    return sum(1 for op in concrete.graph.get_operations()
               if op.type == "Assert" and op.node_def.attr["_kernel"].s.decode() == KERNEL_LABEL)


def test_one_node_per_dtype_mixed_dtypes_and_layouts(meshes):
    """Four layouts in float32 and one bfloat16 variable: two nodes per step (one per dtype), and
    every variable matches float64 after three steps."""
    require_impl("grouped")
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(5)
    specs = [((8, 4), [U, U], "float32"), ((8, 4), ["model", U], "float32"), ((4, 8), [U, "batch"], "float32"),
             ((8,), ["model"], "float32"), ((8, 4), [U, "model"], "bfloat16")]
    w0 = [randn(rng, s, d) for s, _, d in specs]
    vs = [dvar(w, mesh, spec, d, name=f"v{i}") for i, (w, (_, spec, d)) in enumerate(zip(w0, specs))]
    opt = dsgd.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01, mesh=mesh)
    o64 = r64.Options64(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    states = [r64.init_state([w], o64) for w in w0]
    fn = tf.function(lambda gs: opt.apply_gradients(zip(gs, vs)))
    for _ in range(3):
        gs = [randn(rng, s, d) for s, _, d in specs]
        fn([dgrad(g, v) for g, v in zip(gs, vs)])
        for st, g in zip(states, gs):
            r64.step(st, [g], o64)
    for v, st, (_, _, d) in zip(vs, states, specs):
        assert_close(value(v), st.weights[0], d, f"in-graph grouped, {v.name}")
    assert _ran(opt) == {"grouped_graph"}
    assert _labelled_nodes(fn.get_concrete_function([dgrad(w, v) for w, v in zip(w0, vs)])) == 2


def test_devices_gather_into_one_call_inside_a_loop(meshes):
    """On 8 devices the node's copies (one per device) gather into one kernel call per step; in a
    ``tf.range`` loop of 4 steps inside one function (as ``model.fit`` with ``steps_per_execution``)
    each iteration gathers separately, and after two calls (8 steps) every variable, replicated
    and sharded, matches float64."""
    require_impl("grouped")
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(11)
    specs = [((8, 4), [U, U]), ((8, 4), ["model", U]), ((4, 8), [U, "batch"]), ((16,), ["model"])]
    w0 = [randn(rng, s, "float32") for s, _ in specs]
    vs = [dvar(w, mesh, spec, "float32", name=f"loop{i}") for i, (w, (_, spec)) in enumerate(zip(w0, specs))]
    opt = dsgd.SGD(0.05, momentum=0.9, mesh=mesh)
    o64 = r64.Options64(learning_rate=0.05, momentum=0.9)
    state = r64.init_state(w0, o64)
    steps = 4

    @tf.function
    def run(grad_lists):
        for k in tf.range(steps):
            opt.apply_gradients(zip([tf.gather(g, k) for g in grad_lists], vs))

    for _ in range(2):
        gs = [[randn(rng, s, "float32") for s, _ in specs] for _ in range(steps)]
        stacked = [to_layout(tf.constant(np.stack([g[i] for g in gs]), tf.float32),
                             dtensor.Layout([U] + spec, mesh)) for i, (_, spec) in enumerate(specs)]
        run(stacked)
        for g in gs:
            r64.step(state, g, o64)
    for i, v in enumerate(vs):
        assert_close(value(v), state.weights[i], "float32", f"gathered in-graph step in a loop, {v.name}")
    assert _ran(opt) == {"grouped_graph"}


def test_two_optimizers_in_one_function_gather_separately(meshes):
    """Two dsgd optimizers (as in a GAN step) updating same-shaped variables in one function on 8
    devices: each node's copies gather with their own, and both match float64."""
    require_impl("grouped")
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(13)
    w0 = [randn(rng, (8, 4), "float32") for _ in range(2)]
    vs = [dvar(w, mesh, ["model", U], "float32", name=f"gan{i}") for i, w in enumerate(w0)]
    opts = [dsgd.SGD(0.05, momentum=0.9, mesh=mesh), dsgd.SGD(0.1, momentum=0.5, mesh=mesh)]
    o64s = [r64.Options64(learning_rate=0.05, momentum=0.9), r64.Options64(learning_rate=0.1, momentum=0.5)]
    states = [r64.init_state([w], o) for w, o in zip(w0, o64s)]

    @tf.function
    def step(g0, g1):
        opts[0].apply_gradients([(g0, vs[0])])
        opts[1].apply_gradients([(g1, vs[1])])

    for _ in range(3):
        gs = [randn(rng, (8, 4), "float32") for _ in range(2)]
        step(*[dgrad(g, v) for g, v in zip(gs, vs)])
        for st, g, o in zip(states, gs, o64s):
            r64.step(st, [g], o)
    for v, st in zip(vs, states):
        assert_close(value(v), st.weights[0], "float32", f"two optimizers in one function, {v.name}")
    assert all(_ran(o) == {"grouped_graph"} for o in opts)


def test_a_read_after_the_step_in_the_same_function_sees_the_update(meshes):
    """The node takes the variables' handles (the kernel finds them in the packed sets) only so
    that TensorFlow orders it against the function's other uses of the variables: a read of the
    weights after ``apply_gradients`` in the same function, with no read before it, sees the
    updated weights at every step.  (Without the handles it saw the old ones at 20 of 20 steps.)"""
    require_impl("grouped")
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(17)
    specs = [((16, 8), [U, "model"]), ((8, 16), ["model", U]), ((16,), [U])]
    w0 = [randn(rng, s, "float32") for s, _ in specs]
    vs = [dvar(w, mesh, spec, "float32", name=f"after{i}") for i, (w, (_, spec)) in enumerate(zip(w0, specs))]
    opt = dsgd.SGD(0.1, momentum=0.9, mesh=mesh)
    o64 = r64.Options64(learning_rate=0.1, momentum=0.9)
    state = r64.init_state(w0, o64)

    @tf.function
    def step(gs):
        opt.apply_gradients(zip(gs, vs))
        return [tf.reduce_sum(v) for v in vs]

    for k in range(4):
        gs = [randn(rng, s, "float32") for s, _ in specs]
        sums = step([dgrad(g, v) for g, v in zip(gs, vs)])
        r64.step(state, gs, o64)
        for v, s, w in zip(vs, sums, state.weights):
            assert float(s.numpy()) == pytest.approx(float(w.sum()), rel=1e-4, abs=1e-3), f"step {k}, {v.name}"
    assert _ran(opt) == {"grouped_graph"}


def test_custom_train_step_relayouts_gradients(meshes):
    """A whole custom tf.function step (GradientTape, then apply_gradients) on a LayoutMap model:
    gradients may come back replicated for sharded kernels; the in-graph path relayouts them, and
    its weights equal the fused DTensor path's bit for bit."""
    require_impl("grouped")
    from dsgd.harness import models

    mesh = meshes("batch=2,model=4")
    spec = models.get_model_spec("resmlp-small")
    out = {}
    for impl in ("auto", "fused"):
        opt = dsgd.SGD(0.05, momentum=0.9, mesh=mesh, implementation=impl)
        ts = models.build_training_step(spec, mesh, opt, "train_step")
        for _ in range(3):
            ts.step()
        out[impl] = [value(v) for v in ts.model.trainable_variables]
        if impl == "auto":
            assert _ran(opt) == {"grouped_graph"}
    for a, f in zip(out["auto"], out["fused"]):
        np.testing.assert_array_equal(a, f)


def test_xla_compiled_function_runs_fused(meshes):
    """Inside ``tf.function(jit_compile=True)`` XLA would drop an Assert: ``auto`` runs ``fused`` there
    (on one device: XLA compiles DTensor functions on a single-device mesh)."""
    require_impl("grouped")
    rng = np.random.default_rng(2)
    w0 = randn(rng, (6, 5))
    v = tf.Variable(w0, dtype=tf.float32)
    opt = dsgd.SGD(0.1, momentum=0.9)
    o64 = r64.Options64(learning_rate=0.1, momentum=0.9)
    state = r64.init_state([w0], o64)
    fn = tf.function(lambda g: opt.apply_gradients([(g, v)]), jit_compile=True)
    for _ in range(3):
        g = randn(rng, (6, 5))
        fn(tf.constant(g, tf.float32))
        r64.step(state, [g], o64)
    assert_close(v.numpy(), state.weights[0], "float32", "auto under jit_compile=True")
    assert _ran(opt) == {"fused"}


@pytest.mark.slow
def test_xla_auto_clustering_leaves_the_node_alone():
    """With XLA auto-clustering on for the whole process (TF_XLA_FLAGS, as users set it for speed),
    the labelled node is kept out of XLA clusters (``_XlaCompile=False``): the update still happens."""
    require_impl("grouped")
    out = check_subprocess(run_subprocess("""
        import numpy as np, tensorflow as tf, dsgd
        from _helpers import dvar, dgrad, value, U
        from dsgd.meshspec import make_mesh
        mesh = make_mesh("1")  # auto-clustering breaks DTensor's own relayouts on several CPU devices
        v = dvar(np.ones((8, 4)), mesh, ["batch", U])
        opt = dsgd.SGD(0.5, mesh=mesh)
        fn = tf.function(lambda g: opt.apply_gradients([(g, v)]))
        for _ in range(2):
            fn(dgrad(np.ones((8, 4)), v))
        print("RESULT", float(value(v).max()), float(value(v).min()),
              opt.implementations_used())
    """, env={"TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"}, timeout=600))
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    assert line == "RESULT 0.0 0.0 ['grouped_graph']", line  # 1 - 2 * 0.5 * 1


def test_a_step_traced_for_variable_sets_that_are_gone_fails_clearly():
    """The node finds the variables and slots by the address of the sets packed when it was
    traced; once those sets are gone, the traced step fails with a clear error: a stale address
    is never dereferenced.  (After an error DTensor's eager context cannot be used again, so the
    variable is not read back.)"""
    require_impl("grouped")
    out = check_subprocess(run_subprocess("""
        import gc
        import numpy as np, tensorflow as tf, dsgd
        from _helpers import dvar, dgrad, value, U
        from dsgd.meshspec import make_mesh
        mesh = make_mesh("batch=2,model=4")
        v = dvar(np.ones((8, 4)), mesh, ["model", U])
        opt = dsgd.SGD(0.5, momentum=0.9, mesh=mesh)
        fn = tf.function(lambda g: opt.apply_gradients([(g, v)]))
        g = dgrad(np.ones((8, 4)), v)
        fn(g)
        from tensorflow.python.eager import context
        context.async_wait()
        for inst in opt.implementation_instances():
            inst._packed.clear()
        gc.collect()
        try:
            fn(g)
            context.async_wait()
            print("RESULT ran")
        except tf.errors.FailedPreconditionError as e:
            print("RESULT", "trace the step again" in str(e))
    """, timeout=300))
    assert "RESULT True" in out, out


@pytest.mark.parametrize("join_delay_ms", [0, 300], ids=["as-is", "cancelled-while-joining"])
def test_a_device_failing_before_the_node_does_not_hang_the_others(join_delay_ms):
    """The node's copies wait for each other; when one device fails before reaching it (here a
    NaN in one shard trips ``check_numerics``), the step fails at once instead of hanging.

    With a delay between a copy registering for cancellation and joining, the cancellation runs
    while the copies are in that gap: before the gathering kept a mark of cancelled steps, those
    copies waited for ever (1 run in ~25 without the delay, most with it).  DTensor reports either
    the NaN or, now and then (also with ``implementation="fused"``), a ``CancelledError`` from
    another device's part of the call; both are an error in bounded time."""
    require_impl("grouped")
    out = check_subprocess(run_subprocess("""
        import time
        import numpy as np, tensorflow as tf, dsgd
        from _helpers import dvar, dgrad, U
        from dsgd.meshspec import make_mesh
        mesh = make_mesh("batch=2,model=4")
        v = dvar(np.ones((8, 4)), mesh, ["model", U])
        opt = dsgd.SGD(0.5, momentum=0.9, mesh=mesh)

        @tf.function
        def fn(g):
            opt.apply_gradients([(tf.debugging.check_numerics(g, "bad gradient"), v)])

        fn(dgrad(np.ones((8, 4)), v))
        bad = np.ones((8, 4))
        bad[0, 0] = np.nan  # only the shards of model=0 have it
        t0 = time.time()
        try:
            fn(dgrad(bad, v))
            from tensorflow.python.eager import context
            context.async_wait()
            print("RESULT ran")
        except tf.errors.InvalidArgumentError as e:
            print("RESULT", "bad gradient" in str(e), time.time() - t0 < 30)
        except tf.errors.CancelledError as e:
            print("RESULT", True, time.time() - t0 < 30, "(cancelled:", str(e)[:200], ")")
    """, timeout=120, env={"DSGD_FAULT_JOIN_DELAY_MS": str(join_delay_ms)}))
    assert "RESULT True True" in out, out
