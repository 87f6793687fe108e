"""Step time: one optimizer step (built, traced and stepped once in ``setup``; timed alone).

Two slices through the grid (see :mod:`benchmarks.common`): mesh x layout (x device), and
dtype / xla / options one at a time on the baseline mesh and layout; every implementation
(tf_keras' reference and each dsgd path) in both.
"""
from . import common
from .common import BASE, DEVICES, DTYPES, IMPLEMENTATIONS, LAYOUTS, MESHES, OPTIONS, XLA


class _StepBase:
    param_names = common.PARAM_NAMES
    timeout = 300
    # Each sample is a handful of steps; asv interleaves rounds (processes) for its statistics.
    number = 3
    repeat = (3, 10, 10.0)

    def setup(self, *params):
        common.check(*params)
        self.built = common.built(*params)

    def time_step(self, *params):
        """One optimizer step, DTensor's asynchronous work included."""
        self.built.step()
        common.measure.sync()


class TimeStepMeshLayout(_StepBase):
    """Mesh x layout policy (x device), float32, xla off, plain momentum."""

    params = [MESHES, list(LAYOUTS), [BASE["dtype"]], DEVICES, [BASE["xla"]], IMPLEMENTATIONS, [BASE["options"]]]


class TimeStepVariants(_StepBase):
    """dtype, XLA and the full option set (weight decay + global_clipnorm + EMA), each against
    the baseline (batch=2,model=4, sharded, float32, xla off, momentum)."""

    params = [[BASE["mesh"]], [BASE["layout"]], DTYPES, [BASE["device"]], XLA, IMPLEMENTATIONS, OPTIONS]
