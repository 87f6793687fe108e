"""Memory per device of a plan's training step.

* Parameters, gradients and optimizer slots: exact, from the layouts (DTensor shards evenly), checked
  against what the devices hold.
* The step's transient memory -- activations kept for the backward pass, gradients as they are made,
  temporaries, the buffers DTensor merges all-reduces into: estimated from the program DTensor ran, each
  op's output in its layout alive from its op to its last use, the ops in the order TensorFlow's executor
  runs them (each once its operands are ready), inputs forwarded and slices taken as views where
  TensorFlow's kernels do (:func:`dsgd.advisor.dtensor_program.liveness`).  Checked here against
  TensorFlow's allocator, whose peak over one step (all logical CPU devices share one allocator) divided
  by the devices approximates it (:func:`check_ratio`; the devices need not peak together), and by
  ``scripts/per_device_memory.py`` against each device's own allocator in one client per device.  On
  another mesh it is scaled from the tensors alive at the peak.
"""
from __future__ import annotations

from typing import Optional

from dsgd.advisor.model_graph import ModelGraph
from dsgd.advisor.step_plans import StepPlan


def state_bytes(graph: ModelGraph, plan: StepPlan, opts: dict) -> dict:
    """Exact bytes per device: ``params``, ``grads`` (in the variables' layouts: dsgd takes them so),
    ``slots`` (momentum, EMA: each in its variable's layout; the momentum in its ZeRO-1 layout for a plan
    trained with ``sharded_state``)."""
    from dsgd.harness.measure import count_bytes
    from dsgd.workloads import VarSpec

    specs = [VarSpec(v.path, tuple(v.shape), v.dtype) for v in graph.variables()]
    b = count_bytes(specs, [plan.layout_of(s.name) for s in specs], list(plan.mesh), opts,
                    zero1=plan.implementation == "sharded_state")
    return {"params": b.params_per_device, "grads": b.params_per_device,
            "slots": b.momentum_per_device + b.ema_per_device}


def check_ratio(estimate: Optional[float], measured: Optional[float]) -> Optional[float]:
    """``estimate / measured`` (None when either is missing)."""
    if not estimate or not measured:
        return None
    return estimate / measured


__all__ = ["state_bytes", "check_ratio"]
