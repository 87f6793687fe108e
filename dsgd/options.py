"""Hyperparameter containers and the validation of every constructor argument.

``GradientsClipOption`` and ``EMAOption`` are the older (TF 2.9/2.10 DTensor optimizer)
way of passing clipping and EMA settings; :class:`dsgd.SGD` accepts them and the newer
flat keywords alike.  The constructor runs every check here before any TensorFlow state
is created (a callable learning rate's values are checked again when it is called).  Only
the checks that take tensors import TensorFlow, so the containers work without it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class GradientsClipOption:
    """Gradient clipping settings (older API form).

    Args:
      clipnorm: clip each gradient to this L2 norm.
      clipvalue: clip each gradient element to ``[-clipvalue, clipvalue]``.
      global_clipnorm: clip all gradients together to this global L2 norm.
    """

    clipnorm: Optional[float] = None
    clipvalue: Optional[float] = None
    global_clipnorm: Optional[float] = None

    def get_config(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EMAOption:
    """Exponential-moving-average settings (older API form).

    Args:
      use_ema: keep an EMA of the model weights.
      ema_momentum: ``new_avg = ema_momentum * avg + (1 - ema_momentum) * var``.
      ema_overwrite_frequency: every this many iterations overwrite the variables with
        their averages (``None``: only at :meth:`SGD.finalize_variable_values`).
    """

    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: Optional[int] = None

    def get_config(self) -> dict:
        return asdict(self)


_ACCEPTED_KWARGS = ("lr", "is_legacy_optimizer")
# tf_keras' new optimizer refuses these with a ValueError saying they are deprecated
_LEGACY_KWARGS = ("decay", "gradient_aggregator", "gradient_transformers")
ALLOWED_ARGS = (
    "learning_rate (or lr), momentum, nesterov, amsgrad, gradients_clip_option, ema_option, jit_compile, name, "
    "mesh, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency, "
    "implementation, momentum_dtype")


def check_extra_kwargs(kwargs: dict) -> None:
    """The constructor's ``**kwargs``: only ``lr`` and ``is_legacy_optimizer``; tf_keras'
    deprecated ones are refused with its ValueError and text, plus what is allowed."""
    for k in kwargs:
        if k in _LEGACY_KWARGS:
            raise ValueError(
                f"{k} is deprecated in the new TF-Keras optimizer, please check the docstring for valid "
                "arguments, or use the legacy optimizer, e.g., tf.keras.optimizers.legacy.SGD. "
                f"dsgd.SGD's allowed arguments are {ALLOWED_ARGS}")
    unknown = [k for k in kwargs if k not in _ACCEPTED_KWARGS]
    if unknown:
        raise TypeError(f"SGD got unexpected keyword argument(s) {unknown}; allowed arguments are {ALLOWED_ARGS}")


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_nonneg_finite(name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (or None), got {value!r}")


def check_unit_interval(name: str, value: Any) -> None:
    if _is_number(value) and 0.0 <= float(value) <= 1.0:
        return
    # "must be between [0, 1]" is tf_keras' wording, which users and tests match on
    raise ValueError(f"`{name}` must be between [0, 1] (a number from 0 to 1, both included), got {value!r}")


def check_learning_rate_value(value: Any) -> None:
    """Checks a concrete (float or eager tensor) learning rate."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            "`learning_rate` must be a float, a scalar tensor, a zero-argument callable or a "
            f"LearningRateSchedule, got {value!r}"
        ) from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"`learning_rate` must be finite and >= 0, got {v!r}")


def check_learning_rate(learning_rate: Any) -> None:
    """Checks any ``learning_rate`` the optimizer accepts: a schedule or a callable passes (a
    callable's values are checked when it is called), a variable or eager tensor must be a
    valid scalar, a tensor being traced passes."""
    # imported here: the option containers above are usable without TensorFlow
    import tensorflow as tf
    from tf_keras.src.optimizers.schedules.learning_rate_schedule import LearningRateSchedule

    from dsgd.state import to_numpy

    if isinstance(learning_rate, LearningRateSchedule) or (
            callable(learning_rate) and not isinstance(learning_rate, tf.Variable)):
        return
    if isinstance(learning_rate, tf.Variable):
        learning_rate = to_numpy(learning_rate)
    if tf.is_tensor(learning_rate):
        if not tf.executing_eagerly():
            return
        if learning_rate.shape.rank not in (0, None):
            raise ValueError(f"`learning_rate` must be a scalar, got shape {learning_rate.shape}")
        learning_rate = to_numpy(learning_rate)
    if isinstance(learning_rate, numbers.Real) or hasattr(learning_rate, "dtype"):
        check_learning_rate_value(learning_rate)
        return
    raise ValueError("`learning_rate` must be a float, a scalar tensor, a zero-argument callable or a "
                     f"LearningRateSchedule, got {learning_rate!r}")


def constant_momentum(momentum: Any) -> Any:
    """A tensor or variable ``momentum`` as a float: its value eagerly, its constant value
    under a v1 ``tf.Graph()`` or while tracing (the step's rule is fixed when it is built)."""
    import tensorflow as tf  # only ever given a tensor or a variable

    from dsgd.state import to_numpy

    if isinstance(momentum, tf.Variable):
        return float(to_numpy(momentum)) if tf.executing_eagerly() else momentum
    value = tf.get_static_value(momentum)
    if value is None or getattr(value, "ndim", 0) != 0:
        # returned as is: check_unit_interval refuses it with the allowed values
        return momentum
    return float(value)


def merge_clip_options(clipnorm, clipvalue, global_clipnorm, option: Optional[GradientsClipOption]):
    if option is not None:
        if not isinstance(option, GradientsClipOption):
            raise TypeError(
                f"`gradients_clip_option` must be a dsgd.GradientsClipOption, got {type(option).__name__}"
            )
        if any(v is not None for v in (clipnorm, clipvalue, global_clipnorm)):
            raise ValueError(
                "give clipping either as `gradients_clip_option` or as `clipnorm`/`clipvalue`/"
                "`global_clipnorm`, not both"
            )
        clipnorm, clipvalue, global_clipnorm = option.clipnorm, option.clipvalue, option.global_clipnorm
    for n, v in (("clipnorm", clipnorm), ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm)):
        check_nonneg_finite(n, v)
    if clipnorm is not None and global_clipnorm is not None:
        raise ValueError(
            "At most one of `clipnorm` and `global_clipnorm` can be set. "
            f"Received: clipnorm={clipnorm}, global_clipnorm={global_clipnorm}."
        )
    return clipnorm, clipvalue, global_clipnorm


def merge_ema_options(use_ema, ema_momentum, ema_overwrite_frequency, option: Optional[EMAOption]):
    if option is not None:
        if not isinstance(option, EMAOption):
            raise TypeError(f"`ema_option` must be a dsgd.EMAOption, got {type(option).__name__}")
        if use_ema or ema_momentum != 0.99 or ema_overwrite_frequency is not None:
            raise ValueError(
                "give EMA settings either as `ema_option` or as `use_ema`/`ema_momentum`/"
                "`ema_overwrite_frequency`, not both"
            )
        use_ema, ema_momentum, ema_overwrite_frequency = (
            option.use_ema, option.ema_momentum, option.ema_overwrite_frequency)
    check_unit_interval("ema_momentum", ema_momentum)
    if ema_overwrite_frequency is not None and (
        not isinstance(ema_overwrite_frequency, numbers.Integral)
        or isinstance(ema_overwrite_frequency, bool)
        or ema_overwrite_frequency < 1
    ):
        raise ValueError(
            f"`ema_overwrite_frequency` must be an integer >= 1 or None, got {ema_overwrite_frequency!r}"
        )
    return bool(use_ema), float(ema_momentum), ema_overwrite_frequency
