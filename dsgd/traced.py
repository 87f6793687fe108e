"""What can be known of a gradient's layout while a ``tf.function`` is being traced.

Inside a DTensor ``tf.function`` a tensor is symbolic: ``dtensor.fetch_layout`` refuses it,
and DTensor itself only learns the layouts when the function is called.  Some gradients
still have a layout that is known at trace time, exactly:

* a function argument: the value the function is being traced for is an eager tensor
  (read from TensorFlow's tracing frames: ``_create_concrete_function`` holds the
  placeholders, its caller the canonicalized arguments, in the same structure);
* a captured eager tensor (``FuncGraph.captures``), also through nested functions;
* the output of ``dtensor.relayout`` (its ``layout`` attribute);
* any of these through ``Identity``-like ops.

:func:`traced_layout` returns that layout, :data:`PLAIN` for a value known not to be a
DTensor, or ``None`` when the layout is decided by DTensor's layout propagation (a
gradient computed in the function, e.g. by ``tape.gradient`` under ``model.fit``).

A traced function is reused for every later call whose arguments have the same
``TensorSpec`` (the layout is not part of it), so these checks see the first call's
arguments only; :func:`same_mesh_guard` covers every call.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Optional, Union

import tensorflow as tf
from tensorflow.experimental import dtensor
from tensorflow.python.framework.ops import EagerTensor

PLAIN = "plain"  # a value known not to be a DTensor

# ops whose output has their (first) input's layout
_PASS_THROUGH = frozenset({"Identity", "Snapshot", "StopGradient", "PreventGradient", "EnsureShape"})
_MAX_DEPTH = 16
_TRACING_MODULE = "tracing_compilation"

# FuncGraph -> {id(placeholder): the value it was traced for}; cleared with the graph
_ARG_VALUES: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = weakref.WeakKeyDictionary()


def traced_layout(t: Any, _depth: int = 0) -> Union[dtensor.Layout, str, None]:
    """The layout of symbolic tensor ``t`` if it is known while tracing, :data:`PLAIN`
    if ``t`` is known not to be a DTensor, else ``None``."""
    if isinstance(t, EagerTensor):  # e.g. a tensor the traced code made before the function
        return _eager_layout(t)
    if _depth > _MAX_DEPTH or not isinstance(t, tf.Tensor):
        return None
    try:
        op = t.op
        if op.type in _PASS_THROUGH:
            return traced_layout(op.inputs[0], _depth + 1)
        if op.type == "IdentityN":
            return traced_layout(op.inputs[t.value_index], _depth + 1)
        if op.type == "Relayout":
            return dtensor.Layout.from_string(_as_str(op.get_attr("layout")))
        outer = _outer_value(t)
    except Exception:  # noqa: BLE001 - an internal TensorFlow change: know nothing, check nothing
        return None
    if outer is None:
        return None
    if isinstance(outer, tf.Variable):
        layout = getattr(outer, "layout", None)
        return layout if isinstance(layout, dtensor.Layout) else PLAIN
    if isinstance(outer, EagerTensor):
        return _eager_layout(outer)
    if isinstance(outer, tf.Tensor):  # symbolic in an enclosing function
        return traced_layout(outer, _depth + 1)
    return None


def _eager_layout(t: EagerTensor) -> Union[dtensor.Layout, str]:
    with tf.init_scope():
        return dtensor.fetch_layout(t) if dtensor.is_dtensor(t) else PLAIN


def _as_str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _outer_value(t: tf.Tensor) -> Any:
    """What ``t`` stands for outside its function graph: the captured tensor, or the
    argument value the function is being traced for; ``None`` if neither is known."""
    graph = t.graph
    for external, internal in getattr(graph, "captures", ()):
        if internal is t:
            return external
    if t.op.type != "Placeholder":
        return None
    values = _ARG_VALUES.get(graph)
    if values is None:
        values = _argument_values(graph)
        if values:
            _ARG_VALUES[graph] = values
    return values.get(id(t))


def _argument_values(graph) -> dict[int, Any]:
    """``{id(placeholder): value}`` for the function arguments ``graph`` is being traced
    for, read from TensorFlow's tracing frames (TF 2.13+ ``tracing_compilation``); empty
    when those frames are not found or their structures do not match."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_create_concrete_function" and _TRACING_MODULE in code.co_filename:
            break
        frame = frame.f_back
    if frame is None or frame.f_locals.get("func_graph") is not graph:
        return {}
    placeholders = frame.f_locals.get("placeholder_bound_args")
    caller = frame.f_back
    if placeholders is None or caller is None or "args" not in caller.f_locals:
        return {}
    values = (caller.f_locals["args"], caller.f_locals.get("kwargs") or {})
    flat_p = tf.nest.flatten((tuple(placeholders.args), dict(placeholders.kwargs)))
    flat_v = tf.nest.flatten((tuple(values[0]), dict(values[1])))
    if len(flat_p) != len(flat_v):
        return {}
    return {id(p): v for p, v in zip(flat_p, flat_v)
            if isinstance(p, tf.Tensor) and (isinstance(v, (EagerTensor, tf.Variable)) or tf.is_tensor(v))}


def same_mesh_guard(grads: list, mesh: dtensor.Mesh) -> list:
    """Each of ``grads`` through an ``IdentityN`` with an anchor on ``mesh`` (the optimizer's).

    DTensor's mesh propagation refuses an op whose inputs live on different meshes, when the
    function is called and before anything runs ("All inputs to `tf_device.Cluster` must
    have same mesh configuration"), and the process stays usable.  Without it, a gradient on
    another mesh is copied across meshes by the step's relayout, which can block forever
    (the ``fused`` path: a 4-device gradient for a variable on 8 devices).  An identity, no copy.

    One ``IdentityN`` per gradient, not one for all: the relayouts DTensor expands from the
    results of one many-output op come out in an order that changes from process to process,
    and in a multi-client run the clients then pair different all-to-alls under one collective
    instance: "Shape mismatch in the collective instance" (an fsdp plan, 2 clients x 4 devices),
    or, where the shapes agree, the wrong gradients silently exchanged.

    The anchor is a scalar made here, in the graph (and control-flow branch or loop body) being
    traced: a value from outside it -- a read of the iterations variable made before a
    ``tf.cond`` branch or a ``tf.range`` loop body -- made DTensor's MLIR pass fail with
    "operand #N does not dominate this use".
    """
    anchor = dtensor.copy_to_mesh(tf.zeros([], tf.int32), dtensor.Layout.replicated(mesh, rank=0))
    return [tf.raw_ops.IdentityN(input=[g, anchor], name="dsgd_same_mesh_guard")[0] for g in grads]


def describe(layout: Union[dtensor.Layout, str, None]) -> Optional[str]:
    """A short human form of what :func:`traced_layout` returned."""
    if layout is None:
        return None
    if layout is PLAIN:
        return "not a DTensor"
    return f"layout {layout.sharding_specs} on mesh {layout.mesh.dim_names}"
