"""The gradient an update takes, written once for every implementation: step 1 of the rule
(:func:`dsgd.rules.gradient`: the norm-clip coefficient, then ``clipvalue``), then dense.

A sparse gradient (``tf.IndexedSlices``) is scaled and clipped slice by slice before its
duplicated rows are summed, as tf_keras does; the C++ kernel (``grouped``, ``grouped_graph``)
and XLA's program (``xla``) take dense gradients and apply step 1 themselves.
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
from tensorflow.experimental import dtensor

from dsgd import rules


def densify(g, shape: Sequence[int], layout: Optional[dtensor.Layout] = None) -> tf.Tensor:
    """``g`` as a dense tensor in ``layout`` (None: as it is; the local domain's shards).

    ``tf.IndexedSlices``: the slices summed into ``shape[0]`` rows (duplicated indices summed, as
    tf_keras' de-duplication does; an index of -1, a row on another device, dropped).  Dense is
    exact for SGD: momentum decays every row each step, so the reference's sparse update
    touches every row of the variable anyway.
    """
    if not isinstance(g, tf.IndexedSlices):
        if layout is not None and not tf.executing_eagerly():
            # Inside tf.function a gradient's layout is unknown while tracing (eagerly it was
            # checked): pin it to the variable's.  A mismatched one made the fused training op
            # segfault (TF 2.21); relayout is a no-op when the layouts already agree.
            g = dtensor.relayout(g, layout)
        return g
    dense = tf.math.unsorted_segment_sum(g.values, g.indices, shape[0])
    if layout is not None:
        dense = dtensor.relayout(dense, layout)
    return dense


def update_gradient(g, scales: Optional[Sequence[tf.Tensor]], i: int, clipvalue: Optional[float],
                    dtype: tf.DType, shape: Sequence[int], layout: Optional[dtensor.Layout] = None) -> tf.Tensor:
    """Item ``i``'s gradient ``g`` as its update takes it: times its norm-clip coefficient
    ``scales[i]`` (``scales`` None: no norm clipping), clipped to ``clipvalue``, then
    :func:`densify`'d to ``shape`` and ``layout`` (the variable's, or one device's block)."""
    return densify(rules.gradient(g, None if scales is None else scales[i], clipvalue, dtype), shape, layout)
