#!/usr/bin/env python3
"""The eager floor of one optimizer step on a DTensor mesh: what any local-shard update pays.

An eager step on DTensor gradients must get each gradient's per-device components to a
kernel on its device, and stream the bytes.  Through TensorFlow's Python API that is
``dtensor.unpack`` of every gradient (``unpack_ms``) and one op input per component
(``inputs_ms``: every component passed to one ``IdentityN`` per device, an op that does no
work).  dsgd's C++ dispatch (``dsgd/kernels/dispatch.cc``) borrows the components DTensor
already holds and gives the kernels their addresses instead (``direct_ms``: reading them
all).  The bytes are the case's traffic over the copy bandwidth measured in the same run
(``stream_ms``).  ``floor_ms`` is the cheaper feed plus the stream; next to it the ``dsgd``
step (``--implementation``, default ``auto``) and, unless ``--no-reference``, the tf_keras
reference, so the best speed-up any eager implementation could reach is ``reference /
floor``.

Usage::

    python scripts/eager_floor.py --workload many-small --mesh batch=8 --layout replicated
    python scripts/eager_floor.py --workload many-small --mesh 1 --mesh batch=8 --mesh batch=2,model=4

Each case runs in a worker process with 8 logical CPU devices (as ``dsgd bench``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import numpy as np


def _time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms (DTensor's async work waited for each time)."""
    from dsgd.harness import measure

    return float(np.median(measure.time_steps(fn, steps=repeats, warmup=1)) * 1e3)


def run_case(payload: dict) -> dict:
    import tensorflow as tf

    from dsgd import eager_dtensor
    from dsgd.harness import bench_run, measure

    repeats = int(payload.pop("repeats"))
    reference = bool(payload.pop("reference"))
    case = measure.Case(**payload)
    built = measure.build_case(case)
    grads = built.grads
    row = asdict(case)

    unpack_ms = _time(lambda: eager_dtensor.components_many(grads), repeats)
    parts = eager_dtensor.components_many(grads)
    per_device = list(zip(*parts))
    devices = [p.device for p in parts[0]]

    def pass_inputs():
        for dev, comps in zip(devices, per_device):
            with tf.device(dev):
                tf.raw_ops.IdentityN(input=list(comps))

    inputs_ms = _time(pass_inputs, repeats)
    feed_ms = unpack_ms + inputs_ms
    direct = eager_dtensor.direct(built.mesh)
    if direct is not None:
        row["direct_ms"] = _time(lambda: direct.components(grads, devices), repeats)
        feed_ms = min(feed_ms, row["direct_ms"])
    b = measure.bytes_for_case(built)
    gbps = bench_run.copy_gbps()
    stream_ms = b.step_traffic_total / (gbps * 1e9) * 1e3
    step_ms = _time(built.step, repeats)  # its untimed warm-up is the first step (build, trace)
    row.update(tensors=len(grads), devices=len(devices), unpack_ms=unpack_ms, inputs_ms=inputs_ms,
               stream_ms=stream_ms, floor_ms=feed_ms + stream_ms, step_ms=step_ms,
               impl_used=measure.resolved_implementations(built.optimizer), copy_gbps=gbps)
    if reference:
        ref = measure.build_case(measure.Case(**dict(payload, implementation=measure.REFERENCE)))
        row["reference_ms"] = _time(ref.step, repeats)
        row["max_speedup"] = row["reference_ms"] / row["floor_ms"]
        row["speedup"] = row["reference_ms"] / step_ms
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", action="append", help="default: many-small")
    p.add_argument("--mesh", action="append", help="default: 1, batch=8, batch=2,model=4")
    p.add_argument("--layout", action="append", help="default: sharded, replicated")
    p.add_argument("--options", default="momentum")
    p.add_argument("--implementation", default="auto")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-reference", action="store_true", help="skip the tf_keras reference (its first step is slow)")
    args = p.parse_args(argv)

    import pandas as pd

    from dsgd.harness.isolate import run_isolated

    payloads = []
    for w in args.workload or ["many-small"]:
        for m in args.mesh or ["1", "batch=8", "batch=2,model=4"]:
            for lay in args.layout or ["sharded", "replicated"]:
                payloads.append(dict(workload=w, mesh=m, layout=lay, options=args.options,
                                     implementation=args.implementation, repeats=args.repeats,
                                     reference=not args.no_reference))
    rows: list[dict] = []

    def got(i, res):
        row = dict(payloads[i])
        row.update(res)
        rows.append(row)

    run_isolated("scripts.eager_floor:run_case", payloads, devices=8, on_result=got)  # the repository root is on the path
    df = pd.DataFrame(rows)
    cols = [c for c in ("workload", "mesh", "layout", "options", "tensors", "unpack_ms", "inputs_ms", "direct_ms", "stream_ms",
                        "floor_ms", "step_ms", "reference_ms", "speedup", "max_speedup", "impl_used", "error")
            if c in df]
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 2):
        print(df[cols].to_string(index=False))
    print(f"\nfloor = the cheaper feed (unpack + inputs: dtensor.unpack of every gradient, every component an op "
          f"input; or direct: dsgd's C++ dispatch reading every component) + stream (traffic over "
          f"{rows[0].get('copy_gbps', float('nan')):.1f} GB/s copy bandwidth)")
    return 0 if "error" not in df or df["error"].isna().all() else 1


if __name__ == "__main__":
    sys.exit(main())
