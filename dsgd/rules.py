"""The SGD update rules, written once, next to the documented math.

Each function maps tensors to tensors and works the same on DTensors (where DTensor
inserts the collectives) and on one device's local shards.  Implementations differ in
*how* they execute these rules (one op per variable, one fused kernel per device, XLA),
never in *what* the rule is; their tests compare them with :mod:`dsgd.reference64`.

Order of one step (the tf_keras order):
  1. clip:   ``g = clip(g)``                      (clipnorm | global_clipnorm | clipvalue)
  2. decay:  ``w = w - w * wd * lr``               (variables not excluded)
  3. update: momentum = 0:  ``w = w - lr * g``
             momentum > 0:  ``m = momentum * m - lr * g``;  ``w = w + m``
             nesterov:      ``m = momentum * m - lr * g``;  ``w = w + momentum * m - lr * g``
  4. EMA:    ``avg = ema_momentum * avg + (1 - ema_momentum) * w``;
             every ``ema_overwrite_frequency`` iterations ``w = avg``.
"""
from __future__ import annotations

import tensorflow as tf


def clip_by_norm(g: tf.Tensor, sumsq: tf.Tensor, clipnorm: float) -> tf.Tensor:
    """``g * clipnorm / max(||g||, clipnorm)`` given ``sumsq = ||g||^2`` (as tf.clip_by_norm)."""
    norm = tf.sqrt(tf.maximum(sumsq, 0.0))
    return g * tf.cast(clipnorm / tf.maximum(norm, clipnorm), g.dtype)


def global_clip_scale(global_sumsq: tf.Tensor, clipnorm: float) -> tf.Tensor:
    """The one coefficient every gradient is scaled by (as tf.clip_by_global_norm)."""
    norm = tf.sqrt(global_sumsq)
    return clipnorm * tf.minimum(1.0 / norm, 1.0 / clipnorm)


def clip_by_value(g: tf.Tensor, clipvalue: float) -> tf.Tensor:
    return tf.clip_by_value(g, -clipvalue, clipvalue)


def scale_and_clip(g, scale, clipvalue, dtype: tf.DType):
    """Step 1 for one gradient, dense or ``tf.IndexedSlices`` (its values): times its norm-clip
    coefficient ``scale`` cast to ``dtype`` (None: no norm clipping), then clipped to
    ``[-clipvalue, clipvalue]`` (falsy: no value clipping).  Every implementation clips here."""
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(scale_and_clip(g.values, scale, clipvalue, dtype), g.indices, g.dense_shape)
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
