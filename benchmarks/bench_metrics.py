"""Tracked numbers beside the step time: achieved bandwidth, the fraction of the memory
roofline (copy bandwidth measured in the same process), optimizer state bytes per device
(read from the optimizer's variables), and the first step's time (trace + compile)."""
from . import common
from .common import BASE, IMPLEMENTATIONS, LAYOUTS, MESHES


class StepMetrics:
    param_names = common.PARAM_NAMES
    params = [MESHES, list(LAYOUTS), [BASE["dtype"]], [BASE["device"]], [BASE["xla"]], IMPLEMENTATIONS,
              [BASE["options"]]]
    timeout = 300

    def setup(self, *params):
        common.check(*params)

    def track_achieved_gbps(self, *params):
        """Ideal bytes of one step / median step time."""
        return common.step_metrics(*params)["achieved_gbps"]

    track_achieved_gbps.unit = "GB/s"

    def track_roofline_fraction(self, *params):
        """(ideal bytes / copy bandwidth) / median step time: 1.0 is the memory roofline."""
        return common.step_metrics(*params)["roofline_fraction"]

    track_roofline_fraction.unit = "fraction"

    def track_state_bytes_per_device(self, *params):
        """Bytes of optimizer state on each device (momentum, EMA)."""
        b = common.built(*params, warm=False)
        b.optimizer.build(b.variables)
        return common.state_bytes_per_device(b.optimizer)

    track_state_bytes_per_device.unit = "bytes"

    def track_first_step_seconds(self, *params):
        """Trace + compile + one step of a fresh optimizer."""
        return common.built(*params).first_step_s

    track_first_step_seconds.unit = "seconds"
