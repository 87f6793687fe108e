"""dsgd: a tuned, mesh-aware SGD optimizer for TensorFlow DTensor.

>>> import dsgd
>>> opt = dsgd.SGD(learning_rate=0.1, momentum=0.9, mesh=mesh)

The optimizer is imported lazily, so the pure-Python helpers (``dsgd.meshspec``,
``dsgd.workloads``) can be used without starting TensorFlow (e.g. by the JAX comparison).  Importing dsgd leaves
``os.environ`` alone: the command-line entry points (``dsgd``, ``python -m dsgd.multiclient``,
the isolated workers) quiet TensorFlow's C++ logging themselves (:func:`dsgd.devices.quiet_tensorflow`).
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["SGD", "GradientsClipOption", "EMAOption", "__version__"]


def __getattr__(name: str):
    if name == "SGD":
        from dsgd.optimizer import SGD

        return SGD
    if name in ("GradientsClipOption", "EMAOption"):
        from dsgd import options

        return getattr(options, name)
    raise AttributeError(f"module 'dsgd' has no attribute {name!r}")
