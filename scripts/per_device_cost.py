"""How tf_keras' DTensor SGD step grows with the devices of a mesh, replicated against sharded.

The cost model's per-(variable, device) term says a step on N small variables grows linearly with
the devices.  This measures it directly: the reference optimizer's ``apply_gradients`` inside one
``tf.function`` (as users run it) on N variables of one shape, on 1, 2, 4 and 8 logical CPU devices,
every variable replicated or sharded on its first dimension.  Every (devices, layout) case is timed
in interleaved rounds, so a slow spell of the machine falls on all of them alike; the median round
is printed, with the growth from 4 to 8 devices.

    python scripts/per_device_cost.py [--variables 128] [--shape 64,256] [--rounds 7]
"""
from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variables", type=int, default=128, help="how many variables (default 128)")
    ap.add_argument("--shape", default="64,256", help="each variable's shape (default 64,256)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--steps", type=int, default=20, help="steps per case per round (default 20)")
    args = ap.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))

    from dsgd.devices import configure_devices, quiet_tensorflow

    quiet_tensorflow()
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per case: retracing warnings are expected
    configure_devices(8)
    import tf_keras
    from tensorflow.experimental import dtensor
    from tensorflow.python.eager import context

    from dsgd.harness.measure import random_dtensor

    def build(n_dev: int, sharded: bool):
        mesh = dtensor.create_mesh([("batch", n_dev)], devices=[f"CPU:{i}" for i in range(n_dev)])
        first = "batch" if sharded else dtensor.UNSHARDED
        lay = dtensor.Layout([first] + [dtensor.UNSHARDED] * (len(shape) - 1), mesh)
        vs = [dtensor.DVariable(random_dtensor(shape, "float32", lay, i)) for i in range(args.variables)]
        gs = [random_dtensor(shape, "float32", lay, 1000 + i) for i in range(args.variables)]
        opt = tf_keras.dtensor.experimental.optimizers.SGD(0.01, momentum=0.9, mesh=mesh)
        fn = tf.function(lambda: opt.apply_gradients(zip(gs, vs)))
        for _ in range(3):
            fn()
        context.async_wait()
        return fn

    cases = {(n, sh): build(n, sh) for sh in (False, True) for n in (1, 2, 4, 8)}
    times = {k: [] for k in cases}
    order = list(cases)
    for r in range(args.rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            fn = cases[k]
            fn()
            context.async_wait()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            context.async_wait()
            times[k].append((time.perf_counter() - t0) / args.steps * 1e3)
    print(f"tf_keras SGD(momentum=0.9) step, {args.variables} variables of {shape}, median of {args.rounds} "
          "interleaved rounds (ms):")
    for sh in (False, True):
        med = [float(np.median(times[(n, sh)])) for n in (1, 2, 4, 8)]
        print(f"  {'sharded   ' if sh else 'replicated'}  1/2/4/8 devices: "
              + " / ".join(f"{m:.2f}" for m in med) + f"   8 vs 4 devices: {med[3] / med[2]:.2f}x")


if __name__ == "__main__":
    main()
