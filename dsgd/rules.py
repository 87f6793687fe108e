"""The SGD update rule, written once in Python, next to the documented math: the reference.

Each function maps tensors to tensors and works the same on DTensors (where DTensor inserts
the collectives) and on one device's local shards.  Implementations differ in *how* they
execute the rule (one op per variable, one fused kernel per device, XLA), never in *what* it
is: ``ops``, ``sharded_state`` and ``xla`` call these functions; the others execute the same
steps with a fused TensorFlow training op or dsgd's C++ kernel, listed below with the tests
that check them against the float64 model :mod:`dsgd.reference64`.

Order of one step (the tf_keras order):
  1. clip:   ``g = g * scale``, ``scale`` by norm (:func:`clip_norm_scale` per variable, or
             :func:`global_clip_scale` for all, from :func:`sum_of_squares`), then
             ``g = clip(g, -clipvalue, clipvalue)``: :func:`gradient`
  2. decay:  ``w = w - w * wd * lr``               (variables not excluded): :func:`weight_decay`
  3. update: momentum = 0:  ``w = w - lr * g``: :func:`sgd`
             momentum > 0:  ``m = momentum * m - lr * g``;  ``w = w + m``: :func:`momentum`
             nesterov:      ``m = momentum * m - lr * g``;  ``w = w + momentum * m - lr * g``
  4. EMA:    ``avg = ema_momentum * avg + (1 - ema_momentum) * w``: :func:`ema`;
             every ``ema_overwrite_frequency`` iterations ``w = avg`` (:func:`ema_overwrite_due`).

Checked equivalents (what runs instead of these functions, and what checks it):

===========================  ================================================  ==========================
step                         executed by                                       checked by
===========================  ================================================  ==========================
1. sums of squares           ``DsgdMultiSumSq(At)`` (``grouped``; in double)   test_optimizer_numerics,
                                                                               test_grouped
1. global coefficient        ``DsgdGlobalClipScale`` (``grouped``)             test_grouped (equals
                                                                               :func:`global_clip_scale`)
1. scale, clipvalue          ``UpdateSpan`` in ``kernels/multi_momentum.cc``   test_optimizer_numerics,
                             (``grouped``, ``grouped_graph``)                  test_grouped
2. decay                     ``ResourceApplyGradientDescent(alpha=lr * wd,     test_optimizer_numerics,
                             delta=w)`` (``fused``, ``per_shard``);            test_keras_equality
                             ``UpdateSpan`` (``w - w * (wd * lr)``)
3. update                    ``ResourceApplyKerasMomentum`` /                  test_optimizer_numerics,
                             ``ResourceApplyGradientDescent`` (``fused``,      test_keras_equality,
                             ``per_shard``); ``UpdateSpan``                    test_grouped (float32
                                                                               bit-equal to per_shard)
4. EMA                       ``UpdateSpan`` (``grouped``, ``grouped_graph``)   test_optimizer_numerics
===========================  ================================================  ==========================

Every implementation runs both grids of ``tests/test_optimizer_numerics.py`` (eagerly, and inside
``tf.function`` where it runs there: ``grouped`` as ``grouped_graph``) against
:mod:`dsgd.reference64`, within ``reference64.TOLERANCE``; sparse gradients in
``tests/test_sparse.py``; ``tests/test_keras_equality.py`` compares with tf_keras' own SGD.  The
fused forms and ``UpdateSpan`` round ``w - (wd * lr) * w``, where :func:`weight_decay` rounds
``w - (w * wd) * lr``: both within the float64 tolerance, not bit-equal to each other.
"""
from __future__ import annotations

import tensorflow as tf


def sum_of_squares(g: tf.Tensor) -> tf.Tensor:
    """``||g||^2``, summed in float32 (norm clipping's input)."""
    g = tf.cast(g, tf.float32)
    return tf.reduce_sum(g * g)


def clip_norm_scale(sumsq: tf.Tensor, clipnorm: float) -> tf.Tensor:
    """``clipnorm``'s coefficient of each gradient, ``clipnorm / max(||g||, clipnorm)``, from
    ``sumsq = ||g||^2`` (elementwise: a vector gives one coefficient per gradient; as
    ``tf.clip_by_norm``)."""
    return clipnorm / tf.maximum(tf.sqrt(sumsq), clipnorm)


def global_clip_scale(global_sumsq: tf.Tensor, clipnorm: float) -> tf.Tensor:
    """The one coefficient every gradient is scaled by (as tf.clip_by_global_norm)."""
    norm = tf.sqrt(global_sumsq)
    return clipnorm * tf.minimum(1.0 / norm, 1.0 / clipnorm)


def clip_by_value(g: tf.Tensor, clipvalue: float) -> tf.Tensor:
    return tf.clip_by_value(g, -clipvalue, clipvalue)


def gradient(g, scale, clipvalue, dtype: tf.DType):
    """Step 1 for one gradient, dense or ``tf.IndexedSlices`` (its values): times its norm-clip
    coefficient ``scale`` cast to ``dtype`` (None: no norm clipping), then clipped to
    ``[-clipvalue, clipvalue]`` (falsy: no value clipping).  Every implementation clips here
    (or in ``UpdateSpan``, the C++ kernel)."""
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(gradient(g.values, scale, clipvalue, dtype), g.indices, g.dense_shape)
    if scale is not None:
        g = g * tf.cast(scale, dtype)
    if clipvalue:
        g = clip_by_value(g, clipvalue)
    return g


def weight_decay(w: tf.Tensor, lr: tf.Tensor, wd: float) -> tf.Tensor:
    """Decoupled weight decay, applied before the update: ``w - w * wd * lr``."""
    # a Python float becomes a constant of w's dtype directly (no float32 rounding for float64)
    wd = tf.cast(wd, w.dtype) if tf.is_tensor(wd) else tf.constant(wd, w.dtype)
    return w - w * wd * lr


def sgd(w: tf.Tensor, g: tf.Tensor, lr: tf.Tensor) -> tf.Tensor:
    """Plain SGD: ``w - lr * g``."""
    return w - lr * g


def momentum(w: tf.Tensor, m: tf.Tensor, g: tf.Tensor, lr: tf.Tensor, mu: tf.Tensor,
             nesterov: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """Heavy-ball or Nesterov momentum; returns ``(w_new, m_new)``."""
    m_new = mu * m - lr * g
    w_new = w + (mu * m_new - lr * g if nesterov else m_new)
    return w_new, m_new


def ema(avg: tf.Tensor, w: tf.Tensor, ema_momentum: float) -> tf.Tensor:
    """``ema_momentum * avg + (1 - ema_momentum) * w``."""
    return ema_momentum * avg + (1.0 - ema_momentum) * w


def ema_overwrite_due(iterations_before: int, frequency: int | None) -> bool:
    """tf_keras' rule: overwrite when ``(iterations + 1) % frequency == 0`` (pre-increment)."""
    return bool(frequency) and (iterations_before + 1) % frequency == 0
