"""Step time: one optimizer step, timed alone (the case is built, traced and stepped once in
``setup``; asv re-runs ``setup`` before each sample and gets the same built case back).

Slices through the grid (see :mod:`benchmarks.common`): mesh x layout; dtype, XLA and the
option set one at a time on the baseline mesh and layout; and GPU where one is visible —
every implementation (tf_keras' reference and each dsgd path) in each.
"""
from . import common
from .common import BASE, DTYPES, IMPLEMENTATIONS, LAYOUTS, MESHES, MODES, NO_UPDATE, OPTIONS, REFERENCE, XLA


class _StepBase:
    param_names = common.PARAM_NAMES
    timeout = 300
    # A sample is three steps, each timed alone (asv re-runs setup between them: free here);
    # asv's rounds (--interleave-rounds) add samples from fresh processes.
    number = 3
    repeat = (3, 10, 10.0)
    only_off_baseline = False

    def setup(self, *params):
        common.check(*params, only_off_baseline=self.only_off_baseline)
        self.built = common.built(*params)

    def time_step(self, *params):
        """One optimizer step, DTensor's asynchronous work included."""
        self.built.step()
        common.measure.sync()


class TimeStepMeshLayout(_StepBase):
    """Mesh x layout policy on CPU, float32, xla off, plain momentum."""

    params = [MESHES, list(LAYOUTS), [BASE["dtype"]], [BASE["device"]], [BASE["xla"]], IMPLEMENTATIONS,
              [BASE["options"]]]


class TimeStepVariants(_StepBase):
    """dtype, XLA and the full option set (weight decay + global_clipnorm + EMA), each against
    the baseline (batch=2,model=4, sharded, float32, xla off, momentum), which
    TimeStepMeshLayout measures."""

    params = [[BASE["mesh"]], [BASE["layout"]], DTYPES, [BASE["device"]], XLA, IMPLEMENTATIONS, OPTIONS]
    only_off_baseline = True


class TimeStepGPU(_StepBase):
    """The meshes that fit the visible GPUs (skipped where there is none).  Run GPU suites with
    ``--launch-method spawn``: CUDA cannot be used in a process forked after its start."""

    params = [["1", BASE["mesh"]], ["replicated", BASE["layout"]], [BASE["dtype"]], ["GPU"], [BASE["xla"]],
              IMPLEMENTATIONS, [BASE["options"]]]


class TimeStepModes(_StepBase):
    """The step where users run it, on the baseline configuration: ``apply_gradients`` eagerly and
    inside a ``tf.function`` (the workload), a whole custom ``tf.function`` training step and a
    ``model.fit`` step (the residual MLP of ``dsgd.harness.models``), with the ``no-update`` floor (the same
    function applying nothing; in ``graph`` it takes the same gradients and variables).  tf_keras' reference, ``auto`` and ``fused`` (the DTensor path)."""

    param_names = common.PARAM_NAMES + ["mode"]
    params = [[BASE["mesh"]], [BASE["layout"]], [BASE["dtype"]], [BASE["device"]], [BASE["xla"]],
              [REFERENCE, "auto", "fused", NO_UPDATE], [BASE["options"]], MODES]

    def setup(self, *params):
        reason = common.mode_skip_reason(*params)
        if reason:
            raise NotImplementedError(reason)
        self.built = common.built(*params)
