"""The interface between dsgd's Python and its C++ kernels, written once.

The kernels take two small vectors whose positions mean something: ``hyper`` (float64, every
SGD kernel: the step's hyperparameters) and ``meta`` (int64, the in-graph step: what the node
carries), and the in-graph step's inputs come in a fixed order.  Their fields are named here,
in order, and built by name (:func:`hyper`, :func:`meta`); ``multi_momentum.cc`` mirrors each
tuple as a C++ enum (``Hyper``, ``Meta``, ``GraphInput``: ``kHyperWeightDecay`` is
``weight_decay``), and ``tests/test_kernel_abi.py`` checks that the two agree.
"""
from __future__ import annotations

from typing import Sequence

#: ``hyper`` (float64): the hyperparameters of every SGD kernel call.
HYPER: tuple[str, ...] = ("momentum", "weight_decay", "clipvalue", "ema_momentum")

#: ``meta`` (int64): what the in-graph node needs besides its tensors.  ``dtype`` and
#: ``momentum_dtype`` are ``DataType`` enums; ``local_devices`` the copies that gather into one
#: call; ``token`` the traced node's own number (its copies gather by it); ``counter`` 1 when the
#: node also counts the step (the optimizer's iterations handle follows the variables' handles).
META: tuple[str, ...] = ("n", "use_momentum", "nesterov", "use_ema", "dtype", "momentum_dtype", "local_devices",
                         "token", "counter")

#: The in-graph node's inputs (an ``Assert``'s condition, then its data), in order; after the
#: ``n`` gradients: ``n`` variable handles, the counter's handle when ``meta.counter``, the
#: per-device variable sets ``int64 [2 * local_devices]`` (device index, set address), and the
#: replica map ``int32 [local_devices * n]`` or ``[0]`` (which device's copy computes each shard:
#: :func:`dsgd.impl.local.replica_sources`).
GRAPH_INPUTS: tuple[str, ...] = ("condition", "meta", "lr", "scales", "decay", "hyper", "overwrite", "grads")


def _ordered(names: Sequence[str], what: str, fields: dict) -> list:
    missing = [n for n in names if n not in fields]
    unknown = [n for n in fields if n not in names]
    if missing or unknown:
        raise TypeError(f"{what}: missing {missing}, unknown {unknown} (fields: {list(names)})")
    return [fields[n] for n in names]


def hyper(**fields: float) -> list[float]:
    """The ``hyper`` vector, from every field of :data:`HYPER` by name (0 turns clipvalue off)."""
    return [float(v) for v in _ordered(HYPER, "hyper", fields)]


def meta(**fields: int) -> list[int]:
    """The ``meta`` vector, from every field of :data:`META` by name."""
    return [int(v) for v in _ordered(META, "meta", fields)]


def graph_input(name: str) -> int:
    """The position of one of :data:`GRAPH_INPUTS` among the node's inputs."""
    return GRAPH_INPUTS.index(name)
