"""Peak memory (the process's max RSS, as asv's ``peakmem_`` measures it) of building a case
(variables, gradients, optimizer and its slots) and of building and stepping it, for every
implementation with plain momentum and with the full option set (EMA adds a slot).

The process is forked from asv's server after TensorFlow's import, so every value includes
the same import baseline: compare values across commits, not with the case's byte count.
"""
from . import common
from .common import BASE, IMPLEMENTATIONS, OPTIONS


class PeakMemory:
    param_names = common.PARAM_NAMES
    params = [[BASE["mesh"]], [BASE["layout"]], [BASE["dtype"]], [BASE["device"]], [BASE["xla"]],
              IMPLEMENTATIONS, OPTIONS]
    timeout = 300

    def setup(self, *params):
        common.check(*params)

    def peakmem_build(self, *params):
        """Variables, gradients and the optimizer, slots created by ``optimizer.build``."""
        b = common.built(*params, warm=False)
        b.optimizer.build(b.variables)

    def peakmem_step(self, *params):
        """Build, then the first step (trace) and ten more."""
        b = common.built(*params)
        for _ in range(10):
            b.step()
        common.measure.sync()
