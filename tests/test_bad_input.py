"""Bad input (issue 2's table, issue 15's modes): a clear error naming the argument, in
bounded time, raised before any state changes — eagerly, inside ``tf.function`` and under
``model.fit``.

* Constructor and setter arguments are checked in Python before any TensorFlow state exists.
* Step-time errors (gradients and variables that do not fit) run in subprocesses, every case
  of a mode inside one, because an eager DTensor op that fails poisons its whole process,
  and a case that could block (a gradient on another mesh, inside ``tf.function``) must
  fail by the subprocess' timeout instead of hanging CI.  Each case puts the bad pair *last*
  in the list, then checks that no variable, slot or ``iterations`` changed, that the error
  came within :data:`SECONDS`, and that a good step still works afterwards (the process is
  not poisoned).

Inside ``tf.function`` the checks run while tracing: shape, dtype and variables as eagerly,
and the gradient's mesh and layout wherever they are known then — a function argument, a
captured tensor or a ``dtensor.relayout`` (:mod:`dsgd.traced`): the same errors as eagerly.
A gradient computed inside the function (``tape.gradient`` under ``model.fit``) has the
layout DTensor's propagation gives it and is relaid out to its variable's.  A traced
function is reused for later arguments of the same shape and dtype whatever their layout,
so every step also passes its gradients through one same-mesh guard: a gradient on another
mesh in such a later call is refused by DTensor when the function is called
(``OpError``, "must have same mesh configuration"), before anything runs — it used to block
forever on the ``fused`` path.
"""
from __future__ import annotations

import json
import math
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from _helpers import check_subprocess, dsgd, run_subprocess

# -- constructor ------------------------------------------------------------------------------------
CTOR_CASES = [
    (dict(learning_rate=-0.1), ValueError, "learning_rate"),
    (dict(learning_rate=float("nan")), ValueError, "learning_rate"),
    (dict(learning_rate=float("inf")), ValueError, "learning_rate"),
    (dict(learning_rate="fast"), ValueError, "learning_rate"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(clipnorm=1.0, global_clipnorm=1.0), ValueError, "global_clipnorm"),
    (dict(clipnorm=-1.0), ValueError, "clipnorm"),
    (dict(clipvalue=float("inf")), ValueError, "clipvalue"),
    (dict(weight_decay=-0.01), ValueError, "weight_decay"),
    (dict(use_ema=True, ema_momentum=-0.1), ValueError, "ema_momentum"),
    (dict(use_ema=True, ema_momentum=1.01), ValueError, "ema_momentum"),
    (dict(use_ema=True, ema_overwrite_frequency=0), ValueError, "ema_overwrite_frequency"),
    (dict(use_ema=True, ema_overwrite_frequency=-2), ValueError, "ema_overwrite_frequency"),
    (dict(use_ema=True, ema_overwrite_frequency=2.5), ValueError, "ema_overwrite_frequency"),
    (dict(not_an_argument=1), TypeError, "not_an_argument"),
    (dict(decay=0.5), ValueError, "decay is deprecated"),  # tf_keras' legacy-argument ValueError
    (dict(gradient_aggregator=lambda gv: gv), ValueError, "gradient_aggregator is deprecated"),
    (dict(gradient_transformers=[]), ValueError, "gradient_transformers is deprecated"),
    (dict(momentum=tf.Variable(2.0)), ValueError, "must be between \\[0, 1\\]"),
    (dict(mesh="batch=2,model=4"), TypeError, "mesh"),
    (dict(mesh=object()), TypeError, "mesh"),
    (dict(implementation="nope"), ValueError, "implementation"),
    (dict(gradients_clip_option={"clipnorm": 1.0}), TypeError, "gradients_clip_option"),
    (dict(gradients_clip_option=dsgd.GradientsClipOption(clipnorm=1.0), clipnorm=1.0), ValueError,
     "gradients_clip_option"),
    (dict(ema_option=dsgd.EMAOption(use_ema=True), use_ema=True), ValueError, "ema_option"),
    (dict(ema_option=dsgd.EMAOption(use_ema=True, ema_overwrite_frequency=0)), ValueError, "ema_overwrite_frequency"),
    (dict(gradients_clip_option=dsgd.GradientsClipOption(clipnorm=1.0, global_clipnorm=2.0)), ValueError,
     "global_clipnorm"),
]


def _ctor_id(kwargs: dict) -> str:
    """A stable test id (the same in every process, as pytest-xdist needs): no object addresses."""
    return "-".join(re.sub(r" at 0x[0-9a-f]+", "", f"{k}={v!r}")[:30] for k, v in kwargs.items())


@pytest.mark.parametrize("kwargs, exc, name", CTOR_CASES, ids=[_ctor_id(c[0]) for c in CTOR_CASES])
def test_constructor_rejects(kwargs, exc, name):
    with pytest.raises(exc, match=name) as info:
        dsgd.SGD(**kwargs)
    assert "allowed" in str(info.value) or "must" in str(info.value) or "At most one" in str(info.value) \
        or "not both" in str(info.value), f"the error does not say what is allowed: {info.value}"


def test_tensor_learning_rate_checked():
    with pytest.raises(ValueError, match="learning_rate"):
        dsgd.SGD(tf.constant(-1.0))
    with pytest.raises(ValueError, match="learning_rate"):
        dsgd.SGD(lambda: -0.5)  # a callable is checked on its first value


def test_setter_rejects_and_keeps_value():
    opt = dsgd.SGD(0.1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning_rate"):
            opt.learning_rate = bad
        with pytest.raises(ValueError, match="learning_rate"):
            opt.lr = bad
    assert math.isclose(float(opt.learning_rate.numpy()), 0.1, rel_tol=1e-7)
    sched = dsgd.SGD(tf_keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5))
    with pytest.raises(TypeError, match="not settable"):
        sched.learning_rate = 0.2


def test_callable_learning_rate_going_bad_changes_nothing():
    values = iter([0.1, 0.1, -5.0])
    v = tf.Variable([1.0, 2.0])
    opt = dsgd.SGD(lambda: next(values), momentum=0.9)
    opt.apply_gradients([(tf.constant([1.0, 1.0]), v)])
    before = (v.numpy().copy(), opt.momentums[0].numpy().copy(), int(opt.iterations.numpy()))
    with pytest.raises(ValueError, match="learning_rate"):
        opt.apply_gradients([(tf.constant([1.0, 1.0]), v)])
    np.testing.assert_array_equal(v.numpy(), before[0])
    np.testing.assert_array_equal(opt.momentums[0].numpy(), before[1])
    assert int(opt.iterations.numpy()) == before[2]


# -- step-time errors, in subprocesses -----------------------------------------------------------------
SECONDS = 30  # a refused step answers within this (a loaded 2-core CI machine: tracing included)

# name: (eager expectation, function expectation, message words)
# expectations: "ValueError" / "TypeError" (raised by dsgd in Python), "OpError" (refused by
# DTensor when the function is called).
STEP_CASES = {
    "grad_shape": ("ValueError", "ValueError", ["gradient", "b", "shape"]),
    "grad_dtype": ("ValueError", "ValueError", ["gradient", "b", "dtype"]),
    "grad_mesh": ("ValueError", "ValueError", ["gradient", "b", "mesh"]),
    "grad_mesh_4_devices": ("ValueError", "ValueError", ["gradient", "b", "mesh"]),  # used to hang (fused)
    "grad_mesh_later_call": ("ValueError", "OpError", ["gradient", "b", "mesh"]),  # function: same TensorSpec
    "grad_layout": ("ValueError", "ValueError", ["gradient", "a", "layout"]),
    "grad_not_dtensor": ("ValueError", "ValueError", ["gradient", "b", "DTensor"]),
    "sparse_row_shape": ("ValueError", "ValueError", ["gradient", "b", "row shape"]),
    "unknown_variable": ("ValueError", "ValueError", ["variable", "c"]),
    "var_other_mesh": ("ValueError", "ValueError", ["variable", "other", "mesh"]),
    "plain_var_with_mesh": ("ValueError", "ValueError", ["plain", "mesh"]),
    "dvar_without_mesh": ("ValueError", "ValueError", ["DVariable", "mesh"]),
    "no_gradients": ("ValueError", "ValueError", ["No gradients provided", "a:0", "b:0"]),
}
# cases that could block if a check were missing: their own subprocess, so a hang fails only them
RISKY = ("grad_mesh_4_devices", "grad_mesh_later_call")
IMPLS_IN_GRAPH = ("auto", "fused")  # auto runs grouped in-graph; fused is the one that used to block


def _outcome(fn) -> dict:
    """Run ``fn``; what it raised (or "applied") and how long it took."""
    import time

    t0 = time.perf_counter()
    res = {"raised": "applied", "message": ""}
    try:
        fn()
    except (ValueError, TypeError, KeyError) as e:
        res["raised"], res["message"] = type(e).__name__, str(e)[-1500:]
    except tf.errors.OpError as e:
        res["raised"], res["message"] = "OpError", str(e)[:500]
    res["seconds"] = time.perf_counter() - t0
    return res


def _run_step_cases(mode: str, names: list, implementation: str = "auto") -> dict:
    """Runs in the subprocess: the STEP_CASES ``names`` in ``mode``; returns what happened, per case."""
    from tensorflow.experimental import dtensor

    from _helpers import U, dgrad, dvar, value
    from dsgd import meshspec
    from dsgd.state import to_layout

    m24, m8, m4 = (meshspec.make_mesh(s) for s in ("batch=2,model=4", "batch=8", "batch=4"))
    ones = np.ones((8, 4), np.float32)
    out = {}

    def setup(fresh=False, mesh=m24):
        a = dvar(ones, m24, ["model", U], name="a")
        b = dvar(ones, m24, [U, U], name="b")
        opt = dsgd.SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.5, mesh=mesh, implementation=implementation)
        if not fresh:
            opt.apply_gradients([(dgrad(ones, a), a), (dgrad(ones, b), b)])  # built, one step taken
        return a, b, opt

    def snapshot(vs, opt):
        return [value(v) for v in vs] + [value(x) for x in opt.variables]

    def stepper(opt, variables):
        if mode == "eager":
            return lambda grads: opt.apply_gradients(zip(grads, variables))
        return tf.function(lambda gs: opt.apply_gradients(zip(gs, variables)))

    def case(name):
        a, b, opt = setup(fresh=name in ("var_other_mesh", "plain_var_with_mesh", "dvar_without_mesh"),
                          mesh=None if name == "dvar_without_mesh" else m24)
        ga, gb = dgrad(ones, a), dgrad(ones, b)
        vs = [a, b]
        if name == "grad_shape":
            pairs = [(ga, a), (to_layout(np.ones((4, 8), np.float32), dtensor.Layout([U, U], m24)), b)]
        elif name == "grad_dtype":
            pairs = [(ga, a), (to_layout(np.ones((8, 4), np.float16), dtensor.Layout([U, U], m24)), b)]
        elif name in ("grad_mesh", "grad_mesh_later_call"):
            pairs = [(ga, a), (to_layout(ones, dtensor.Layout([U, U], m8)), b)]
        elif name == "grad_mesh_4_devices":
            pairs = [(ga, a), (to_layout(ones, dtensor.Layout([U, U], m4)), b)]
        elif name == "grad_layout":
            pairs = [(gb, b), (to_layout(ones, dtensor.Layout([U, U], m24)), a)]
        elif name == "grad_not_dtensor":
            pairs = [(ga, a), (tf.ones((8, 4)), b)]
        elif name == "sparse_row_shape":
            rep = lambda x: to_layout(x, dtensor.Layout.replicated(m24, np.ndim(x)))  # noqa: E731
            sl = tf.IndexedSlices(rep(np.ones((2, 5), np.float32)), rep(np.array([0, 1], np.int64)),
                                  rep(np.array([8, 5], np.int64)))
            pairs = [(ga, a), (sl, b)]
        elif name == "unknown_variable":
            c = dvar(ones, m24, [U, U], name="c")
            pairs = [(ga, a), (gb, b), (dgrad(ones, c), c)]
            vs = [a, b, c]
        elif name == "var_other_mesh":
            other = dvar(ones, m8, [U, U], name="other")
            pairs = [(ga, a), (dgrad(ones, other), other)]
            vs = [a, other]
        elif name == "plain_var_with_mesh":
            plain = tf.Variable(ones, name="plain")
            pairs = [(ga, a), (tf.ones((8, 4)), plain)]
            vs = [a, plain]
        elif name == "dvar_without_mesh":
            plain = tf.Variable(ones, name="plain")
            pairs = [(tf.ones((8, 4)), plain), (ga, a)]
            vs = [plain, a]
        elif name == "no_gradients":
            pairs = [(None, a), (None, b)]
        step = stepper(opt, [v for _, v in pairs])
        if name == "grad_mesh_later_call":
            step([ga, gb])  # traced for good gradients; the bad ones reuse that trace (same TensorSpec)
        before = snapshot(vs, opt)
        it_before = int(value(opt.iterations))
        n_vars_before = len(opt.variables)
        res = _outcome(lambda: step([g for g, _ in pairs]))
        res["unchanged"] = (len(opt.variables) == n_vars_before and all(
            np.array_equal(x, y) for x, y in zip(snapshot(vs, opt), before)))
        res["iterations_delta"] = int(value(opt.iterations)) - it_before
        # the process is not poisoned: a good step works
        try:
            good = [(dgrad(ones, v) if v.__class__.__name__ == "DVariable" else tf.ones((8, 4)), v) for v in vs
                    if (v.__class__.__name__ == "DVariable") == (opt._mesh is not None)
                    and (getattr(v, "name", "").split(":")[0] not in ("c", "other"))]
            stepper(opt, [v for _, v in good])([g for g, _ in good])
            res["then_ok"] = bool(np.all(np.isfinite(value(good[0][1]))))
        except Exception as e:  # noqa: BLE001
            res["then_ok"] = False
            res["then_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return res

    # Python-checked cases first, DTensor-refused ones last (they are the ones that could poison)
    for name in sorted(names, key=lambda n: STEP_CASES[n][0 if mode == "eager" else 1] == "OpError"):
        try:
            out[name] = case(name)
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            out[name] = {"raised": "crash", "message": f"{type(e).__name__}: {e}"[:800]}
    return out


# -- model.fit --------------------------------------------------------------------------------------------
# name: (message words); every case must raise ValueError while fit traces its train step.
FIT_CASES = {
    "grad_shape": ["gradient", "d2/bias", "shape"],
    "grad_dtype": ["gradient", "d2/bias", "dtype"],
    "grad_mesh": ["gradient", "d2/bias", "mesh"],
    "grad_mesh_4_devices": ["gradient", "d2/bias", "mesh"],
    "grad_layout": ["gradient", "d1/kernel", "layout"],
    "grad_not_dtensor": ["gradient", "d2/bias", "DTensor"],
    "var_other_mesh": ["variable", "d1/kernel", "mesh"],
    "plain_var_with_mesh": ["plain", "mesh"],
    "dvar_without_mesh": ["DVariable", "mesh"],
    "no_gradients": ["No gradients provided", "d1/kernel"],
}


def _run_fit_cases(names: list) -> dict:
    """Runs in the subprocess: ``model.fit`` with dsgd.SGD on a mesh (a LayoutMap model, a
    DTensorDataset), one bad input per case brought in by a ``train_step`` override."""
    from tensorflow.experimental import dtensor

    from _helpers import U, value
    from dsgd import meshspec
    from test_keras_fit import _dataset, _layout_map

    m24, m8, m4 = (meshspec.make_mesh(s) for s in ("batch=2,model=4", "batch=8", "batch=4"))
    m14 = meshspec.make_mesh("batch=1,model=4")  # another mesh the LayoutMap's axes fit
    plain_bias = tf.zeros((4,))  # an eager, non-DTensor tensor the train step captures

    def spoil(name, g, v):
        """The bad gradient of case ``name`` for variable ``v`` (or ``g`` unchanged)."""
        vname = v.name.split(":")[0]
        if vname.endswith("d2/bias"):
            if name == "grad_shape":
                return tf.zeros((5,))
            if name == "grad_dtype":
                return tf.cast(g, tf.float16)
            if name == "grad_mesh":
                return dtensor.relayout(g, dtensor.Layout.replicated(m8, 1))
            if name == "grad_mesh_4_devices":
                return dtensor.relayout(g, dtensor.Layout.replicated(m4, 1))
            if name == "grad_not_dtensor":
                return plain_bias
        if vname.endswith("d1/kernel") and name == "grad_layout":
            return dtensor.relayout(g, dtensor.Layout.replicated(m24, 2))
        if name == "no_gradients":
            return None
        return g

    class Spoiled(tf_keras.Model):
        case = None

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compiled_loss(y, self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(
                [(spoil(self.case, g, v), v) for g, v in zip(grads, self.trainable_variables)])
            return {"loss": loss}

    def build(name, mesh_of_model, opt_mesh):
        tf_keras.utils.set_random_seed(1)
        scope = _layout_map(mesh_of_model).scope() if mesh_of_model is not None else tf.name_scope("plain")
        with scope:
            inp = tf_keras.Input((6,), batch_size=16)
            h = tf_keras.layers.Dense(8, activation="relu", name="d1")(inp)
            model = Spoiled(inp, tf_keras.layers.Dense(4, name="d2")(h))
        model.case = name
        opt = dsgd.SGD(0.1, momentum=0.9, mesh=opt_mesh)
        model.compile(optimizer=opt, loss="mse")
        return model, opt

    def data(mesh):
        if mesh is not None:
            return _dataset(mesh)
        rng = np.random.default_rng(0)
        return tf.data.Dataset.from_tensor_slices(
            (rng.standard_normal((64, 6)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32))
        ).batch(16).repeat()

    out = {}
    for name in names:
        try:
            model_mesh = {"var_other_mesh": m14, "plain_var_with_mesh": None}.get(name, m24)
            opt_mesh = None if name == "dvar_without_mesh" else m24
            model, opt = build(name, model_mesh, opt_mesh)
            before = [value(v) for v in model.variables]
            res = _outcome(lambda: model.fit(data(model_mesh), epochs=1, steps_per_epoch=2, verbose=0))
            res["unchanged"] = all(np.array_equal(value(v), b) for v, b in zip(model.variables, before)) and all(
                float(np.max(np.abs(value(x)))) == 0 for x in opt.variables)  # iterations and slots still 0
            out[name] = res
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            out[name] = {"raised": "crash", "message": f"{type(e).__name__}: {e}"[:800]}
    # the process is not poisoned: a good fit trains
    model, opt = build(None, m24, m24)
    hist = model.fit(data(m24), epochs=1, steps_per_epoch=2, verbose=0)
    out["_then_ok"] = bool(int(value(opt.iterations)) == 2 and np.isfinite(hist.history["loss"][-1]))
    return out


def _subprocess_results(call: str, timeout: float) -> dict:
    """``call`` (an expression giving a JSON-able dict) in a fresh 8-device interpreter."""
    proc = run_subprocess(f"""
        import json
        from test_bad_input import _run_fit_cases, _run_step_cases
        print("@@RESULTS " + json.dumps({call}))
    """, timeout=timeout)
    out = check_subprocess(proc)
    line = [x for x in out.splitlines() if x.startswith("@@RESULTS ")]
    assert line, f"no results from the subprocess:\n{out[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(line[-1][len("@@RESULTS "):])


@pytest.fixture(scope="module")
def step_results():
    """{mode: {case: outcome}}; a subprocess that times out fails its own cases only."""
    safe = [n for n in STEP_CASES if n not in RISKY]
    calls = {
        "safe": ('{m: _run_step_cases(m, %r) for m in ("eager", "function")}' % safe, 300),
        "risky": ('{"eager": _run_step_cases("eager", %r), "function": _run_step_cases("function", %r), '
                  '"function-fused": _run_step_cases("function", %r, "fused")}' % ((list(RISKY),) * 3), 150),
        "fit": ('{"fit": _run_fit_cases(%r)}' % list(FIT_CASES), 300),
    }
    out: dict = {}
    for group, (call, timeout) in calls.items():
        try:
            for mode, res in _subprocess_results(call, timeout).items():
                out.setdefault(mode, {}).update(res)
        except subprocess.TimeoutExpired:
            out.setdefault("_timed_out", []).append(group)
    return out


def _result(step_results, mode: str, case: str) -> dict:
    res = step_results.get(mode, {}).get(case)
    assert res is not None, (f"{case}/{mode}: no result; subprocess groups that timed out (a hang): "
                             f"{step_results.get('_timed_out')}")
    return res


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_rejects_before_any_change(step_results, case, mode):
    expected = STEP_CASES[case][0 if mode == "eager" else 1]
    words = STEP_CASES[case][2]
    res = _result(step_results, mode, case)
    assert res["raised"] == expected, f"{case}/{mode}: expected {expected}, got {res['raised']}: {res['message']}"
    if expected in ("ValueError", "TypeError"):
        for w in words:
            assert w in res["message"], f"{case}/{mode}: the error does not name {w!r}: {res['message']}"
    else:
        assert "same mesh" in res["message"], f"{case}/{mode}: not DTensor's mesh refusal: {res['message']}"
    assert res["seconds"] < SECONDS, f"{case}/{mode}: took {res['seconds']:.1f} s"
    assert res["unchanged"], f"{case}/{mode}: state changed although the step was refused"
    assert res["iterations_delta"] == 0
    assert res["then_ok"], f"{case}/{mode}: a good step failed afterwards: {res.get('then_error')}"


@pytest.mark.parametrize("case", RISKY)
def test_fused_in_graph_never_blocks(step_results, case):
    """The case that used to block forever (fused, inside tf.function) is refused on that path too."""
    res = _result(step_results, "function-fused", case)
    assert res["raised"] == STEP_CASES[case][1], f"{case}: got {res['raised']}: {res['message']}"
    assert res["seconds"] < SECONDS and res["unchanged"] and res["then_ok"], res


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_rejects_before_any_change(step_results, case):
    res = _result(step_results, "fit", case)
    assert res["raised"] == "ValueError", f"{case}/fit: expected ValueError, got {res['raised']}: {res['message']}"
    for w in FIT_CASES[case]:
        assert w in res["message"], f"{case}/fit: the error does not name {w!r}: {res['message']}"
    assert res["seconds"] < SECONDS, f"{case}/fit: took {res['seconds']:.1f} s"
    assert res["unchanged"], f"{case}/fit: a weight, a slot or iterations changed although the step was refused"
    assert step_results["fit"]["_then_ok"], "a good fit failed after the refused ones"
