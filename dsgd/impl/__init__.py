"""The registry of step implementations (add one: write its module, named after its registry name,
and list its class below), ``auto``'s choice among them, and the iteration counter the local domain
uses (:func:`counter`).

Modules: :mod:`~dsgd.impl.base` (the interface), :mod:`~dsgd.impl.gradients` (the gradient every
update takes), :mod:`~dsgd.impl.local` (the local domain's base); one per implementation:
``ops``, ``fused``, ``per_shard``, ``grouped``, ``grouped_graph`` (``grouped`` inside
``tf.function``), ``xla``, ``sharded_state``."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import tensorflow as tf

from dsgd import kernels
from dsgd.impl.base import Implementation
from dsgd.impl.fused import FusedDTensor
from dsgd.impl.grouped import Counter, Grouped
from dsgd.impl.grouped_graph import GroupedInGraph
from dsgd.impl.local import PerDeviceCounter
from dsgd.impl.ops import OpsDTensor
from dsgd.impl.per_shard import PerShard
from dsgd.impl.sharded_state import ShardedState
from dsgd.impl.xla import XLA

# Imported plainly: a broken module fails here, loudly, instead of ``auto`` quietly choosing a
# slower path.  Whether one can run in this process (its kernel built) is its
# ``unavailable_reason()``.
REGISTRY: dict[str, type[Implementation]] = {
    cls.name: cls for cls in (OpsDTensor, FusedDTensor, PerShard, Grouped, XLA, ShardedState)
}

CHOICES = ("auto", *REGISTRY)

# What an eager-only (local-domain) implementation runs as inside ``tf.function``; one that is
# not listed falls back to ``fused`` there.
IN_GRAPH: dict[str, type[Implementation]] = {"grouped": GroupedInGraph}


def for_mode(name: str, eager: bool) -> Optional[type[Implementation]]:
    """The class that runs implementation ``name`` in this mode, or None when it has no
    counterpart inside ``tf.function`` (a local-domain one that is not in :data:`IN_GRAPH`)."""
    cls = get(name)
    if eager or cls.domain != "local":
        return cls
    return IN_GRAPH.get(name)


def usable(cls: Optional[type[Implementation]], group, options) -> bool:
    return cls is not None and cls.unavailable_reason() is None and cls.supports(group, options) is None


def choose(group, options, eager: bool) -> str:
    """``implementation="auto"``'s rule, in order:

    1. ``jit_compile=True``: ``xla`` (eagerly; inside ``tf.function``: ``fused``);
    2. ``grouped`` when its multi-tensor kernel is built and handles the group (inside
       ``tf.function``, e.g. ``model.fit``, its in-graph form: :mod:`dsgd.impl.grouped_graph`);
    3. eagerly, ``per_shard`` when it handles the group (same dtype for variable and momentum);
    4. inside ``tf.function``, ``fused``; eagerly, ``ops``.
    """
    if not eager:
        candidates = ([] if options.jit_compile else ["grouped"]) + ["fused"]
    else:
        candidates = (["xla"] if options.jit_compile else []) + ["grouped", "per_shard"]
    for name in candidates:
        if name in REGISTRY and usable(for_mode(name, eager), group, options):
            return name
    return "ops"


def get(name: str) -> type[Implementation]:
    """The implementation class registered as ``name`` (or an in-graph counterpart's name)."""
    cls = REGISTRY.get(name)
    if cls is None:
        cls = next((c for c in IN_GRAPH.values() if c.name == name), None)
    if cls is None:
        raise ValueError(f"`implementation` must be one of {list(CHOICES)}, got {name!r}")
    return cls


def counter(handles: Sequence[tf.Tensor], dtype: tf.DType) -> Callable[[], None]:
    """Adds 1 to every local copy (``handles``) of a replicated variable when called: the
    optimizer's iterations in the local domain.  One op for all devices when the grouped
    kernels are loaded (:class:`~dsgd.impl.grouped.Counter`, int64), else one per device."""
    if kernels.loaded() is not None and dtype == tf.int64:
        return Counter(handles)
    return PerDeviceCounter(handles, dtype)
