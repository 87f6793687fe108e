"""Peak memory (the process's max RSS, as asv's ``peakmem_`` measures it) of building a case
(variables, gradients, optimizer and its slots) and of building and stepping it, with plain
momentum and with the full option set (EMA adds a slot).
The process is forked from asv's server after TensorFlow's import, so every value includes
the same import baseline: compare values across commits, not with the case's byte count.
"""
from . import common
from .common import BASE, IMPLEMENTATIONS, OPTIONS, REFERENCE


def _baseline_params(implementations) -> list:
    return [[BASE["mesh"]], [BASE["layout"]], [BASE["dtype"]], [BASE["device"]], [BASE["xla"]],
            list(implementations), OPTIONS]


class _MemoryBase:
    param_names = common.PARAM_NAMES
    timeout = 300

    def setup(self, *params):
        common.check(*params)


class PeakMemory(_MemoryBase):
    """Build, then the first step (trace, kernels, XLA programs) and ten more: every implementation."""

    params = _baseline_params(IMPLEMENTATIONS)

    def peakmem_step(self, *params):
        b = common.built(*params)
        for _ in range(10):
            b.step()
        common.measure.sync()


class PeakMemoryBuild(_MemoryBase):
    """Variables, gradients and the optimizer, slots created by ``optimizer.build``.

    Only the implementations whose build differs: tf_keras' reference, ``fused`` standing for
    every dsgd path that keeps its slots in the variable's layout (their builds are the same;
    kernels and XLA programs appear at the first step, which ``PeakMemory`` measures), and
    ``sharded_state``, whose slots are sharded further (ZeRO-1).
    """

    params = _baseline_params(i for i in IMPLEMENTATIONS if i in (REFERENCE, "fused", "sharded_state"))

    def peakmem_build(self, *params):
        b = common.built(*params, warm=False)
        b.optimizer.build(b.variables)
