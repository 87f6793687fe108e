"""The plan: built once per variable set, it groups variables and holds their slots.

Everything about the variables that can be decided before the first step is decided here
(grouping by mesh, layout and dtype; which variables decay; each variable's replication
factor, shape, layout string and dtype for the per-step checks), so the step does no
Python-side searching.  Which implementation runs a group depends on the mode (eagerly or
inside ``tf.function``), so :class:`dsgd.step.StepEngine` chooses it at the first step that
meets the group in that mode, and caches it.  Also here: :class:`StepArgs`, one step's values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import tensorflow as tf
from tensorflow.experimental import dtensor

from dsgd import meshspec


@dataclass
class Entry:
    """One model variable and what the optimizer keeps for it."""

    index: int
    var: tf.Variable
    key: Any
    momentum: Optional[tf.Variable] = None
    average: Optional[tf.Variable] = None
    decay: bool = True
    layout: Optional[dtensor.Layout] = None
    replication: int = 1
    shape: tuple = ()  # the variable's static shape, for the per-step gradient check
    layout_str: Optional[str] = None  # ``layout.to_string()``, compared with each gradient's
    dtype: Optional[tf.DType] = None  # the variable's dtype (read once: DVariable attributes are slow)
    dtype_enum: int = 0  # ``dtype.as_datatype_enum``, compared with each eager gradient's
    constrained: bool = False  # the variable has a constraint to apply after the update


@dataclass
class Group:
    """Variables sharing mesh, layout and dtype: one implementation runs them together."""

    layout_spec: str
    dtype: tf.DType
    mesh: Optional[dtensor.Mesh]
    entries: list[Entry] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (str(self.mesh) if self.mesh is not None else None, self.layout_spec, self.dtype.name)


@dataclass
class StepArgs:
    """The values of one step that every implementation needs."""

    lr: tf.Tensor  # float32 scalar; a replicated DTensor when the optimizer has a mesh
    momentum: float
    nesterov: bool
    weight_decay: Optional[float]
    clipnorm: Optional[float]
    clipvalue: Optional[float]
    global_clipnorm: Optional[float]
    ema_momentum: Optional[float]  # None: no EMA
    ema_overwrite: Any = False  # bool or a bool tensor (graph mode)
    # the optimizer's iterations, for an implementation that counts the step with its update
    # (Implementation.counts_step); None: the optimizer counts it
    counter: Optional[tf.Variable] = None


def variable_layout(x) -> Optional[dtensor.Layout]:
    """The DTensor layout of a variable or tensor, or None for a plain one.

    A DVariable records its layout at creation (``.layout``): reading it is free and works in
    graph mode too, while ``dtensor.fetch_layout`` reads the variable (a DTensor op) and is
    eager-only.  Symbolic tensors inside ``tf.function`` have no layout to fetch (None).
    """
    layout = getattr(x, "layout", None)
    if isinstance(layout, dtensor.Layout):
        return layout
    if isinstance(x, tf.Variable) and not isinstance(x, dtensor.DVariable):
        return None
    if not tf.executing_eagerly() or not (tf.is_tensor(x) or isinstance(x, tf.Variable)):
        return None
    try:
        return dtensor.fetch_layout(x)
    except Exception:  # plain tensors have no layout
        return None


def new_entry(index: int, var: tf.Variable, key: Any, momentum: Optional[tf.Variable],
              average: Optional[tf.Variable], decay: bool, layout: Optional[dtensor.Layout]) -> Entry:
    """The entry of ``var`` (with ``layout``, its :func:`variable_layout`) and its slots."""
    return Entry(
        index=index, var=var, key=key, momentum=momentum, average=average, decay=decay, layout=layout,
        replication=meshspec.replication_factor(layout) if layout is not None else 1,
        shape=tuple(var.shape.as_list()) if var.shape.is_fully_defined() else (),
        layout_str=layout.to_string() if layout is not None else None,
        dtype=var.dtype, dtype_enum=var.dtype.as_datatype_enum,
        constrained=getattr(var, "constraint", None) is not None,
    )


def group_entries(entries: list[Entry]) -> list[Group]:
    """The entries grouped by mesh, layout and dtype, in order of first appearance."""
    groups: dict[tuple, Group] = {}
    for e in entries:
        layout = e.layout
        spec = meshspec.layout_to_spec(layout) if layout is not None else "local"
        mesh = layout.mesh if layout is not None else None
        g = Group(spec, e.var.dtype, mesh)
        groups.setdefault(g.key, g).entries.append(e)
    return list(groups.values())
