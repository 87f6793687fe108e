"""``tf.train.Checkpoint`` of model variables + dsgd.SGD (momentum, EMA averages, iterations).

What DTensor checkpointing supports (TF 2.21, checked here):

* a checkpoint holds each variable's *global* value (``tf.train.list_variables`` shows full
  shapes), whatever the layout it was saved from;
* restoring into DVariables on the **same mesh and layouts** is bit-exact;
* restoring into DVariables on **another mesh or layout** (saved on ``batch=2,model=4``
  sharded, restored on ``batch=8`` replicated) works in the same process: each restored
  variable keeps its own (new) layout;
* the optimizer may be built before the restore, or after it (deferred restoration: slots
  created later by ``build`` pick their saved values up);
* a fresh process with another device count (4) restores it too.

The optimizer's state is tracked through its ``_variables`` list (iterations, then per model
variable: momentum, EMA average) and ``_learning_rate``; restore with the same variable order
and options as when saving.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from _helpers import (U, check_subprocess, dgrad, dsgd, dvar, impl_params, layout_of, randn, require_impl,
                      run_subprocess, value)

SPECS = [[U, U], ["model", U], [U, "batch"], ["batch", "model"]]
OPTS = dict(learning_rate=0.1, momentum=0.9, nesterov=True, use_ema=True, ema_momentum=0.7,
            ema_overwrite_frequency=4)


def _train(mesh, specs, steps, impl="auto", seed=0):
    rng = np.random.default_rng(seed)
    variables = [dvar(randn(rng, (8, 8)), mesh, s, name=f"v{i}") for i, s in enumerate(specs)]
    opt = dsgd.SGD(mesh=mesh, implementation=impl, **OPTS)
    for _ in range(steps):
        opt.apply_gradients([(dgrad(randn(rng, (8, 8)), v), v) for v in variables])
    return variables, opt


def _fresh(mesh, specs, impl="auto", build=True):
    variables = [dvar(np.zeros((8, 8), np.float32), mesh, s, name=f"v{i}") for i, s in enumerate(specs)]
    opt = dsgd.SGD(mesh=mesh, implementation=impl, **OPTS)
    if build:
        opt.build(variables)
    return variables, opt


def _state(variables, opt):
    return [value(v) for v in variables] + [value(x) for x in opt.variables] + [value(opt.learning_rate)]


def _continue(pairs, steps=2, seed=99):
    """Train several (variables, optimizer) pairs on the same fresh gradients."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        gs = [randn(rng, (8, 8)) for _ in SPECS]
        for variables, opt in pairs:
            opt.apply_gradients([(dgrad(g, v), v) for g, v in zip(gs, variables)])


@pytest.mark.parametrize("impl", impl_params())
def test_same_mesh_bit_exact(meshes, tmp_path, impl):
    require_impl(impl)
    mesh = meshes("batch=2,model=4")
    variables, opt = _train(mesh, SPECS, 3, impl)
    path = tf.train.Checkpoint(model=variables, optimizer=opt).save(os.path.join(tmp_path, "ck"))
    saved = _state(variables, opt)
    names = dict(tf.train.list_variables(path))
    assert names["model/1/.ATTRIBUTES/VARIABLE_VALUE"] == [8, 8]  # global values, not shards

    new_vars, new_opt = _fresh(mesh, SPECS, impl)
    status = tf.train.Checkpoint(model=new_vars, optimizer=new_opt).restore(path)
    status.assert_existing_objects_matched()
    for a, b in zip(_state(new_vars, new_opt), saved):
        np.testing.assert_array_equal(a, b)
    for v, w in zip(new_vars, variables):
        assert layout_of(v) == layout_of(w)
    assert int(value(new_opt.iterations)) == 3
    _continue([(variables, opt), (new_vars, new_opt)])  # training goes on identically
    for a, b in zip(_state(new_vars, new_opt), _state(variables, opt)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("build_first", [True, False], ids=["built", "deferred"])
def test_restore_onto_other_mesh_and_layout(meshes, tmp_path, build_first):
    """Saved on batch=2,model=4 (sharded), restored on batch=8 (replicated) and on 2x4 with other layouts."""
    mesh24 = meshes("batch=2,model=4")
    variables, opt = _train(mesh24, SPECS, 3)
    path = tf.train.Checkpoint(model=variables, optimizer=opt).save(os.path.join(tmp_path, "ck"))
    saved = _state(variables, opt)
    targets = [(meshes("batch=8"), [[U, U]] * 4), (mesh24, [["batch", "model"], [U, "model"], ["model", U], [U, U]])]
    for mesh, specs in targets:
        new_vars, new_opt = _fresh(mesh, specs, build=build_first)
        tf.train.Checkpoint(model=new_vars, optimizer=new_opt).restore(path)
        if not build_first:
            assert int(value(new_opt.iterations)) == 3  # restored at once; slots when built
            new_opt.build(new_vars)
        for a, b in zip(_state(new_vars, new_opt), saved):
            np.testing.assert_array_equal(a, b)
        for v, s in zip(new_vars, specs):
            assert layout_of(v).mesh == mesh and list(layout_of(v).sharding_specs) == s
        for v, m, a in zip(new_vars, new_opt.momentums, new_opt._model_variables_moving_average):
            assert layout_of(m) == layout_of(v) and layout_of(a) == layout_of(v)
        ref_vars, ref_opt = _fresh(mesh24, SPECS)
        tf.train.Checkpoint(model=ref_vars, optimizer=ref_opt).restore(path)
        _continue([(ref_vars, ref_opt), (new_vars, new_opt)])
        for a, b in zip(_state(new_vars, new_opt), _state(ref_vars, ref_opt)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_restore_in_fresh_process_with_other_device_count(meshes, tmp_path):
    """A checkpoint from 8 devices (2x4, sharded) restores in a 4-device process on batch=2,model=2."""
    variables, opt = _train(meshes("batch=2,model=4"), SPECS, 3)
    path = tf.train.Checkpoint(model=variables, optimizer=opt).save(os.path.join(tmp_path, "ck"))
    expected = os.path.join(tmp_path, "expected.npz")
    np.savez(expected, *_state(variables, opt))
    proc = run_subprocess(f"""
        from _helpers import dvar, value, layout_of, U
        mesh = meshspec.make_mesh("batch=2,model=2")
        specs = [["model", U], [U, U], ["batch", "model"], [U, "batch"]]
        vs = [dvar(np.zeros((8, 8), np.float32), mesh, s, name=f"v{{i}}") for i, s in enumerate(specs)]
        opt = dsgd.SGD(mesh=mesh, **{OPTS!r})
        opt.build(vs)
        tf.train.Checkpoint(model=vs, optimizer=opt).restore({path!r}).assert_existing_objects_matched()
        exp = np.load({expected!r})
        got = [value(v) for v in vs] + [value(x) for x in opt.variables] + [value(opt.learning_rate)]
        assert len(got) == len(exp.files)
        for k, g in enumerate(got):
            np.testing.assert_array_equal(g, exp[f"arr_{{k}}"])
        assert all(layout_of(m) == layout_of(v) for v, m in zip(vs, opt.momentums))
        print("RESTORED-OK")
    """, devices=4)
    assert "RESTORED-OK" in check_subprocess(proc)


def test_step_machinery_is_not_a_checkpoint_dependency(meshes):
    """The optimizer's checkpoint dependencies are its state only: neither the step engine nor
    the iteration counter it makes for the local domain (which holds the iterations variable)."""
    mesh = meshes("batch=8")
    opt = dsgd.SGD(0.1, momentum=0.9, mesh=mesh)
    v = dvar(np.ones((8, 4), np.float32), mesh, [U, U])
    opt.apply_gradients([(dgrad(np.ones((8, 4)), v), v)])
    assert opt._engine.counter is not None  # a local-domain step ran and made its counter
    assert sorted(opt._trackable_children()) == [
        "_index_dict", "_iterations", "_learning_rate", "_model_variables_moving_average", "_variables", "momentums"]
