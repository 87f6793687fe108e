"""Checking variables against the optimizer's mesh, and ``(gradient, variable)`` pairs
against the variable's plan entry.

Every pair of a step is checked (shape, dtype, mesh and layout, where known) before any op
is dispatched, so one bad pair leaves every variable untouched; each error names the
variable and what is wrong.  The eager common case is checked faster, in one loop, by
:meth:`dsgd.step.StepEngine.items`; it comes here for anything else.
"""
from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf
from tensorflow.experimental import dtensor

from dsgd import traced
from dsgd.plan import Entry, variable_layout


def check_variable(v, mesh: Optional[dtensor.Mesh]) -> None:
    """A variable to build the plan with: a DVariable on ``mesh``, or a plain one without a mesh."""
    layout = variable_layout(v)
    name = v.name if hasattr(v, "name") else f"{v!r}"  # repr reads the value: only when nameless
    if mesh is None:
        if layout is not None:
            raise ValueError(
                f"variable {name} is a DVariable on mesh {layout.mesh.dim_names}; create the optimizer "
                "with mesh=<that mesh> to train DVariables")
        return
    if layout is None:
        raise ValueError(
            f"variable {name} is a plain tf.Variable, but this optimizer has mesh={mesh.dim_names}; "
            "give it DVariables on that mesh (or create the optimizer without mesh)")
    if layout.mesh != mesh:
        raise ValueError(f"variable {name} is on mesh {layout.mesh}, not on the optimizer's mesh {mesh}")


def check_pair(g, v, entry: Optional[Entry], mesh: Optional[dtensor.Mesh], eager: bool) -> tuple[Entry, Any]:
    """``(entry, gradient)`` for one pair, or a ValueError naming the variable and what is
    wrong (``entry`` None: ``v`` is not a variable the optimizer was built with).  A gradient
    given as a Python list or NumPy array is converted; one whose shape broadcasts to the
    variable's (``(1,)`` for a ``(1, 1)`` kernel) is broadcast, as tf_keras' update arithmetic does."""
    if entry is None:
        raise ValueError(
            f"variable {v.name} is not among the variables this optimizer was built with; call "
            "build() with the full list of trainable variables first")
    broadcast = False
    if isinstance(g, tf.IndexedSlices):
        gshape = g.values.shape[1:]
        if gshape.rank is not None and list(gshape) != list(v.shape[1:]):
            raise ValueError(
                f"sparse gradient for variable {v.name} has row shape {list(gshape)}, expected {list(v.shape[1:])}")
        gdtype = g.values.dtype
    else:
        if not tf.is_tensor(g):
            g = tf.convert_to_tensor(g, dtype_hint=v.dtype)
        if g.shape.rank is not None and g.shape.is_fully_defined() and g.shape != v.shape:
            if not broadcasts_to(g.shape, v.shape):
                raise ValueError(
                    f"gradient for variable {v.name} has shape {g.shape}, expected {v.shape} (or a shape "
                    "that broadcasts to it)")
            broadcast = True
        gdtype = g.dtype
    if gdtype != v.dtype:
        raise ValueError(f"gradient for variable {v.name} has dtype {gdtype.name}, expected {v.dtype.name}")
    if not isinstance(g, tf.IndexedSlices):
        check_gradient_layout(g, v, entry, mesh, eager, broadcast)
    if broadcast:
        g = tf.broadcast_to(g, v.shape)
        if entry.layout is not None:
            g = dtensor.relayout(g, entry.layout)
    return entry, g


def check_gradient_layout(g, v, entry: Entry, mesh: Optional[dtensor.Mesh], eager: bool, broadcast: bool) -> None:
    """The gradient's mesh and layout against the variable's, where they are known: always
    eagerly; inside ``tf.function`` for arguments, captures and relayouts
    (:func:`dsgd.traced.traced_layout`).  A gradient computed in the function has the
    layout DTensor's propagation gives it, and is relaid out to the variable's."""
    if eager:
        glayout = variable_layout(g)
        how = f"layout {glayout.sharding_specs}" if glayout is not None else None
    else:
        known = traced.traced_layout(g)
        if known is None:
            return
        glayout = None if known is traced.PLAIN else known
        how = traced.describe(known)
    where = "" if eager else " (as traced: a function argument, a capture or a relayout)"
    if mesh is None:
        if glayout is not None:
            raise ValueError(f"gradient for variable {v.name} is a DTensor{where}, but this optimizer has no mesh; "
                             "create it with mesh=<the gradients' mesh> to train DVariables")
        return
    if glayout is None:
        raise ValueError(
            f"gradient for variable {v.name} is not a DTensor{where}; on mesh {mesh.dim_names} gradients "
            f"must be DTensors with the variable's layout {entry.layout.sharding_specs}")
    if glayout.mesh != mesh:
        raise ValueError(f"gradient for variable {v.name} is on mesh {glayout.mesh}{where}, expected the "
                         f"optimizer's mesh {mesh}")
    if broadcast:
        # a lower-rank gradient cannot have the variable's layout: it must be replicated
        if not glayout.is_fully_replicated():
            raise ValueError(
                f"gradient for variable {v.name} has shape {g.shape} (broadcast to {v.shape}) and {how}{where}; "
                "a broadcast gradient must be fully replicated")
    elif glayout != entry.layout:
        raise ValueError(
            f"gradient for variable {v.name} has {how}{where}, expected the variable's layout "
            f"{entry.layout.sharding_specs}")


def guarded(items: list, mesh: dtensor.Mesh) -> list:
    """Inside ``tf.function`` on a mesh: every dense gradient through one same-mesh guard
    (:func:`dsgd.traced.same_mesh_guard`, next to a scalar on ``mesh``), so that a gradient on another
    mesh is refused by DTensor when the function is called, on every call, instead of blocking."""
    dense = [k for k, (_, g) in enumerate(items) if not isinstance(g, tf.IndexedSlices)]
    if not dense:
        return items
    guarded_grads = traced.same_mesh_guard([items[k][1] for k in dense], mesh)
    items = list(items)
    for k, g in zip(dense, guarded_grads):
        items[k] = (items[k][0], g)
    return items


def broadcasts_to(shape: tf.TensorShape, target: tf.TensorShape) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (NumPy rules)."""
    if shape.rank > target.rank:
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape.as_list()), reversed(target.as_list())))


def name_of(v) -> str:
    """A variable's name without reading its value (a DVariable's repr reads it)."""
    return getattr(v, "name", None) or type(v).__name__
