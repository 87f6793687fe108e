"""``model.compile(optimizer=dsgd.SGD(..., mesh=mesh))`` + ``model.fit`` under DTensor.

Set-up (as tf_keras' own DTensor integration tests): a ``tf_keras.dtensor.experimental.LayoutMap``
on ``batch=2,model=4`` whose ``scope()`` builds a tiny functional model (kernels and a bias
sharded over ``model``), and a ``tf.experimental.dtensor.DTensorDataset`` sharded over
``batch`` (``batch_dim="batch"``; the source dataset repeats, since ``fit`` reads
``epochs * steps_per_epoch`` batches).

The yardstick is the reference optimizer, ``tf_keras.dtensor.experimental.optimizers.SGD(mesh=...)``,
in the same ``model.fit`` with ``run_eagerly=True``.  Not the reference inside ``fit``'s
``tf.function``: there (TF 2.21) its momentum update ``m.assign(...)`` then
``variable.assign_add(m)`` loses its ordering under DTensor, so the variables move by the
*previous* momentum (after one step, most weights are unchanged) — with ``momentum=0`` too,
since the reference still keeps and updates a momentum slot.
``test_reference_fit_graph_defect`` pins this.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tensorflow.experimental import dtensor

from _helpers import (DTENSOR_IMPLS, U, allowed_slot_layouts, check_subprocess, dsgd, require_impl,
                      run_subprocess, value)

GLOBAL_BATCH = 16
EPOCHS, STEPS_PER_EPOCH = 3, 4
OPTIONS = {
    "nesterov": dict(learning_rate=0.1, momentum=0.9, nesterov=True),
    "decay_clip": dict(learning_rate=0.1, momentum=0.8, weight_decay=0.05, global_clipnorm=0.5),
}


def _layout_map(mesh):
    lm = tf_keras.dtensor.experimental.LayoutMap(mesh=mesh)
    lm["d1.*kernel"] = dtensor.Layout([U, "model"], mesh)
    lm["d1.*bias"] = dtensor.Layout(["model"], mesh)
    lm["d2.*kernel"] = dtensor.Layout(["model", U], mesh)
    lm["d2.*bias"] = dtensor.Layout.replicated(mesh, 1)
    return lm


def _model(mesh, optimizer, run_eagerly=False):
    tf_keras.utils.set_random_seed(1)
    with _layout_map(mesh).scope():
        inp = tf_keras.Input((6,), batch_size=GLOBAL_BATCH)
        h = tf_keras.layers.Dense(8, activation="relu", name="d1")(inp)
        out = tf_keras.layers.Dense(4, name="d2")(h)
        model = tf_keras.Model(inp, out)
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=run_eagerly)
    return model


def _dataset(mesh):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    y = rng.standard_normal((64, 4)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    lay = dtensor.Layout.batch_sharded(mesh, "batch", rank=2)
    return dtensor.DTensorDataset(ds, mesh=mesh, layouts=(lay, lay), global_batch_size=GLOBAL_BATCH,
                                  batch_dim="batch")


def _fit(mesh, optimizer, run_eagerly=False):
    model = _model(mesh, optimizer, run_eagerly)
    for v in model.trainable_variables:
        assert isinstance(v, dtensor.DVariable)
    hist = model.fit(_dataset(mesh), epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, verbose=0)
    return model, hist.history["loss"], [value(v) for v in model.trainable_variables]


@pytest.fixture(scope="module")
def reference_runs(meshes):
    mesh = meshes("batch=2,model=4")
    out = {}
    for name, kw in OPTIONS.items():
        ref = tf_keras.dtensor.experimental.optimizers.SGD(mesh=mesh, **kw)
        out[name] = _fit(mesh, ref, run_eagerly=True)[1:]
    return out


@pytest.mark.parametrize("impl", ["auto"] + DTENSOR_IMPLS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fit_matches_reference(meshes, reference_runs, option, impl):
    if impl != "auto":
        require_impl(impl)
    mesh = meshes("batch=2,model=4")
    opt = dsgd.SGD(mesh=mesh, implementation=impl, **OPTIONS[option])
    model, losses, weights = _fit(mesh, opt)
    ref_losses, ref_weights = reference_runs[option]
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg="losses differ from the reference")
    for v, w, r in zip(model.trainable_variables, weights, ref_weights):
        np.testing.assert_allclose(w, r, rtol=2e-5, atol=2e-6, err_msg=f"{v.name} differs from the reference")
    assert int(value(opt.iterations)) == EPOCHS * STEPS_PER_EPOCH
    if OPTIONS[option].get("momentum"):
        for v, m in zip(model.trainable_variables, opt.momentums):
            assert dtensor.fetch_layout(m) in allowed_slot_layouts(impl, v)


def test_fit_ema_finalizes(meshes):
    """With use_ema, fit ends by finalize_variable_values: the weights become the averages."""
    mesh = meshes("batch=2,model=4")
    opt = dsgd.SGD(0.1, momentum=0.5, use_ema=True, ema_momentum=0.5, mesh=mesh)
    model, _, weights = _fit(mesh, opt)
    for w, a in zip(weights, opt._model_variables_moving_average):
        np.testing.assert_array_equal(w, value(a))
    # and the averages are not the initial weights (training was kept)
    init = _model(mesh, dsgd.SGD(0.1, mesh=mesh)).trainable_variables
    assert any(np.max(np.abs(w - value(i))) > 1e-3 for w, i in zip(weights, init))


def test_reference_fit_graph_defect(meshes, reference_runs):
    """The reference inside fit's tf.function on a mesh differs from itself run eagerly (see module doc)."""
    mesh = meshes("batch=2,model=4")
    ref = tf_keras.dtensor.experimental.optimizers.SGD(mesh=mesh, **OPTIONS["nesterov"])
    _, _, weights = _fit(mesh, ref)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(weights, reference_runs["nesterov"][1]))
    assert diff > 1e-3, "tf_keras' fit on a mesh now matches its eager run: the module docstring is stale"


def _fit_with_everything(mesh, optimizer, tmp_path, run_eagerly=False, loops=True):
    """fit with what users add: metrics and a later initial epoch and, with ``loops``, validation
    data, two steps per execution and callbacks (checkpoint, TensorBoard, early stopping); then
    evaluate and a prediction.  (Looping runs go in a fresh process: see
    ``test_fit_features_run_grouped_in_graph``.)"""
    model = _model(mesh, optimizer, run_eagerly)
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"], run_eagerly=run_eagerly,
                  steps_per_execution=2 if loops else 1)
    extra = {}
    if loops:
        extra = dict(validation_data=_dataset(mesh), validation_steps=2, callbacks=[
            tf_keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{epoch}"), save_weights_only=True),
            tf_keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
            tf_keras.callbacks.EarlyStopping(monitor="loss", patience=10)])
    hist = model.fit(_dataset(mesh), epochs=EPOCHS + 1, initial_epoch=1, steps_per_epoch=STEPS_PER_EPOCH,
                     verbose=0, **extra)
    evaluated = model.evaluate(_dataset(mesh), steps=2, verbose=0, return_dict=True)
    # the model called on a batch (tf_keras' predict on a DTensorDataset fails in TF 2.21 whatever
    # the optimizer: a batch-sharded prediction cannot become NumPy, a replicated one ends early)
    x, _ = next(iter(_dataset(mesh)))
    predicted = value(model(x, training=False))
    return model, hist.history, evaluated, np.asarray(predicted), [value(v) for v in model.trainable_variables]


_LOOPING_RUN = """
import json, pathlib, pickle, sys
import test_keras_fit as t
from dsgd.meshspec import make_mesh
mesh = make_mesh("batch=2,model=4")
opt = dsgd.SGD(mesh=mesh, implementation="auto", **json.loads(sys.argv[1]))
model, hist, evaluated, predicted, weights = t._fit_with_everything(mesh, opt, pathlib.Path(sys.argv[2]))
with open(sys.argv[3], "wb") as f:
    pickle.dump(dict(used=sorted(opt.implementations_used()), iterations=int(t.value(opt.iterations)),
                     hist=hist, evaluated=evaluated, predicted=predicted, weights=weights), f)
"""


def test_fit_features_run_grouped_in_graph(meshes, tmp_path):
    """``auto`` under fit runs the in-graph grouped kernel, with everything fit does around it,
    and gives exactly the weights of ``fused`` (the DTensor path) and of dsgd run eagerly.

    The looping run (``steps_per_execution=2``, validation) runs in a fresh process.  In one CI
    run, after whichever tests shared its worker, fit's validation loop failed to register ("Cannot
    add function 'while_cond' because a different function with the same name already exists"):
    DTensor's function library keeps one ``while_cond`` per process.  Two looping fits alone in
    one process pass, so the clash comes from some other test's DTensor loop, and which tests
    share a worker changes from run to run."""
    require_impl("grouped")
    mesh = meshes("batch=2,model=4")
    kw = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    out = tmp_path / "auto.pkl"
    check_subprocess(run_subprocess(_LOOPING_RUN, timeout=300, argv=[json.dumps(kw), str(tmp_path), str(out)]))
    with open(out, "rb") as f:
        auto = pickle.load(f)
    assert auto["used"] == ["grouped_graph"]
    assert auto["iterations"] == EPOCHS * STEPS_PER_EPOCH
    hist = auto["hist"]
    assert set(hist) >= {"loss", "mae", "val_loss", "val_mae"} and len(hist["loss"]) == EPOCHS
    assert all(np.isfinite(v).all() for v in hist.values())
    assert np.isfinite(auto["evaluated"]["loss"]) and auto["predicted"].shape == (GLOBAL_BATCH, 4)
    assert (tmp_path / f"ckpt-{EPOCHS + 1}.index").exists(), "ModelCheckpoint wrote no checkpoint"
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    for other, impl, eagerly in (("fused", "fused", False), ("eager", "auto", True)):
        opt = dsgd.SGD(mesh=mesh, implementation=impl, **kw)
        model, _, _, o_pred, o_weights = _fit_with_everything(mesh, opt, tmp_path / other, run_eagerly=eagerly,
                                                              loops=False)
        for v, w, o in zip(model.trainable_variables, auto["weights"], o_weights):
            np.testing.assert_array_equal(w, o, err_msg=f"{v.name}: in-graph grouped differs from {other}")
        np.testing.assert_allclose(auto["predicted"], o_pred, rtol=1e-6)
