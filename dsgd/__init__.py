"""dsgd: a tuned, mesh-aware SGD optimizer for TensorFlow DTensor.

>>> import dsgd
>>> opt = dsgd.SGD(learning_rate=0.1, momentum=0.9, mesh=mesh)
"""
from dsgd.devices import quiet_tensorflow as _quiet

_quiet()

from dsgd.options import EMAOption, GradientsClipOption  # noqa: E402
from dsgd.optimizer import SGD  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SGD", "GradientsClipOption", "EMAOption", "__version__"]
