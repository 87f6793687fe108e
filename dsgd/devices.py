"""Logical devices: split the host CPU (or use the GPUs) before TensorFlow first touches them.

TensorFlow fixes its logical devices when its context is first initialized, so every
entry point that needs N devices (CLI, benchmarks, tests, subprocesses) calls
:func:`configure_devices` first, once, in one place.
"""
from __future__ import annotations

import os

_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3"}


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ start-up chatter unless the user asked for it."""
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)


def configure_devices(num_devices: int = 8, device_type: str = "CPU") -> int:
    """Make ``num_devices`` logical devices of ``device_type`` visible; return the count.

    On CPU the one physical CPU is split into ``num_devices`` logical devices.  On GPU the
    physical GPUs are used as they are (``num_devices`` must not exceed their count).
    Calling it again with the same request is a no-op; a different request after
    TensorFlow has started raises ``RuntimeError`` naming both.
    """
    quiet_tensorflow()
    import tensorflow as tf

    device_type = device_type.upper()
    if device_type not in ("CPU", "GPU"):
        raise ValueError(f"device_type must be 'CPU' or 'GPU', got {device_type!r}")
    if int(num_devices) < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    num_devices = int(num_devices)
    physical = tf.config.list_physical_devices(device_type)
    if not physical:
        raise RuntimeError(f"no {device_type} device is visible to TensorFlow")
    if device_type == "GPU":
        if num_devices > len(physical):
            raise ValueError(f"num_devices={num_devices} but only {len(physical)} GPU(s) are visible")
        return num_devices
    try:
        tf.config.set_logical_device_configuration(
            physical[0], [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != num_devices:
            raise RuntimeError(
                f"TensorFlow already started with {have} logical CPU devices; "
                f"{num_devices} were asked for. Configure devices before any TensorFlow op runs "
                "(run in a fresh process, e.g. via dsgd.harness.isolate)."
            ) from None
    return num_devices

