#!/usr/bin/env python3
"""How fast dsgd's update kernel streams, apart from DTensor: GB/s of ``DsgdMultiSgd``
(SGD with momentum, 20 bytes per float32 parameter) on plain variables, three ways over the
same bytes, alternating rounds in one process:

* one variable, one call;
* the same parameters split over the 8 logical devices, one call per device in a row (what
  a per-device dispatch does; each call pays the thread pool's start-up and tail);
* eight variables on one device, one call.

Next to them the copy bandwidth ``dsgd bench`` uses for its roofline.  ``--ceiling`` adds
the same update in plain C++ with raw threads and no TensorFlow (``scripts/stream_ceiling.cc``:
a plain loop, prefetched as dsgd's kernels are, with non-temporal stores) and glibc's memcpy
over the same bytes: how fast this machine lets an in-place update stream at all.  Usage::

    python scripts/kernel_bandwidth.py [--params 33600000] [--rounds 12] [--ceiling]
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=33_600_000, help="float32 parameters in all (default 33.6M)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--ceiling", action="store_true", help="also the update in plain C++ (no TensorFlow) and memcpy")
    args = p.parse_args(argv)

    from dsgd import devices

    devices.quiet_tensorflow()
    devices.configure_devices(8)
    import numpy as np
    import tensorflow as tf

    from dsgd import kernels
    from dsgd.harness import measure

    ops = kernels.load()
    n, parts = args.params, 8
    lr, no_scales, no_mask = tf.constant(0.01), tf.zeros([0]), tf.zeros([0], tf.bool)
    hyper = tf.constant([0.9, 0, 0, 0], tf.float64)

    def setup(dev: str, sizes: list[int]):
        with tf.device(dev):
            ws = [tf.Variable(tf.ones([s])) for s in sizes]
            ms = [tf.Variable(tf.zeros([s])) for s in sizes]
            gs = [tf.fill([s], 0.5) for s in sizes]
            vs = ops.dsgd_pack_vars(vars=[w.handle for w in ws], accums=[m.handle for m in ms], averages=[])
        return dev, (ws, ms), gs, vs

    ways = {
        "one variable, one call": [setup("CPU:0", [n])],
        "8 devices, 8 calls": [setup(f"CPU:{k}", [n // parts]) for k in range(parts)],
        "8 variables, one call": [setup("CPU:0", [n // parts] * parts)],
    }

    def run(calls) -> None:
        for dev, _, gs, vs in calls:
            with tf.device(dev):
                ops.dsgd_multi_sgd(varset=vs, grads=gs, lr=lr, scales=no_scales, decay=no_mask, hyper=hyper,
                                   Tmomentum=tf.float32)

    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(args.rounds):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            t0 = time.perf_counter()
            run(ways[name])
            times[name].append(time.perf_counter() - t0)
    nbytes = n * 20
    for name, ts in times.items():
        ts = ts[2:] or ts  # the first rounds warm up
        print(f"{name:24s} {nbytes / np.median(ts) / 1e9:6.1f} GB/s (median of {len(ts)}), "
              f"best {nbytes / min(ts) / 1e9:.1f}")
    print(f"{'copy (the roofline)':24s} {measure.copy_bandwidth_gbps():6.1f} GB/s")
    if args.ceiling:
        ceiling(n, args.rounds)
    return 0


def ceiling(n: int, rounds: int) -> None:
    """Build and run scripts/stream_ceiling.cc (the update in plain C++, raw threads)."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from dsgd import kernels

    cxx = kernels.compiler()
    if cxx is None:
        print("no C++ compiler: --ceiling skipped")
        return
    src = Path(__file__).with_name("stream_ceiling.cc")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "stream_ceiling")
        subprocess.run([cxx, "-O3", "-std=c++17", "-pthread", *kernels.cpu_flags(), str(src), "-o", exe], check=True)
        threads = os.cpu_count() or 1
        out = subprocess.run([exe, str(n), str(threads), str(rounds)], check=True, capture_output=True, text=True)
    print(f"plain C++, {threads} threads, no TensorFlow, the same 20 bytes per parameter:")
    for line in out.stdout.splitlines():
        name, median, best = line.split("\t")
        print(f"  {name:38s} {float(median):6.1f} GB/s (median of {max(1, rounds - 1)}), best {float(best):.1f}")


if __name__ == "__main__":
    sys.exit(main())
