"""Creating and moving optimizer state on a mesh: slots with their variable's layout."""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.experimental import dtensor

from dsgd.plan import variable_layout


def zeros(shape, dtype, layout: Optional[dtensor.Layout]) -> tf.Tensor:
    if layout is None:
        return tf.zeros(shape, dtype)
    return dtensor.call_with_layout(tf.zeros, layout, shape=shape, dtype=dtype)


def to_layout(value, layout: Optional[dtensor.Layout], dtype=None) -> tf.Tensor:
    """Any value (NumPy, plain tensor, DTensor on any layout of the mesh) as a tensor with ``layout``."""
    if layout is None:
        if isinstance(value, tf.Variable):
            value = value.read_value()
        if variable_layout(value) is not None:
            value = to_numpy(value)
        return tf.convert_to_tensor(value, dtype=dtype)
    if isinstance(value, tf.Variable):
        value = value.read_value()
    src = variable_layout(value) if tf.is_tensor(value) else None
    if src is None:
        t = tf.convert_to_tensor(value, dtype=dtype)
        t = dtensor.copy_to_mesh(t, dtensor.Layout.replicated(layout.mesh, t.shape.rank))
    else:
        t = value if dtype is None else tf.cast(value, dtype)
        if src.mesh != layout.mesh:
            raise ValueError(f"value is on mesh {src.mesh}, expected mesh {layout.mesh}")
    return dtensor.relayout(t, layout)


def to_numpy(value) -> np.ndarray:
    """A variable or tensor's full value as NumPy, whatever its layout."""
    if isinstance(value, tf.Variable):
        value = value.read_value()
    layout = variable_layout(value)
    if layout is not None and not layout.is_fully_replicated():
        value = dtensor.relayout(value, dtensor.Layout.replicated(layout.mesh, layout.rank))
    if layout is not None:
        value = dtensor.unpack(value)[0]
    return value.numpy()


def new_slot(model_variable, name: str, *, initial_value=None, dtype=None, layout=None) -> tf.Variable:
    """A non-trainable variable beside ``model_variable``, with exactly its layout.

    ``layout`` overrides that (ZeRO-1 slots sharded further over replicated axes).
    """
    layout = layout if layout is not None else variable_layout(model_variable)
    dtype = tf.as_dtype(dtype or getattr(model_variable, "true_dtype", None) or model_variable.dtype)
    if initial_value is None:
        init = zeros(model_variable.shape, dtype, layout)
    else:
        init = to_layout(initial_value, layout, None)
        if init.dtype != dtype:
            init = tf.cast(init, dtype)
    vname = f"{name}/{model_variable._shared_name}"
    if layout is None:
        return tf.Variable(init, name=vname, dtype=dtype, trainable=False)
    return named_dvariable(init, vname, dtype)


# DTensor caches the SPMD expansion of an eager op by its attributes, and a variable's name is
# its VarHandleOp's ``debug_name``: a unique name per slot made DTensor expand every slot's
# handle afresh (9.5 ms each on 8 devices, vs 0.95 ms with a shared one; TF 2.21).  So slots
# are created under one op name and then given their own Python-visible name.
_SLOT_OP_NAME = "dsgd_slot"


def named_dvariable(init: tf.Tensor, name: str, dtype=None, trainable: bool = False) -> dtensor.DVariable:
    """A DVariable holding ``init``, named ``name`` under the current name scope (as a
    ``tf.Variable`` would be: ``SGD/m/<var>`` inside the optimizer's step), created at
    cached-op speed."""
    scope = tf.get_current_name_scope()
    if scope:
        name = f"{scope.rstrip('/')}/{name}"
    v = dtensor.DVariable(init, name=_SLOT_OP_NAME, dtype=dtype, trainable=trainable)
    v._handle_name = f"{name}:0"  # what .name, ._shared_name and Keras' slot lookups read
    v._unique_id = f"{name}_{ops.uid()}"
    return v
