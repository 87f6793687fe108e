"""Bad input (issue 2's table): a clear error naming the argument, raised before any state changes.

* Constructor and setter arguments are checked in Python before any TensorFlow state exists.
* Step-time errors (gradients and variables that do not fit) run in a subprocess — one per
  mode, every case inside it — because an eager DTensor op that fails poisons its whole
  process.  Each case puts the bad pair *last* in the list, then checks that no variable,
  slot or ``iterations`` changed, and that a good step still works afterwards (the process
  is not poisoned).

Inside ``tf.function`` the checks that need concrete values happen while tracing (shape,
dtype, variables: the same errors as eagerly).  A gradient's mesh and layout are not known
while tracing, so dsgd relays every dense gradient out to its variable's layout there: a
gradient with another layout, or on another mesh over the same devices, gives the correct
update (a mismatched layout used to segfault the fused path); a plain (non-DTensor) tensor
is refused by DTensor when the function is called — before anything runs, and the process
stays usable.
"""
from __future__ import annotations

import json
import math

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


@pytest.mark.parametrize("kwargs, exc, name", CTOR_CASES, ids=[
    "-".join(f"{k}={v!r}"[:30] for k, v in c[0].items()) for c in CTOR_CASES])
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


# -- step-time errors, in a subprocess ----------------------------------------------------------------------
# name: (eager expectation, function expectation, message words)
# expectations: "ValueError" / "TypeError" (raised by dsgd in Python), "OpError" (refused by
# DTensor at call time), "applied" (no error; the update must be correct).
STEP_CASES = {
    "grad_shape": ("ValueError", "ValueError", ["gradient", "b", "shape"]),
    "grad_dtype": ("ValueError", "ValueError", ["gradient", "b", "dtype"]),
    "grad_mesh": ("ValueError", "applied", ["gradient", "b", "mesh"]),
    "grad_layout": ("ValueError", "applied", ["gradient", "a", "layout"]),
    "grad_not_dtensor": ("ValueError", "OpError", ["gradient", "b", "DTensor"]),
    "sparse_row_shape": ("ValueError", "ValueError", ["gradient", "b", "row shape"]),
    "unknown_variable": ("ValueError", "ValueError", ["variable", "c"]),
    "var_other_mesh": ("ValueError", "ValueError", ["variable", "other", "mesh"]),
    "plain_var_with_mesh": ("ValueError", "ValueError", ["plain", "mesh"]),
    "dvar_without_mesh": ("ValueError", "ValueError", ["DVariable", "mesh"]),
}


def _run_step_cases(mode: str) -> dict:
    """Runs in the subprocess: every STEP_CASE in ``mode``; returns what happened, per case."""
    from tensorflow.experimental import dtensor

    from _helpers import U, dgrad, dvar, value
    from dsgd import meshspec
    from dsgd.state import to_layout

    m24, m8 = meshspec.make_mesh("batch=2,model=4"), meshspec.make_mesh("batch=8")
    ones = np.ones((8, 4), np.float32)
    out = {}

    def setup(fresh=False, mesh=m24):
        a = dvar(ones, m24, ["model", U], name="a")
        b = dvar(ones, m24, [U, U], name="b")
        opt = dsgd.SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.5, mesh=mesh)
        if not fresh:
            opt.apply_gradients([(dgrad(ones, a), a), (dgrad(ones, b), b)])  # built, one step taken
        return a, b, opt

    def snapshot(vs, opt):
        return [value(v) for v in vs] + [value(x) for x in opt.variables]

    def call(opt, pairs):
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        if mode == "eager":
            return opt.apply_gradients(zip(grads, variables))
        return tf.function(lambda gs: opt.apply_gradients(zip(gs, variables)))(grads)

    def case(name):
        a, b, opt = setup(fresh=name in ("var_other_mesh", "plain_var_with_mesh", "dvar_without_mesh"),
                          mesh=None if name == "dvar_without_mesh" else m24)
        ga, gb = dgrad(ones, a), dgrad(ones, b)
        vs = [a, b]
        if name == "grad_shape":
            pairs = [(ga, a), (to_layout(np.ones((4, 8), np.float32), dtensor.Layout([U, U], m24)), b)]
        elif name == "grad_dtype":
            pairs = [(ga, a), (to_layout(np.ones((8, 4), np.float16), dtensor.Layout([U, U], m24)), b)]
        elif name == "grad_mesh":
            pairs = [(ga, a), (to_layout(ones, dtensor.Layout([U, U], m8)), b)]
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
        before = snapshot(vs, opt)
        it_before = int(value(opt.iterations))
        n_vars_before = len(opt.variables)
        res = {"raised": None, "message": ""}
        try:
            call(opt, pairs)
            res["raised"] = "applied"
        except (ValueError, TypeError, KeyError) as e:
            res["raised"], res["message"] = type(e).__name__, str(e)
        except tf.errors.OpError as e:
            res["raised"], res["message"] = "OpError", str(e)[:500]
        after_vs = [value(v) for v in vs]
        if res["raised"] == "applied":
            # only grad_layout: every variable took one momentum step with gradient 1 (second step: m = -0.19)
            res["values_ok"] = all(np.allclose(x, 1 - 0.1 - 0.19, rtol=1e-6) for x in after_vs)
            res["unchanged"] = None
        else:
            res["unchanged"] = (len(opt.variables) == n_vars_before and all(
                np.array_equal(x, y) for x, y in zip(snapshot(vs, opt), before)))
        res["iterations_delta"] = int(value(opt.iterations)) - it_before
        # the process is not poisoned: a good step works
        try:
            good = [(dgrad(ones, v) if v.__class__.__name__ == "DVariable" else tf.ones((8, 4)), v) for v in vs
                    if (v.__class__.__name__ == "DVariable") == (opt._mesh is not None)
                    and (getattr(v, "name", "").split(":")[0] not in ("c", "other"))]
            if mode == "eager":
                opt.apply_gradients(good)
            else:
                tf.function(lambda gs: opt.apply_gradients(zip(gs, [v for _, v in good])))([g for g, _ in good])
            res["then_ok"] = bool(np.all(np.isfinite(value(good[0][1]))))
        except Exception as e:  # noqa: BLE001
            res["then_ok"] = False
            res["then_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return res

    # Python-checked cases first, DTensor-refused ones last (they are the ones that could poison)
    order = sorted(STEP_CASES, key=lambda n: STEP_CASES[n][0 if mode == "eager" else 1] == "OpError")
    for name in order:
        try:
            out[name] = case(name)
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            out[name] = {"raised": "crash", "message": f"{type(e).__name__}: {e}"[:800]}
    return out


@pytest.fixture(scope="module")
def step_results():
    proc = run_subprocess("""
        import json
        from test_bad_input import _run_step_cases
        res = {m: _run_step_cases(m) for m in ("eager", "function")}
        print("@@RESULTS " + json.dumps(res))
    """, timeout=600)
    out = check_subprocess(proc)
    line = [x for x in out.splitlines() if x.startswith("@@RESULTS ")]
    assert line, f"no results from the subprocess:\n{out[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(line[-1][len("@@RESULTS "):])


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_rejects_before_any_change(step_results, case, mode):
    expected = STEP_CASES[case][0 if mode == "eager" else 1]
    words = STEP_CASES[case][2]
    res = step_results[mode][case]
    assert res["raised"] == expected, f"{case}/{mode}: expected {expected}, got {res['raised']}: {res['message']}"
    if expected in ("ValueError", "TypeError"):
        for w in words:
            assert w in res["message"], f"{case}/{mode}: the error does not name {w!r}: {res['message']}"
    if expected == "applied":
        assert res["values_ok"], f"{case}/{mode}: the relaid-out gradient gave wrong values"
        assert res["iterations_delta"] == 1
    else:
        assert res["unchanged"], f"{case}/{mode}: state changed although the step was refused"
        assert res["iterations_delta"] == 0
    assert res["then_ok"], f"{case}/{mode}: a good step failed afterwards: {res.get('then_error')}"
