"""The floor of a whole step's optimizer share (``dsgd.harness.models.no_update_optimizer``) does the
work every correct optimizer needs and nothing more.

Checked on what the devices ran, not on timings (a timed unit test would be noise on these VMs;
``dsgd bench`` reports the floor beside every real optimizer's step): under a profiler, the floor's
step runs exactly the forward pass, backward pass and gradient collectives that dsgd's and tf_keras'
steps run -- the same op types, as many times per step -- and nothing of an update.  A floor that keeps
its gradients alive by control dependencies fails this: DTensor drops control edges and prunes the
weight gradients (fewer MatMuls, no BiasAddGrad), and "measured" a step without them.
"""
from __future__ import annotations

import json

from _helpers import check_subprocess, require_impl, run_subprocess

# ops of the forward/backward pass and of the gradient reductions (DTensor's combined all-reduce packs
# its buffers with TensorStridedSliceUpdate and unpacks them with Slice)
WORK = ("MatMul", "_MklMatMul", "_MklNativeFusedMatMul", "BiasAdd", "BiasAddGrad", "Relu", "ReluGrad",
        "CollectiveReduceV2", "TensorStridedSliceUpdate", "Slice", "SparseSoftmaxCrossEntropyWithLogits")

_PROFILE = """
    import json, shutil, tempfile
    import tensorflow as tf, tf_keras
    from tensorflow.python.eager import context
    from dsgd.harness import measure, models, profile_summary as ps
    from tf_keras.src.optimizers import optimizer as keras_optimizer

    class ControlDependencyFloor(keras_optimizer.Optimizer):
        # the floor this file guards against: gradients kept alive by control dependencies only
        def __init__(self, mesh):
            super().__init__(name="CD", mesh=mesh)
        def build(self, var_list):
            super().build(var_list); self._built = True
        def apply_gradients(self, gv, name=None, skip_gradients_aggregation=False, **kw):
            gv = [(g, v) for g, v in gv if g is not None]
            with tf.control_dependencies([dtensor.relayout(g, v.layout) for g, v in gv]):
                return self.iterations.assign_add(1)

    out = {}
    for impl in ("no-update", "auto", "reference", "control-dependency"):
        case = measure.Case(workload="mlp-small", mesh="batch=2,model=4", mode="fit",
                            implementation="no-update" if impl == "control-dependency" else impl)
        if impl == "control-dependency":
            spec = models.get_model_spec(case.workload)
            mesh = meshspec.make_mesh(case.mesh)
            step = models.build_training_step(spec, mesh, ControlDependencyFloor(mesh), "fit").step
        else:
            step = measure.build_case(case).step
        for _ in range(2):
            step()
        context.async_wait()
        d = tempfile.mkdtemp()
        tf.profiler.experimental.start(d)
        for i in range(2):
            with tf.profiler.experimental.Trace("train", step_num=i, _r=1):
                step(); context.async_wait()
        tf.profiler.experimental.stop()
        out[impl] = {r["type"]: r["per_step"] for r in ps.op_type_rows(ps.find_xplanes(d), 2)}
        shutil.rmtree(d)
    print("COUNTS", json.dumps(out))
"""


def test_the_floor_runs_every_optimizers_work_and_nothing_else():
    require_impl("grouped")
    out = check_subprocess(run_subprocess(_PROFILE, timeout=400))
    counts = json.loads(out.split("COUNTS", 1)[1])
    floor, ours, ref, cd = (counts[k] for k in ("no-update", "auto", "reference", "control-dependency"))
    work = {t: floor.get(t, 0) for t in WORK if floor.get(t, 0) or ours.get(t, 0) or ref.get(t, 0)}
    assert work.get("BiasAddGrad") and work.get("CollectiveReduceV2"), floor  # a backward pass and its reductions
    for name, other in (("dsgd", ours), ("tf_keras", ref)):
        assert {t: other.get(t, 0) for t in work} == work, (name, other, floor)
    # nothing of an update in the floor: dsgd's update is one DsgdSgdStep, tf_keras' hundreds of small ops
    assert ours.get("DsgdSgdStep") == 1 and "DsgdSgdStep" not in floor
    assert ref.get("Mul", 0) > floor.get("Mul", 0) + 10 and ref.get("AssignVariableOp", 0) > floor.get("AssignVariableOp", 0)
    # the control-dependency "floor" skips the weight gradients: this check tells them apart
    assert cd.get("BiasAddGrad", 0) == 0 and sum(cd.get(t, 0) for t in WORK) < sum(work.values())
