"""Named tf_keras models for timing whole training steps (``dsgd bench --mode train_step|fit``).

A step-time benchmark of ``apply_gradients`` alone shows the optimizer's own cost; what a
user feels is a whole step: forward, backward and update, in a ``@tf.function`` train step
of their own or under ``model.fit``.  This module holds models that look like users' models,
each with the layout a user would give it on a mesh (Megatron-style tensor parallelism over the
``model`` axis, data parallelism over the first), and builds them with a tf_keras ``LayoutMap``
and a ``DTensorDataset``, with two step functions over each:

* ``train_step``: one custom ``tf.function`` (GradientTape, then ``apply_gradients``);
* ``fit``: the model's own ``train_function`` (what ``model.fit`` calls once per step).

Each model is a plain function returning a tf_keras model (no mesh, no layouts: the
``LayoutMap`` scope around the call lays its variables out), so the layout advisor can call
it as a user's ``module:function`` too (``dsgd.harness.models:transformer``).

:func:`no_update_optimizer` is the floor an optimizer can approach: it takes the gradients in their
variables' layouts (computed and reduced, since a stateful op consumes them as data) and applies nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

GLOBAL_BATCH = 16
LAYOUT_POLICIES = ("sharded", "replicated")
U = "unsharded"


# ------------------------------------------------------------------------------ the models
def resmlp(inputs: int = 256, width: int = 1024, blocks: int = 4, outputs: int = 10):
    """A residual MLP: ``inputs -> Dense(width, relu)``, then ``blocks`` x (Dense(width, relu),
    Dense(width)) with a skip, then ``Dense(outputs)``; 8.7M parameters by default."""
    import tf_keras

    x = inp = tf_keras.Input((inputs,), batch_size=GLOBAL_BATCH)
    x = tf_keras.layers.Dense(width, activation="relu", name="stem")(x)
    for b in range(blocks):
        h = tf_keras.layers.Dense(width, activation="relu", name=f"block{b}_a")(x)
        h = tf_keras.layers.Dense(width, name=f"block{b}_b")(h)
        x = tf_keras.layers.Add()([x, h])
    return tf_keras.Model(inp, tf_keras.layers.Dense(outputs, name="head")(x))


def mlp(inputs: int = 512, width: int = 512, hidden: int = 2048, blocks: int = 4, classes: int = 8):
    """A residual MLP with wide hidden layers, a classifier: ``inputs -> Dense(width)``, then
    ``blocks`` x (Dense(hidden, relu), Dense(width)) with a skip, then ``Dense(classes)`` logits;
    8.7M parameters by default (the model issue 26's figures were taken on)."""
    import tf_keras

    x = inp = tf_keras.Input((inputs,), batch_size=GLOBAL_BATCH)
    x = tf_keras.layers.Dense(width, name="stem")(x)
    for b in range(blocks):
        h = tf_keras.layers.Dense(hidden, activation="relu", name=f"block{b}_a")(x)
        h = tf_keras.layers.Dense(width, name=f"block{b}_b")(h)
        x = tf_keras.layers.Add()([x, h])
    return tf_keras.Model(inp, tf_keras.layers.Dense(classes, name="head")(x))


def transformer(vocab: int = 8192, seq: int = 64, hidden: int = 256, heads: int = 8, ffn: int = 1024,
                layers: int = 2, classes: int = 8):
    """A transformer encoder classifier from tf_keras layers: token ``Embedding``, then ``layers`` x
    (``MultiHeadAttention``, ``LayerNormalization``, a two-``Dense`` feed-forward block,
    ``LayerNormalization``, post-norm with skips), mean-pooled into ``Dense(classes)`` logits; 3.7M
    parameters by default, sequences of 64 tokens.

    ``LayerNormalization(epsilon=1e-6)``: with epsilon >= 1.001e-5 tf_keras computes it with
    ``FusedBatchNormV3``, which DTensor cannot lay out (the step fails on a mesh).
    """
    import tf_keras

    tf_keras.backend.experimental.enable_tf_random_generator()  # DTensor: MultiHeadAttention's dropout RNG
    inp = tf_keras.Input((seq,), batch_size=GLOBAL_BATCH, dtype="int32")
    x = tf_keras.layers.Embedding(vocab, hidden, name="embed")(inp)
    for i in range(layers):
        a = tf_keras.layers.MultiHeadAttention(heads, hidden // heads, name=f"mha{i}")(x, x)
        x = tf_keras.layers.LayerNormalization(epsilon=1e-6, name=f"ln{i}_a")(x + a)
        h = tf_keras.layers.Dense(ffn, activation="relu", name=f"ffn{i}_a")(x)
        h = tf_keras.layers.Dense(hidden, name=f"ffn{i}_b")(h)
        x = tf_keras.layers.LayerNormalization(epsilon=1e-6, name=f"ln{i}_b")(x + h)
    x = tf_keras.layers.GlobalAveragePooling1D()(x)
    return tf_keras.Model(inp, tf_keras.layers.Dense(classes, name="head")(x))


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build it, how a user would shard it, and what it learns from.

    ``sharded`` maps tf_keras object paths (matched with ``re.match``, as a ``LayoutMap`` does) to
    sharding specs over the ``model`` axis; anything not matched is replicated.  ``inputs`` is one
    example's input shape; ``vocab`` > 0 makes the inputs token ids below it; ``classes`` > 0 makes
    the labels class ids (sparse categorical cross-entropy on logits), else ``outputs`` regression
    targets (mean squared error).
    """

    name: str
    build: Callable[[], Any]
    sharded: dict = field(default_factory=dict)
    inputs: tuple = ()
    vocab: int = 0
    classes: int = 0
    outputs: int = 0
    description: str = ""
    sparse_gradients: bool = False  # an Embedding: its gradient is an IndexedSlices


#: Megatron-style: a block's first kernel column-sharded (its bias too), its second row-sharded.
_MLP_SHARDING = {r"block\d+_a\.kernel": (U, "model"), r"block\d+_a\.bias": ("model",),
                 r"block\d+_b\.kernel": ("model", U)}
#: Attention sharded by heads (Q/K/V kernels and biases; the output projection by its input heads),
#: the feed-forward block as the MLP's, the embedding table by hidden size (DTensor cannot gather
#: from a table sharded by vocabulary: "unshard dimension 0").
_TRANSFORMER_SHARDING = {
    r"mha\d+\._(query|key|value)_dense\.kernel": (U, "model", U),
    r"mha\d+\._(query|key|value)_dense\.bias": ("model", U),
    r"mha\d+\._output_dense\.kernel": ("model", U, U),
    r"ffn\d+_a\.kernel": (U, "model"), r"ffn\d+_a\.bias": ("model",), r"ffn\d+_b\.kernel": ("model", U),
    r"embed\.embeddings": (U, "model"),
}

MODELS = {m.name: m for m in (
    ModelSpec("resmlp", resmlp, _MLP_SHARDING, inputs=(256,), outputs=10,
              description="residual MLP, 8.7M parameters, regression (mse)"),
    ModelSpec("resmlp-small", functools.partial(resmlp, 32, 64, 2, 4), _MLP_SHARDING, inputs=(32,), outputs=4,
              description="a tiny residual MLP (tests)"),
    ModelSpec("mlp", mlp, _MLP_SHARDING, inputs=(512,), classes=8,
              description="residual MLP 512-2048-512 x4, 8.7M parameters, classifier"),
    ModelSpec("mlp-small", functools.partial(mlp, 32, 32, 64, 2, 4), _MLP_SHARDING, inputs=(32,), classes=4,
              description="a tiny residual MLP classifier (tests)"),
    ModelSpec("transformer", transformer, _TRANSFORMER_SHARDING, inputs=(64,), vocab=8192, classes=8,
              sparse_gradients=True,
              description="transformer encoder (Embedding, MultiHeadAttention, LayerNorm, Dense), 3.7M parameters"),
    ModelSpec("transformer-small", functools.partial(transformer, 512, 16, 32, 4, 64, 1), _TRANSFORMER_SHARDING,
              inputs=(16,), vocab=512, classes=4, sparse_gradients=True,
              description="a tiny transformer encoder (tests)"),
)}


def get_model_spec(name: str) -> ModelSpec:
    """A named model, or a user's ``module:function`` (``file.py:function``) returning a tf_keras model:
    its data and loss then follow its inputs and outputs (:mod:`dsgd.harness.model_data`), and it is
    laid out by a layout-map file (``--layout FILE``, e.g. from ``dsgd layouts --emit-layout-map``)."""
    if name in MODELS:
        return MODELS[name]
    if is_user_model(name):
        # an Embedding's sparse gradient is possible: tf_keras' reference gets dense ones (dense_gradients)
        return ModelSpec(name, functools.partial(_user_model, name), sparse_gradients=True,
                         description=f"the tf_keras model {name} returns")
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}, or give module:function")


def is_user_model(name: str) -> bool:
    """Whether ``name`` names a user's ``module:function`` rather than one of :data:`MODELS`."""
    return name not in MODELS and ":" in name


def _user_model(target: str):
    import os

    import tf_keras

    from dsgd.harness.model_data import resolve_function

    tf_keras.backend.experimental.enable_tf_random_generator()  # DTensor: any dropout's RNG
    model = resolve_function(target, os.getcwd())()
    if not isinstance(model, tf_keras.Model):
        raise TypeError(f"--model {target}: the function returned {type(model).__name__}, not a tf_keras Model")
    return model


# ------------------------------------------------------------------------------ on a mesh
def layout_map(spec: ModelSpec, mesh, policy: str = "sharded"):
    """The model's ``LayoutMap``: its Megatron-style sharding over ``model`` (``policy="sharded"``
    on a mesh with a ``model`` axis), everything replicated (``"replicated"``), or a layout-map file's
    (a path: :func:`dsgd.layoutmap.load_layout_map`)."""
    import tf_keras
    from tensorflow.experimental import dtensor

    if policy not in LAYOUT_POLICIES:
        if not policy.endswith(".json"):
            raise ValueError(f"layout must be one of {LAYOUT_POLICIES} or a layout-map .json file for a whole-step "
                             f"model, got {policy!r}")
        from dsgd.layoutmap import load_layout_map

        return load_layout_map(policy, mesh)
    if policy == "sharded" and is_user_model(spec.name):
        raise ValueError(f"--model {spec.name}: a module:function model has no sharding rules of its own; give "
                         "--layout FILE (a layout map, e.g. written by dsgd layouts --emit-layout-map) or replicated")
    lm = tf_keras.dtensor.experimental.LayoutMap(mesh=mesh)
    if policy == "sharded" and "model" in mesh.dim_names:
        for key, specs in spec.sharded.items():
            lm[key] = dtensor.Layout(list(specs), mesh)
    return lm  # anything not matched: replicated


def build_model(spec: ModelSpec, mesh, policy: str = "sharded"):
    """The model, built under its LayoutMap on ``mesh`` (its variables are DVariables)."""
    import tf_keras

    tf_keras.utils.set_random_seed(1)
    with layout_map(spec, mesh, policy).scope():
        # inside the scope: the Model's construction turns the lazy variables into DVariables
        return spec.build()


def loss(spec: ModelSpec, model=None):
    """The loss a named model trains with, or the one a user's model's outputs imply (``model``)."""
    import tf_keras

    if is_user_model(spec.name):
        from dsgd.harness import model_data

        return model_data.make_loss(model_data.infer_loss(model_data.tensor_specs(model.outputs)))
    if spec.classes:
        return tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return tf_keras.losses.MeanSquaredError()


def dataset(spec: ModelSpec, mesh, seed: int = 0, model=None):
    """A repeating ``DTensorDataset`` of random batches, sharded over the first mesh axis (for a user's
    model, from its input and output specs: ``model``)."""
    from dsgd.harness import model_data

    if is_user_model(spec.name):
        outputs = model_data.tensor_specs(model.outputs)
        examples = model_data.synthetic_examples(model_data.tensor_specs(model.inputs), outputs,
                                                 model_data.infer_loss(outputs), GLOBAL_BATCH,
                                                 model_data.smallest_vocabulary(model), seed=seed)
        return model_data.dtensor_dataset(mesh, GLOBAL_BATCH, examples=examples, axis=mesh.dim_names[0])
    rng = np.random.default_rng(seed)
    n = 4 * GLOBAL_BATCH
    if spec.vocab:
        x = rng.integers(0, spec.vocab, (n, *spec.inputs)).astype(np.int32)
    else:
        x = rng.standard_normal((n, *spec.inputs)).astype(np.float32)
    if spec.classes:
        y = rng.integers(0, spec.classes, (n,)).astype(np.int32)
    else:
        y = rng.standard_normal((n, spec.outputs)).astype(np.float32)
    return model_data.dtensor_dataset(mesh, GLOBAL_BATCH, examples=(x, y), axis=mesh.dim_names[0])


# ------------------------------------------------------------------------------ optimizers
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
          only a control edge uses) runs without the weight gradients at all: on the 8.7M ``mlp``
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

        def implementations_used(self) -> list[str]:
            from dsgd.names import NO_UPDATE

            return [NO_UPDATE]

    return _NoUpdate


@functools.lru_cache(maxsize=None)
def dense_gradients(base: type) -> type:
    """Optimizer class ``base`` (tf_keras') given dense gradients: on a mesh it cannot apply an
    ``Embedding``'s sparse gradient (``'tf.ResourceScatterAdd' op does not implement layout
    propagation``), and densifying them is how a user trains such a model with it at all."""
    import tensorflow as tf

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        pairs = [(tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, v) for g, v in grads_and_vars]
        return base.apply_gradients(self, pairs, *args, **kwargs)

    return type(base.__name__, (base,), {"apply_gradients": apply_gradients, "__doc__": dense_gradients.__doc__,
                                         "__module__": __name__})


# ------------------------------------------------------------------------------ the step
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

    if mode not in ("fit", "train_step"):
        raise ValueError(f"mode must be 'fit' or 'train_step', got {mode!r}")
    model = build_model(spec, mesh, policy)
    iterator = iter(dataset(spec, mesh, model=model))
    loss_fn = loss(spec, model)
    if mode == "fit":
        model.compile(optimizer=optimizer, loss=loss_fn, jit_compile=jit_compile)
        train = model.make_train_function()
        return TrainingStep(model, optimizer, lambda: train(iterator))
    variables = model.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss_value = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss_value, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss_value

    def step():
        x, y = next(iterator)
        return train_step(x, y)

    return TrainingStep(model, optimizer, step)
