"""Sparse gradients: ``tf.IndexedSlices`` from ``tf.gather`` on embedding DVariables, with
duplicated indices, on replicated, row-sharded (over ``model`` and over ``batch``) and
column-sharded tables of ``batch=2,model=4`` — with a dense variable in the same step —
against :mod:`dsgd.reference64` (the dense equivalent, duplicates summed; clipping sees the
slice values, duplicates included, as tf_keras clips before de-duplicating).

How the gradients are made: ``tf.gather(table.read_value(), ids)`` under a tape inside a
``tf.function``.  (DTensor refuses ``tf.gather`` on the resource of a row-sharded table —
"DTensor does not support sharded 0th dimension for the resource tensor for
ResourceGatherOp" — and an eager tape on DTensors fails to build the gather's gradient, so
eager tests compute gradients in a ``tf.function`` and apply them eagerly.)  Indices come
replicated or batch-sharded (as from a batch-sharded input pipeline).

The reference optimizer fails here ("ResourceScatterAdd op does not implement layout
propagation"); dsgd densifies.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

from _helpers import (U, assert_close, dsgd, dvar, impl_params, r64, randn, require_impl, runs_in_graph, value)
from dsgd.state import to_layout

TABLES = [("rep", [U, U]), ("row_model", ["model", U]), ("row_batch", ["batch", U]), ("col", [U, "model"])]
ROWS, DIM, N_IDS = 16, 4, 8
OPTIONS = {
    # name: (SGD kwargs, ids layout)
    "momentum_clipnorm": (dict(learning_rate=0.1, momentum=0.9, clipnorm=1.5), "replicated"),
    "nesterov_global_clipnorm": (dict(learning_rate=0.1, momentum=0.9, nesterov=True, global_clipnorm=3.0), "batch"),
    "nesterov_clipvalue": (dict(learning_rate=0.05, momentum=0.8, nesterov=True, clipvalue=0.4), "replicated"),
}


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("impl", impl_params())
@pytest.mark.parametrize("option", list(OPTIONS))
def test_sparse_matches_reference(meshes, option, impl, mode):
    require_impl(impl)
    if mode == "function" and not runs_in_graph(impl):
        pytest.skip(f"{impl!r} runs eagerly only")
    kw, ids_layout = OPTIONS[option]
    mesh = meshes("batch=2,model=4")
    rng = np.random.default_rng(sum(map(ord, option)))
    w0 = [randn(rng, (ROWS, DIM)) for _ in TABLES] + [randn(rng, (8, DIM))]
    tables = [dvar(w, mesh, s, name=n) for w, (n, s) in zip(w0, TABLES)]
    proj = dvar(w0[-1], mesh, [U, "model"], name="proj")
    variables = tables + [proj]
    opt = dsgd.SGD(mesh=mesh, implementation=impl, **kw)
    o64 = r64.Options64(**kw)
    state = r64.init_state(w0, o64)
    ids_lay = dtensor.Layout(["batch"] if ids_layout == "batch" else [U], mesh)
    c_lay = dtensor.Layout(["batch" if ids_layout == "batch" else U, U], mesh)
    dense_lay = dtensor.Layout([U, "model"], mesh)

    def grads(ids, c, c_dense):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(tf.gather(t.read_value(), ids) * c) for t in tables])
            loss += tf.reduce_sum(proj * c_dense)
        return tape.gradient(loss, variables)

    def step(ids, c, c_dense):
        gs = grads(ids, c, c_dense)
        opt.apply_gradients(zip(gs, variables))
        return gs

    if mode == "function":
        fn = tf.function(step)
    else:
        grads = tf.function(grads)
        fn = step
    for k in range(4):
        ids = rng.integers(0, ROWS, N_IDS).astype(np.int32)
        ids[1] = ids[0]  # duplicates, always
        ids[5] = ids[0]
        c = randn(rng, (N_IDS, DIM), scale=1.5)
        c_dense = randn(rng, (8, DIM))
        gs = fn(to_layout(ids, ids_lay), to_layout(c.astype(np.float32), c_lay),
                to_layout(c_dense.astype(np.float32), dense_lay))
        if mode == "eager" and k == 0:
            assert all(isinstance(g, tf.IndexedSlices) for g in gs[:-1]), "expected sparse gradients"
        r64.step(state, [(c, ids)] * len(TABLES) + [c_dense], o64)
        for (n, _), t, w in zip(TABLES + [("proj", None)], variables, state.weights):
            assert_close(value(t), w, "float32", f"{option}/{impl}/{mode} step {k}: {n}")
        for (n, _), m, mref in zip(TABLES, opt.momentums, state.momenta):
            assert_close(value(m), mref, "float32", f"{option}/{impl}/{mode} step {k}: momentum of {n}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_sparse_without_mesh(nesterov):
    rng = np.random.default_rng(1)
    w0 = randn(rng, (ROWS, DIM))
    table = tf.Variable(w0, dtype=tf.float32)
    kw = dict(learning_rate=0.1, momentum=0.9, nesterov=nesterov, clipnorm=1.0)
    opt = dsgd.SGD(**kw)
    o64 = r64.Options64(**kw)
    state = r64.init_state([w0], o64)
    for _ in range(3):
        ids = np.array([3, 3, 0, 15, 3, 7], np.int32)
        c = randn(rng, (len(ids), DIM))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(table, ids) * c.astype(np.float32))
        g = tape.gradient(loss, table)
        assert isinstance(g, tf.IndexedSlices)
        opt.apply_gradients([(g, table)])
        r64.step(state, [(c, ids)], o64)
    assert_close(table.numpy(), state.weights[0], "float32", "sparse without a mesh")


def test_sparse_manual_indexed_slices(meshes):
    """IndexedSlices built by hand (values and indices as replicated DTensors), eagerly, on a row-sharded table."""
    mesh = meshes("batch=8")
    rng = np.random.default_rng(2)
    w0 = randn(rng, (ROWS, DIM))
    table = dvar(w0, mesh, ["batch", U])
    opt = dsgd.SGD(0.1, momentum=0.9, mesh=mesh)
    o64 = r64.Options64(learning_rate=0.1, momentum=0.9)
    state = r64.init_state([w0], o64)
    rep = lambda x: to_layout(x, dtensor.Layout.replicated(mesh, np.ndim(x)))  # noqa: E731
    for _ in range(3):
        ids = np.array([0, 15, 15, 8, 1, 0], np.int64)
        vals = randn(rng, (len(ids), DIM))
        g = tf.IndexedSlices(rep(vals.astype(np.float32)), rep(ids), rep(np.array([ROWS, DIM], np.int64)))
        opt.apply_gradients([(g, table)])
        r64.step(state, [(vals, ids)], o64)
    assert_close(value(table), state.weights[0], "float32", "hand-made IndexedSlices")
