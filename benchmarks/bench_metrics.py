"""Tracked numbers beside the step time, for the mesh x layout slice:

* ``track_achieved_gbps`` — the ideal bytes of one step / the median step time;
* ``track_roofline_fraction`` — (ideal bytes / copy bandwidth) / median step time, the copy
  bandwidth measured in the same process (1.0 is the memory roofline);
* ``track_state_bytes_per_device`` — optimizer state (momentum, EMA) on each device, read
  from the optimizer's own variables and layouts;
* ``track_first_step_seconds`` — trace + compile + one step of a fresh optimizer.

All four come from one measurement per parameter set, made once per run in ``setup_cache``
(in ``dsgd.harness.isolate`` workers: one TensorFlow start for the whole slice).
"""
import itertools

from . import common
from .common import BASE, IMPLEMENTATIONS, LAYOUTS, MESHES


class StepMetrics:
    param_names = common.PARAM_NAMES
    params = [MESHES, list(LAYOUTS), [BASE["dtype"]], [BASE["device"]], [BASE["xla"]], IMPLEMENTATIONS,
              [BASE["options"]]]
    timeout = 120
    rounds = 1  # one measurement per run; the numbers are medians already

    def setup_cache(self):
        kept = [p for p in itertools.product(*self.params) if not common.skip_reason(*p)]
        return common.metrics_for(kept)

    setup_cache.timeout = 1200  # every kept set, one after another (~3 s of CPU each)

    def setup(self, cache, *params):
        common.check(*params)
        common.result_of(cache, params)

    def track_achieved_gbps(self, cache, *params):
        return common.result_of(cache, params)["achieved_gbps"]

    track_achieved_gbps.unit = "GB/s"

    def track_roofline_fraction(self, cache, *params):
        return common.result_of(cache, params)["roofline_fraction"]

    track_roofline_fraction.unit = "fraction of roofline"

    def track_state_bytes_per_device(self, cache, *params):
        return common.result_of(cache, params)["state_bytes_per_device"]

    track_state_bytes_per_device.unit = "bytes"

    def track_first_step_seconds(self, cache, *params):
        return common.result_of(cache, params)["first_step_s"]

    track_first_step_seconds.unit = "seconds"
