"""dsgd.SGD against the float64 NumPy model (:mod:`dsgd.reference64`), step by step.

Two grids, every implementation in ``dsgd.impl.REGISTRY`` (read at collection time):

* ``test_option_grid``: every option on its own — plain SGD, momentum, Nesterov, weight decay
  with exclusions (by variable and by name regex), clipnorm, global_clipnorm, clipvalue, EMA
  with and without overwrite (then finalize), a ``tf_keras`` ``ExponentialDecay`` schedule and
  a zero-argument callable learning rate — on ``batch=2,model=4`` with a replicated, a 2-D-sharded
  variable and a sharded bias, float32, eagerly and inside ``tf.function``.
* ``test_mesh_layout_dtype_grid``: one rich option set (Nesterov + decay with a name
  exclusion + global_clipnorm + EMA overwrite + schedule, then finalize) on meshes ``1``,
  ``batch=8`` and ``batch=2,model=4``, with variables replicated and sharded on each tensor
  dimension over each mesh axis, for float32, bfloat16 and float16, eagerly and in
  ``tf.function``.

Each case runs 5 steps with fresh random gradients (never zero) and compares weights, momentum
slots, EMA averages and ``iterations`` with the model, within ``reference64.TOLERANCE``.
Local-domain implementations (eager only) are skipped inside ``tf.function``, where the
optimizer runs ``fused`` for them; ``test_local_impl_falls_back_in_graph`` checks that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from dsgd import impl as impl_registry

from _helpers import (IMPLS, U, assert_close, dgrad, dsgd, dvar, impl_params, r64, randn, require_impl,
                      runs_in_graph, unsupported, value)

STEPS = 5
MODES = ["eager", "function"]


@dataclass
class Case:
    """One option set: how to build dsgd.SGD, and the matching float64 options."""

    kwargs: dict
    decay_excluded_vars: tuple = ()  # variable names excluded via exclude_from_weight_decay(var_list=...)
    decay_excluded_regex: tuple = ()  # regexes given as var_names=...
    schedule: Optional[tuple] = None  # ExponentialDecay(initial, decay_steps, rate)
    callable_lr: Optional[list] = None  # values a zero-argument callable returns at each step
    finalize: bool = False
    o64: dict = field(default_factory=dict)

    def sgd_kwargs(self, lr_holder: dict) -> dict:
        kw = dict(self.kwargs)
        if self.schedule:
            kw["learning_rate"] = tf_keras.optimizers.schedules.ExponentialDecay(*self.schedule)
        elif self.callable_lr:
            var = tf.Variable(self.callable_lr[0], dtype=tf.float32, trainable=False)
            lr_holder["var"] = var
            kw["learning_rate"] = lambda: var * 1.0
        return kw

    def options64(self, names: list[str]) -> r64.Options64:
        import re

        kw = {k: v for k, v in self.kwargs.items() if k in r64.Options64.__dataclass_fields__}
        kw.update(self.o64)
        if self.schedule:
            lr0, steps, rate = self.schedule
            kw["learning_rate"] = lambda i: lr0 * rate ** (i / steps)
        elif self.callable_lr:
            values = list(self.callable_lr)
            kw["learning_rate"] = lambda i: float(np.float32(values[i]))
        if self.kwargs.get("weight_decay"):
            kw["decay_mask"] = [
                n not in self.decay_excluded_vars and not any(re.search(p, n) for p in self.decay_excluded_regex)
                for n in names]
        return r64.Options64(**kw)


OPTION_CASES: dict[str, Case] = {
    "sgd": Case(dict(learning_rate=0.1)),
    "momentum": Case(dict(learning_rate=0.05, momentum=0.9)),
    "nesterov": Case(dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    "weight_decay_exclusions": Case(dict(learning_rate=0.1, momentum=0.5, weight_decay=0.2),
                                    decay_excluded_vars=("rep",), decay_excluded_regex=(r"^bia[s]",)),
    "clipnorm": Case(dict(learning_rate=0.1, momentum=0.9, clipnorm=1.5)),
    "global_clipnorm": Case(dict(learning_rate=0.1, momentum=0.9, global_clipnorm=2.0)),
    "clipvalue": Case(dict(learning_rate=0.1, momentum=0.9, clipvalue=0.5)),
    "ema_finalize": Case(dict(learning_rate=0.1, momentum=0.9, use_ema=True, ema_momentum=0.7), finalize=True),
    "ema_overwrite": Case(dict(learning_rate=0.1, use_ema=True, ema_momentum=0.6, ema_overwrite_frequency=2),
                          finalize=True),
    "schedule": Case(dict(momentum=0.9), schedule=(0.2, 2, 0.6)),
    "callable_lr": Case(dict(momentum=0.8), callable_lr=[0.1, 0.03, 0.2, 0.07, 0.12]),
}

RICH = Case(dict(momentum=0.9, nesterov=True, weight_decay=0.05, global_clipnorm=3.0, use_ema=True,
                 ema_momentum=0.8, ema_overwrite_frequency=3),
            decay_excluded_regex=("bias",), schedule=(0.1, 2, 0.7), finalize=True)

# The option grid's variables on batch=2,model=4: replicated, 2-D-sharded (dimension 0 over batch,
# dimension 1 over model), and a bias sharded over model.
OPTION_VARS = [("rep", (8, 8), [U, U]), ("both", (8, 4), ["batch", "model"]), ("bias", (8,), ["model"])]

# Per mesh: replicated, and sharded on each tensor dimension over each mesh axis (on 2x4: dimension
# 0 over model, dimension 1 over batch, and both dimensions at once: 0 over batch, 1 over model),
# plus a sharded bias.
MESH_VARS = {
    "1": [("rep", (8, 4), [U, U]), ("row", (8, 4), ["batch", U]), ("col", (4, 8), [U, "batch"]),
          ("bias", (8,), ["batch"])],
    "batch=8": [("rep", (8, 4), [U, U]), ("row", (8, 4), ["batch", U]), ("col", (4, 8), [U, "batch"]),
                ("bias", (8,), ["batch"])],
    "batch=2,model=4": [("rep", (8, 4), [U, U]), ("row_m", (8, 4), ["model", U]), ("col_b", (4, 8), [U, "batch"]),
                        ("both", (8, 8), ["batch", "model"]), ("bias", (8,), ["model"])],
}


def run_case(mesh, var_specs, dtype, impl: str, case: Case, mode: str, seed: int, steps: int = STEPS):
    """Train ``steps`` steps and compare everything with reference64 after each step."""
    require_impl(impl)
    if mode == "function" and not runs_in_graph(impl):
        pytest.skip(f"{impl!r} runs eagerly only; inside tf.function the optimizer uses 'fused' "
                    "(covered by the fused case and test_local_impl_falls_back_in_graph)")
    rng = np.random.default_rng(seed)

    def build(specs):
        w0 = [randn(rng, shape, dtype) for _, shape, _ in specs]
        variables = [dvar(w, mesh, spec, dtype, name=n) for w, (n, _, spec) in zip(w0, specs)]
        holder: dict = {}
        opt = dsgd.SGD(mesh=mesh, implementation=impl, **case.sgd_kwargs(holder))
        by_var = [v for v, (n, _, _) in zip(variables, specs) if n in case.decay_excluded_vars]
        if case.decay_excluded_vars or case.decay_excluded_regex:
            opt.exclude_from_weight_decay(var_list=by_var, var_names=list(case.decay_excluded_regex))
        opt.build(variables)
        return w0, variables, opt, holder

    w0, variables, opt, holder = build(var_specs)
    bad = unsupported(impl, opt)
    if bad:  # run the groups this implementation supports; skip if none
        bad_specs = {spec for spec, _ in bad}
        keep = [s for s in var_specs if (",".join(s[2]) or "replicated") not in bad_specs]
        if not keep:
            pytest.skip(f"{impl!r} supports none of these groups: {bad}")
        var_specs = keep
        w0, variables, opt, holder = build(var_specs)
    names = [n for n, _, _ in var_specs]
    o64 = case.options64(names)
    state = r64.init_state(w0, o64)

    def step(grads):
        return opt.apply_gradients(zip(grads, variables))

    fn = tf.function(step) if mode == "function" else step
    for k in range(steps):
        if case.callable_lr:
            holder["var"].assign(case.callable_lr[k])
        gs = [randn(rng, shape, dtype, scale=2.0) for _, shape, _ in var_specs]
        fn([dgrad(g, v) for g, v in zip(gs, variables)])
        r64.step(state, gs, o64)
        where = f"{impl}/{mode}/{dtype} step {k}"
        for n, v, w in zip(names, variables, state.weights):
            assert_close(value(v), w, dtype, f"{where}: weights of {n}")
        if o64.momentum:
            assert len(opt.momentums) == len(variables)
            for n, m, mref in zip(names, opt.momentums, state.momenta):
                assert_close(value(m), mref, dtype, f"{where}: momentum of {n}")
        if o64.use_ema:
            for n, a, aref in zip(names, opt._model_variables_moving_average, state.averages):
                assert_close(value(a), aref, dtype, f"{where}: EMA average of {n}")
        assert int(value(opt.iterations)) == k + 1
    if mode == "function":
        assert fn.experimental_get_tracing_count() == 1, "the step retraced"
        ran = set(opt.implementations_used())
        assert ran == {impl_registry.for_mode(impl, eager=False).name}, f"inside tf.function {impl!r} ran as {ran}"
    if case.finalize:
        opt.finalize_variable_values(variables)
        for n, v, w in zip(names, variables, r64.finalize(state, o64)):
            assert_close(value(v), w, dtype, f"{impl}/{mode}/{dtype} finalize: {n}")
    return opt, variables


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", impl_params())
@pytest.mark.parametrize("option", list(OPTION_CASES))
def test_option_grid(meshes, option, impl, mode):
    run_case(meshes("batch=2,model=4"), OPTION_VARS, "float32", impl, OPTION_CASES[option], mode,
             seed=sum(map(ord, option)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", impl_params())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mesh_spec", list(MESH_VARS))
def test_mesh_layout_dtype_grid(meshes, mesh_spec, dtype, impl, mode):
    run_case(meshes(mesh_spec), MESH_VARS[mesh_spec], dtype, impl, RICH, mode, seed=len(mesh_spec) + len(dtype))


@pytest.mark.parametrize("impl", [n for n in IMPLS if not runs_in_graph(n)] or ["none"])
def test_local_impl_falls_back_in_graph(meshes, impl, caplog):
    """A local-domain (eager-only) implementation asked for inside tf.function runs 'fused', correctly."""
    if impl == "none":
        pytest.skip("no local-domain implementation registered")
    require_impl(impl)
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(7)
    w0 = randn(rng, (8, 4))
    v = dvar(w0, mesh, ["model", U])
    opt = dsgd.SGD(0.1, momentum=0.9, mesh=mesh, implementation=impl)
    o64 = r64.Options64(learning_rate=0.1, momentum=0.9)
    state = r64.init_state([w0], o64)
    fn = tf.function(lambda g: opt.apply_gradients([(g, v)]))
    with caplog.at_level("WARNING", logger="dsgd"):
        for _ in range(3):
            g = randn(rng, (8, 4))
            fn(dgrad(g, v))
            r64.step(state, [g], o64)
    assert_close(value(v), state.weights[0], "float32", f"{impl} in tf.function")
    assert any("fused" in r.getMessage() for r in caplog.records), "no warning about the fallback to 'fused'"


@pytest.mark.parametrize("impl", impl_params())
def test_no_mesh_plain_variables(impl):
    """Without ``mesh`` the optimizer trains plain tf.Variables (every option of the rich set)."""
    require_impl(impl)
    rng = np.random.default_rng(3)
    w0 = [randn(rng, (6, 5)), randn(rng, (5,))]
    variables = [tf.Variable(w0[0], dtype=tf.float32, name="w"), tf.Variable(w0[1], dtype=tf.float32, name="bias")]
    case = RICH
    opt = dsgd.SGD(implementation=impl, **case.sgd_kwargs({}))
    opt.exclude_from_weight_decay(var_names=list(case.decay_excluded_regex))
    opt.build(variables)
    if unsupported(impl, opt):
        pytest.skip(f"{impl!r} does not run plain variables: {unsupported(impl, opt)}")
    o64 = case.options64(["w", "bias"])
    state = r64.init_state(w0, o64)
    for _ in range(STEPS):
        gs = [randn(rng, (6, 5)), randn(rng, (5,))]
        opt.apply_gradients(zip([tf.constant(g, tf.float32) for g in gs], variables))
        r64.step(state, gs, o64)
    for v, w in zip(variables, state.weights):
        assert_close(v.numpy(), w, "float32", f"{impl} without mesh: {v.name}")
    opt.finalize_variable_values(variables)
    for v, w in zip(variables, r64.finalize(state, o64)):
        assert_close(v.numpy(), w, "float32", f"{impl} without mesh, finalized: {v.name}")
