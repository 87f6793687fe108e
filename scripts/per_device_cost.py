"""How a DTensor SGD step (tf_keras' or dsgd's) grows with the devices of a mesh, replicated against sharded.

The cost model's per-(variable, device) term says a step on N small variables grows linearly with
the devices.  This measures it directly: the optimizer's ``apply_gradients`` as ``dsgd bench`` and
``dsgd layouts`` time it (tf_keras' reference inside one ``tf.function``, as users run it; dsgd's,
``--implementation auto``, eagerly) on 1, 2, 4 and 8 logical CPU devices (a ``batch`` mesh), either

* on N variables of one shape, every variable replicated or sharded on its first dimension; or
* (``--workload``) on a named workload under the plan ``dsgd layouts --validate`` measures as
  sharded, split into its sharded variables and its replicated ones.

Every case is timed in interleaved rounds, so a slow spell of the machine falls on all of them
alike; the median round is printed, with the growth from 4 to 8 devices.

    python scripts/per_device_cost.py [--variables 128] [--shape 64,256] [--rounds 7]
    python scripts/per_device_cost.py --workload resnet-ish
    python scripts/per_device_cost.py --workload many-small --implementation auto
"""
from __future__ import annotations

import argparse
import time

DEVICES = (1, 2, 4, 8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variables", type=int, default=128, help="how many variables (default 128)")
    ap.add_argument("--shape", default="64,256", help="each variable's shape (default 64,256)")
    ap.add_argument("--workload", default=None,
                    help="a model instead (a named workload: one-big, bert-mini, resnet-ish, many-small; or a JSON file of "
                         "variables, as dsgd layouts --model takes): the plan dsgd layouts --validate measures as sharded")
    ap.add_argument("--implementation", default="reference",
                    help="reference (tf_keras' SGD, the default) or a dsgd implementation (auto, grouped, ...)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--steps", type=int, default=20, help="steps per case per round (default 20)")
    args = ap.parse_args(argv)

    from dsgd.devices import configure_devices, quiet_tensorflow

    quiet_tensorflow()
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per case: retracing warnings are expected
    configure_devices(max(DEVICES))
    from tensorflow.experimental import dtensor
    from tensorflow.python.eager import context

    from dsgd.advisor import costmodel
    from dsgd.advisor.read_model import load_model
    from dsgd.harness.measure import (REFERENCE, Case, make_optimizer, prepare_kernels, random_dtensor,
                                      resolved_implementations)
    from dsgd.workloads import VarSpec

    U = dtensor.UNSHARDED

    def variables(group: str) -> list[tuple[VarSpec, list[str]]]:
        if args.workload is None:
            shape = tuple(int(d) for d in args.shape.split(","))
            first = "batch" if group == "sharded" else U
            return [(VarSpec(f"v{i}", shape, "float32"), [first] + [U] * (len(shape) - 1))
                    for i in range(args.variables)]
        specs = load_model(args.workload)
        # the plan of the largest mesh on every mesh (on 1 device it shards over an axis of 1)
        plans = costmodel.validation_plans(specs, [("batch", max(DEVICES))])
        pairs = list(zip(specs, (list(lay) for lay in plans[-1].layouts)))
        if group == "all":
            return pairs
        return [(s, lay) for s, lay in pairs if any(e != U for e in lay) == (group == "sharded")]

    def build(n_dev: int, chosen: list[tuple[VarSpec, list[str]]]):
        mesh = dtensor.create_mesh([("batch", n_dev)], devices=[f"CPU:{i}" for i in range(n_dev)])
        vs, gs = [], []
        for i, (s, lay) in enumerate(chosen):
            layout = dtensor.Layout(lay, mesh)
            vs.append(dtensor.DVariable(random_dtensor(s.shape, s.dtype, layout, i)))
            gs.append(random_dtensor(s.shape, s.dtype, layout, 1000 + i))
        opt = make_optimizer(Case(workload="-", implementation=args.implementation, options="momentum"), mesh)
        pairs = list(zip(gs, vs))
        if args.implementation == REFERENCE:
            fn = tf.function(lambda: opt.apply_gradients(pairs))
        else:
            def fn():
                return opt.apply_gradients(pairs)
        for _ in range(3):
            fn()
        context.async_wait()
        return fn, len(vs), resolved_implementations(opt)

    prepare_kernels([args.implementation])  # dsgd's one-time kernel build, before anything is timed
    groups = ("replicated", "sharded") if args.workload is None else ("all", "sharded", "replicated")
    chosen = {g: v for g in groups if (v := variables(g))}  # one layout per variable, the same on every mesh
    cases = {(n, g): build(n, v) for g, v in chosen.items() for n in DEVICES}
    times = {k: [] for k in cases}
    order = list(cases)
    for r in range(args.rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            fn = cases[k][0]  # one untimed step, then a block of steps and one wait (no sync per step)
            fn()
            context.async_wait()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            context.async_wait()
            times[k].append((time.perf_counter() - t0) / args.steps * 1e3)
    what = args.workload or f"{args.variables} variables of {args.shape}"
    who = "tf_keras SGD" if args.implementation == REFERENCE else f"dsgd SGD ({args.implementation!r})"
    print(f"{who}, options 'momentum', step on {what}, median of {args.rounds} interleaved rounds (ms):")
    for g in chosen:
        med = [float(np.median(times[(n, g)])) for n in DEVICES]
        print(f"  {g:<10}  {cases[(1, g)][1]:>4} vars  1/2/4/8 devices: " + " / ".join(f"{m:.2f}" for m in med)
              + f"   8 vs 4 devices: {med[3] / med[2]:.2f}x   ({cases[(8, g)][2]})")


if __name__ == "__main__":
    main()
