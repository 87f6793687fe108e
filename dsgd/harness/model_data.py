"""What a whole training step of a user's model learns from, on a mesh: a loss and a ``DTensorDataset``;
and the user's ``module:function`` itself (:func:`resolve_function`).  ``dsgd bench|profile --model
module:function`` and ``dsgd layouts`` build their steps from here.

Inputs come from the model's input specs and the global batch (``--batch-size``): token ids below the
smallest ``Embedding``'s ``input_dim`` for integer inputs, standard normal floats otherwise.  Labels
follow the loss: with no ``--loss``, a model whose output is one vector of ``C >= 2`` values per example
is taken as a classifier emitting logits (sparse class ids, ``SparseCategoricalCrossentropy(from_logits=
True)``), anything else as a regression (``MeanSquaredError``, normal targets of the output's shape).
Or ``--data module:function`` returns a ``tf.data.Dataset`` of unbatched ``(x, y)`` examples.

The dataset is split over the mesh's data axis (``batch``) and repeats; tf.data's autotuning is off
(:func:`dsgd.harness.models.dataset` says why).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np

from dsgd.workloads import WorkloadError

#: ``--loss`` names -> (tf_keras loss class, its keyword arguments, label kind)
LOSSES = {
    "sparse_categorical_crossentropy": ("SparseCategoricalCrossentropy", {"from_logits": True}, "ids"),
    "categorical_crossentropy": ("CategoricalCrossentropy", {"from_logits": True}, "onehot"),
    "binary_crossentropy": ("BinaryCrossentropy", {"from_logits": True}, "binary"),
    "mse": ("MeanSquaredError", {}, "normal"),
    "mae": ("MeanAbsoluteError", {}, "normal"),
}
EXAMPLES = 4  # batches of distinct examples the dataset cycles through


def resolve_function(target: str, cwd: Optional[str] = None, flag: str = "--model"):
    """The function ``target`` names: ``module:function`` (importable, or from ``cwd``) or
    ``file.py:function``; a :class:`~dsgd.workloads.WorkloadError` naming ``flag`` otherwise."""
    import importlib
    import importlib.util

    mod, sep, fn = target.rpartition(":")
    if not sep or not mod or not fn:
        raise WorkloadError(f"{flag} {target!r}: expected module:function")
    if cwd and cwd not in sys.path:
        sys.path.insert(0, cwd)
    if mod.endswith(".py"):
        p = Path(mod) if Path(mod).is_absolute() or not cwd else Path(cwd) / mod
        if not p.is_file():
            raise WorkloadError(f"{flag} {target!r}: file {p} does not exist")
        s = importlib.util.spec_from_file_location(p.stem, p)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            raise WorkloadError(f"{flag} {target!r}: cannot import {mod!r} ({e})") from None
    if not hasattr(module, fn):
        raise WorkloadError(f"{flag} {target!r}: module {mod!r} has no attribute {fn!r}")
    return getattr(module, fn)


def tensor_specs(tensors) -> list[dict]:
    """``{"shape", "dtype"}`` of one example of each of a model's inputs or outputs (``model.inputs``)."""
    return [{"shape": [None if d is None else int(d) for d in t.shape[1:]], "dtype": t.dtype.name} for t in tensors]


def smallest_vocabulary(model) -> Optional[int]:
    """The smallest ``input_dim`` of the model's ``Embedding`` layers (token ids must stay below it)."""
    dims = [layer.input_dim for layer in _layers(model) if type(layer).__name__ == "Embedding"]
    return min(dims) if dims else None


def _layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _layers(layer)


def infer_loss(outputs: list) -> str:
    """The ``--loss`` a model's outputs imply: logits of a classifier (one vector of >= 2 values per
    example), else mean squared error."""
    if len(outputs) == 1 and len(outputs[0]["shape"]) == 1 and (outputs[0]["shape"][0] or 0) >= 2:
        return "sparse_categorical_crossentropy"
    return "mse"


def make_loss(name: str):
    import tf_keras

    cls, kwargs, _ = LOSSES[name]
    return getattr(tf_keras.losses, cls)(**kwargs)


def synthetic_examples(inputs: list, outputs: list, loss: str, batch: int, vocab: Optional[int],
                       seed: int = 0) -> tuple:
    """``(x, y)`` numpy arrays of ``EXAMPLES * batch`` examples for the model's input and output specs."""
    rng = np.random.default_rng(seed)
    n = EXAMPLES * batch
    xs = []
    for spec in inputs:
        shape = (n, *[d or 1 for d in spec["shape"]])
        if spec["dtype"].startswith("int") or spec["dtype"].startswith("uint"):
            xs.append(rng.integers(0, max(2, vocab or 2), shape).astype(spec["dtype"]))
        else:
            xs.append(rng.standard_normal(shape).astype(spec["dtype"] if spec["dtype"] != "bool" else "float32"))
    out = outputs[0]
    kind = LOSSES[loss][2]
    width = (out["shape"][-1] or 1) if out["shape"] else 1
    if kind == "ids":
        y = rng.integers(0, width, (n, *[d or 1 for d in out["shape"][:-1]])).astype(np.int32)
    elif kind == "onehot":
        ids = rng.integers(0, width, (n, *[d or 1 for d in out["shape"][:-1]]))
        y = np.eye(width, dtype=np.float32)[ids]
    elif kind == "binary":
        y = rng.integers(0, 2, (n, *[d or 1 for d in out["shape"]])).astype(np.float32)
    else:
        y = rng.standard_normal((n, *[d or 1 for d in out["shape"]])).astype(np.float32)
    return (xs[0] if len(xs) == 1 else tuple(xs)), y


def user_dataset(target: str, cwd: Optional[str] = None):
    """The ``tf.data.Dataset`` of unbatched ``(x, y)`` examples that ``--data module:function`` returns."""
    import tensorflow as tf

    ds = resolve_function(target, cwd, flag="--data")()
    if not isinstance(ds, tf.data.Dataset):
        raise TypeError(f"--data {target}: the function returned {type(ds).__name__}, not a tf.data.Dataset")
    if not isinstance(ds.element_spec, tuple) or len(ds.element_spec) != 2:
        raise TypeError(f"--data {target}: the dataset's elements must be (x, y) pairs of one example each, "
                        f"got {ds.element_spec}")
    return ds


def _client_batch_shards(mesh, axis: str) -> Optional[tuple[int, int, int]]:
    """``(first, stop, count)``: the shards of the batch axis this client's devices hold, when that is not all
    of them (a DTensor multi-client run); None otherwise."""
    if axis not in mesh.dim_names:
        return None
    count = mesh.dim_size(axis)
    held = sorted({int(loc[axis]) for loc in mesh.local_device_locations()})
    if len(held) == count:
        return None
    if held != list(range(held[0], held[-1] + 1)):
        raise ValueError(f"this client holds the {axis!r} shards {held} of {count}, not a contiguous range")
    return held[0], held[-1] + 1, count


def dtensor_dataset(mesh, batch: int, *, examples: Optional[tuple] = None, dataset=None, axis: str = "batch"):
    """A repeating ``DTensorDataset`` of ``batch``-example batches split over ``axis``, from numpy
    ``examples`` or an unbatched ``dataset``."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    ds = dataset if dataset is not None else tf.data.Dataset.from_tensor_slices(examples)
    ds = ds.repeat()
    shards = _client_batch_shards(mesh, axis)
    if shards is not None:
        # A multi-client run: each client reads the dataset itself, and DTensorDataset batches what it reads by
        # the client's share of the batch.  Without this, every client read the same first examples (the global
        # batch: the first batch/clients examples, repeated); with it, global batch s is examples
        # [s * batch, (s + 1) * batch), each batch shard's part where its devices are, as in one process.
        first, stop, count = shards
        if batch % count:
            raise ValueError(f"global batch {batch} does not divide over the mesh's {count} {axis!r} shards")
        ds = ds.batch(batch // count, drop_remainder=True).enumerate()
        ds = ds.filter(lambda i, _: tf.logical_and(i % count >= first, i % count < stop)).map(lambda i, b: b)
        ds = ds.unbatch()
    # tf.data's autotuning thread sleeps up to a minute between rounds and an iterator's teardown waits for it
    # (TF 2.21): 15-60 s per iterator, minutes per bench sweep.  The batches are in memory: nothing to tune.
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = ds.with_options(options)
    layouts = tf.nest.map_structure(
        lambda spec: dtensor.Layout.batch_sharded(mesh, axis, rank=len(spec.shape) + 1), ds.element_spec)
    return dtensor.DTensorDataset(ds, mesh=mesh, layouts=layouts, global_batch_size=batch, batch_dim=axis)


__all__ = ["LOSSES", "resolve_function", "tensor_specs", "smallest_vocabulary", "infer_loss", "make_loss",
           "synthetic_examples", "user_dataset", "dtensor_dataset"]
