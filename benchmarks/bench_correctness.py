"""Correctness beside speed: max relative error against a float64 reference after three
steps with fresh random gradients (``dsgd.harness.measure.float64_error``), so a commit that is fast
but wrong shows up on the same dashboard.  Lower is better; inf means a NaN appeared."""
from . import common
from .common import BASE, DTYPES, IMPLEMENTATIONS, OPTIONS


class Float64Error:
    param_names = common.PARAM_NAMES
    params = [[BASE["mesh"]], [BASE["layout"]], DTYPES, [BASE["device"]], [BASE["xla"]], IMPLEMENTATIONS, OPTIONS]
    timeout = 300
    rounds = 1  # deterministic (fixed seeds): one value per run

    def setup(self, *params):
        common.check(*params)

    def track_max_rel_error(self, *params):
        return common.measure.float64_error(common.case(*params), steps=3)

    track_max_rel_error.unit = "relative error"
