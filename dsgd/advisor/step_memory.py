"""Memory per device of a plan's training step: parameters, gradients and optimizer slots exactly (from the
layouts: DTensor shards evenly), activations estimated from the layers' outputs and their layouts.

Activations are what the backward pass keeps: each layer's output for the device's share of the batch
(the global batch over the ``batch`` axis), split over ``model`` where the plan shards the layer's output
dimension -- the first Dense of a sharded pair (its output is column-sharded), and attention's per-head
tensors (queries, keys, values, the scores and their softmax, the per-head context) when it is sharded by
heads.  TensorFlow's allocator peak over a step (all devices share one on CPU) is the check, where it is
reported: it also holds the gradients and the step's temporaries, so the estimate compared with it is
activations + gradients (:func:`check_ratio`).
"""
from __future__ import annotations

import math
from typing import Optional

from dsgd import meshspec
from dsgd.advisor.model_graph import ModelGraph
from dsgd.advisor.step_plans import DATA_AXIS, MODEL_AXIS, StepPlan

U = meshspec.UNSHARDED
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def state_bytes(graph: ModelGraph, plan: StepPlan, opts: dict) -> dict:
    """Exact bytes per device: ``params``, ``grads`` (in the variables' layouts: dsgd takes them so),
    ``slots`` (momentum, EMA: each in its variable's layout)."""
    from dsgd.harness.measure import count_bytes
    from dsgd.workloads import VarSpec

    specs = [VarSpec(v.path, tuple(v.shape), v.dtype) for v in graph.variables()]
    b = count_bytes(specs, [plan.layout_of(s.name) for s in specs], list(plan.mesh), opts)
    return {"params": b.params_per_device, "grads": b.params_per_device,
            "slots": b.momentum_per_device + b.ema_per_device}


def _prod(shape) -> int:
    return math.prod(d or 1 for d in shape)


def activation_bytes(graph: ModelGraph, plan: StepPlan, batch: int) -> int:
    """Estimated bytes of the activations one device keeps for the backward pass (see the module doc)."""
    sizes = dict(plan.mesh)
    b_local = batch / sizes.get(DATA_AXIS, 1)
    m = sizes.get(MODEL_AXIS, 1)
    sharded = set(plan.sharded())
    total = 0.0
    for ly in graph.layers:
        if not ly.output_shape:
            continue
        per_example = _prod(ly.output_shape[1:])
        item = 4
        split = 1
        k = ly.var("kernel")
        if ly.cls == "Dense" and k is not None and k.path in sharded and plan.layout_of(k.path)[-1] == MODEL_AXIS:
            split = m  # column-sharded: its output is split over model
        total += per_example * b_local * item / split
        if ly.cls == "MultiHeadAttention":
            heads = int(ly.config.get("num_heads") or 1)
            kd = int(ly.config.get("key_dim") or 1)
            vd = int(ly.config.get("value_dim") or kd)
            q_shape = ly.input_shapes[0] if ly.input_shapes else ly.output_shape
            seq = _prod(q_shape[1:-1]) if q_shape and len(q_shape) > 2 else 1
            kv_shape = ly.input_shapes[1] if len(ly.input_shapes) > 1 else q_shape
            seq_kv = _prod(kv_shape[1:-1]) if kv_shape and len(kv_shape) > 2 else seq
            q = ly.var("_query_dense.kernel")
            split_h = m if q is not None and q.path in sharded else 1
            per_head = seq * kd + seq_kv * kd + seq_kv * vd + 2 * seq * seq_kv + seq * vd
            total += per_head * heads * b_local * item / split_h
    return int(total)


def check_ratio(estimate: Optional[float], measured: Optional[float]) -> Optional[float]:
    """``estimate / measured`` (None when either is missing)."""
    if not estimate or not measured:
        return None
    return estimate / measured


__all__ = ["state_bytes", "activation_bytes", "check_ratio"]
