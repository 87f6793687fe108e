"""Named tf_keras models for timing whole training steps (``dsgd bench --mode train_step|fit``).

A step-time benchmark of ``apply_gradients`` alone shows the optimizer's own cost; what a
user feels is a whole step: forward, backward and update, in a ``@tf.function`` train step
of their own or under ``model.fit``.  This module builds such a model on a mesh with a
tf_keras ``LayoutMap`` and a ``DTensorDataset``, and two step functions over it:

* ``train_step``: one custom ``tf.function`` (GradientTape, then ``apply_gradients``);
* ``fit``: the model's own ``train_function`` (what ``model.fit`` calls once per step).

:func:`no_update_optimizer` is the floor an optimizer can approach: it takes the gradients in their
variables' layouts (computed and reduced, since a stateful op consumes them as data) and applies nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

GLOBAL_BATCH = 16
LAYOUT_POLICIES = ("sharded", "replicated")


@dataclass(frozen=True)
class ModelSpec:
    """A residual MLP: ``inputs -> Dense(width)`` then ``blocks`` x (two Dense + skip) -> ``outputs``."""

    name: str
    inputs: int
    width: int
    blocks: int
    outputs: int

    @property
    def params(self) -> int:
        block = 2 * (self.width * self.width + self.width)
        return (self.inputs + 1) * self.width + self.blocks * block + (self.width + 1) * self.outputs


#: 8.7M parameters: the model the step-share targets were set on.
MODELS = {
    "resmlp": ModelSpec("resmlp", inputs=256, width=1024, blocks=4, outputs=10),
    "resmlp-small": ModelSpec("resmlp-small", inputs=32, width=64, blocks=2, outputs=4),
}


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None


def layout_map(mesh, policy: str = "sharded"):
    """Megatron-style: each block's first kernel column-sharded over ``model`` (bias too), its
    second row-sharded; everything replicated on a mesh without a ``model`` axis or with
    ``policy="replicated"``."""
    import tf_keras
    from tensorflow.experimental import dtensor

    if policy not in LAYOUT_POLICIES:
        raise ValueError(f"layout policy must be one of {LAYOUT_POLICIES} for a model of dsgd.harness.models, "
                         f"got {policy!r}")
    u = "unsharded"
    lm = tf_keras.dtensor.experimental.LayoutMap(mesh=mesh)
    if policy == "sharded" and "model" in mesh.dim_names:
        # keys are tf_keras' object paths (``layer.attribute``), matched with re.match
        lm[r"block\d+_a\.kernel"] = dtensor.Layout([u, "model"], mesh)
        lm[r"block\d+_a\.bias"] = dtensor.Layout(["model"], mesh)
        lm[r"block\d+_b\.kernel"] = dtensor.Layout(["model", u], mesh)
    return lm  # anything not matched: replicated


def build_model(spec: ModelSpec, mesh, policy: str = "sharded"):
    """The model, built under the mesh's LayoutMap (its variables are DVariables)."""
    import tf_keras

    tf_keras.utils.set_random_seed(1)
    with layout_map(mesh, policy).scope():
        x = inp = tf_keras.Input((spec.inputs,), batch_size=GLOBAL_BATCH)
        x = tf_keras.layers.Dense(spec.width, activation="relu", name="stem")(x)
        for b in range(spec.blocks):
            h = tf_keras.layers.Dense(spec.width, activation="relu", name=f"block{b}_a")(x)
            h = tf_keras.layers.Dense(spec.width, name=f"block{b}_b")(h)
            x = tf_keras.layers.Add()([x, h])
        out = tf_keras.layers.Dense(spec.outputs, name="head")(x)
        # inside the scope: the Model's construction turns the lazy variables into DVariables
        return tf_keras.Model(inp, out)


def dataset(spec: ModelSpec, mesh, seed: int = 0):
    """A repeating ``DTensorDataset`` of random regression batches, sharded over the first mesh axis."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * GLOBAL_BATCH, spec.inputs)).astype(np.float32)
    y = rng.standard_normal((4 * GLOBAL_BATCH, spec.outputs)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    # tf.data's autotuning thread sleeps up to a minute between rounds and an iterator's
    # teardown waits for it (TF 2.21): 15-60 s per iterator, minutes per bench sweep.  The
    # batches are in memory, there is nothing to tune.
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = ds.with_options(options)
    axis = mesh.dim_names[0]
    lay = dtensor.Layout.batch_sharded(mesh, axis, rank=2)
    return dtensor.DTensorDataset(ds, mesh=mesh, layouts=(lay, lay), global_batch_size=GLOBAL_BATCH,
                                  batch_dim=axis)


def no_update_optimizer(mesh):
    """The floor: an optimizer that takes the gradients in their variables' layouts and applies nothing."""
    return _no_update_class()(mesh=mesh)


@functools.lru_cache(maxsize=None)
def _no_update_class():
    import tensorflow as tf
    from tensorflow.experimental import dtensor
    from tf_keras.src.optimizers import optimizer as keras_optimizer

    class _NoUpdate(keras_optimizer.Optimizer):
        """The work every correct optimizer needs, and nothing more: each gradient brought to its
        variable's layout (the backward pass's reductions) and handed, with the variables' handles,
        to one stateful no-op whose condition is read at run time; then the step is counted.

        Why this shape (each measured, see docs/performance.md):

        * the gradients must be a stateful op's *data* inputs.  DTensor's MLIR pipeline drops
          control edges and then removes every op whose results nobody uses, so a floor that keeps
          its gradients alive by ``tf.control_dependencies`` (or feeds them to a reduction that
          only a control edge uses) runs without the weight gradients at all: on the 8.7M MLP
          under ``model.fit`` the expanded program had 19 MatMuls instead of 29 and no
          BiasAddGrad, and the "floor" took 23 ms against 59 for this one;
        * ``tf.raw_ops.Assert``, not ``tf.debugging.Assert``: the latter wraps its data in a
          ``tf.cond``, an ``If`` whose branches DTensor expands and runs for every step;
        * the condition is a read of ``iterations``, never constant, so nothing folds it away.
        """

        def __init__(self, mesh=None, name: str = "NoUpdate"):
            super().__init__(name=name, mesh=mesh)

        def build(self, var_list):
            super().build(var_list)
            self._built = True

        def apply_gradients(self, grads_and_vars, name=None, skip_gradients_aggregation=False, **kwargs):
            pairs = [(g, v) for g, v in grads_and_vars if g is not None]
            grads = []
            for g, v in pairs:
                if isinstance(g, tf.IndexedSlices):  # as dsgd on a mesh: summed into a dense gradient
                    g = tf.math.unsorted_segment_sum(g.values, g.indices, v.shape[0])
                layout = getattr(v, "layout", None)
                grads.append(dtensor.relayout(g, layout) if layout is not None else g)
            tf.raw_ops.Assert(condition=self.iterations >= 0, data=grads + [v.handle for _, v in pairs],
                              summarize=0, name="no_update_floor")
            return self.iterations.assign_add(1)

        def get_config(self) -> dict:
            return {"name": self.name}

    return _NoUpdate


@dataclass
class TrainingStep:
    """A built model, optimizer and dataset, and one step of them in the asked mode."""

    model: Any
    optimizer: Any
    step: Callable[[], Any]


def build_training_step(spec: ModelSpec, mesh, optimizer, mode: str, policy: str = "sharded",
                        jit_compile: bool = False) -> TrainingStep:
    """``mode="fit"``: the model's ``train_function`` (one ``model.fit`` step, as fit runs it);
    ``mode="train_step"``: a custom ``tf.function`` with a GradientTape and ``apply_gradients``."""
    import tensorflow as tf

    model = build_model(spec, mesh, policy)
    iterator = iter(dataset(spec, mesh))
    if mode == "fit":
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
        train = model.make_train_function()
        return TrainingStep(model, optimizer, lambda: train(iterator))
    if mode != "train_step":
        raise ValueError(f"mode must be 'fit' or 'train_step', got {mode!r}")
    import tf_keras

    mse = tf_keras.losses.MeanSquaredError()
    variables = model.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = mse(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    def step():
        x, y = next(iterator)
        return train_step(x, y)

    return TrainingStep(model, optimizer, step)
