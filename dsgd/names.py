"""The names shared across dsgd, each defined once, with no TensorFlow (nor any dsgd module) imported.

The argument checks, the harness, the advisor and the tests all spell an implementation, a
mode or the baseline the same way by importing it from here.  The registry of implementations
itself is :data:`dsgd.impl.REGISTRY` (it imports TensorFlow); ``tests/test_argcheck.py`` checks
that :data:`IMPLEMENTATIONS` names exactly its choices.
"""
from __future__ import annotations

from typing import Any

#: ``SGD(implementation=...)``'s default: dsgd picks per group of variables (:func:`dsgd.impl.choose`).
AUTO = "auto"
#: what ``SGD(implementation=...)`` accepts: :data:`AUTO`, then :data:`dsgd.impl.REGISTRY`'s names.
IMPLEMENTATIONS = (AUTO, "ops", "fused", "per_shard", "grouped", "xla", "sharded_state")

#: tf_keras' DTensor SGD, run as users run it (in a ``tf.function``): the baseline of every speed-up.
REFERENCE = "reference"
#: the floor of a whole step (and of ``graph``): the same function with an optimizer that brings every
#: gradient to its variable's layout and hands them to one stateful no-op, so nothing is applied.
NO_UPDATE = "no-update"

#: Where a step runs, as users run it:
#: ``eager``: ``apply_gradients`` called eagerly on a workload's variables (tf_keras' reference
#: inside a ``tf.function``, its faster mode); ``graph``: ``apply_gradients`` inside a
#: ``tf.function`` for both; ``train_step``: a whole custom ``tf.function`` training step
#: (forward, backward, update) of a named model (:mod:`dsgd.harness.models`); ``fit``: one step of
#: ``model.fit`` on that model (its ``train_function``).
MODES = ("eager", "graph", "train_step", "fit")
#: modes whose workload is a model of :mod:`dsgd.harness.models` (the others take a named workload)
MODEL_MODES = ("train_step", "fit")
#: modes with a :data:`NO_UPDATE` floor: the function minus its update (in ``graph``: a function taking
#: the same gradients and variables, which DTensor pays for on every call whatever the optimizer)
FLOOR_MODES = ("graph",) + MODEL_MODES

#: the dtypes variables and gradients may have, with their size in bytes
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

#: optimizer option presets: what the benchmarks sweep (``--options``)
OPTION_PRESETS: dict[str, dict[str, Any]] = {
    "momentum": {"learning_rate": 0.01, "momentum": 0.9},
    "sgd": {"learning_rate": 0.01},
    "full": {"learning_rate": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "global_clipnorm": 1.0, "use_ema": True},
}
