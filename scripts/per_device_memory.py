"""Each device's own memory over one whole training step of a `dsgd layouts` plan, and what it held.

In one process TensorFlow's logical CPU devices share one allocator, and they do not peak together, so
the allocator's peak over 8 devices / 8 is not a device's peak (`dsgd layouts` checks its estimate against
that, and says so).  Here every device runs in its own DTensor client (`dsgd launch --clients 8
--devices-per-client 1`), whose allocator serves that device alone.  Each client reports:

* ``step_peak_bytes``: its allocator's peak over a step above what it held before (median of 3);
* from one profiled step, as TensorFlow's profiler attributes each allocation
  (:func:`dsgd.harness.profile_summary.memory_at_peak`): ``tensors_peak``, the most bytes the
  program's tensors asked for at any one time (what `dsgd layouts` estimates as ``transient_bytes``),
  and what the allocator held at its own peak: ``tensors``, ``collective_buffers`` (the CPU collective
  runtime's own) and ``allocator_slack`` (what the BFC allocator gave beyond the requests).  The
  profiler records no allocation under ``smallest_traced`` (256 KiB here: oneDNN's small-size
  allocator records none), so these figures leave the smaller tensors out; set them beside the
  estimate of the same tensors (``dtensor_program.liveness(..., min_bytes=SEEN_BYTES)``, which
  `dsgd layouts` prints as ``transient_seen_bytes``).

    python scripts/per_device_memory.py dsgd.harness.models:mlp "2x4 fsdp" [--out DIR] [--devices 8]

prints one JSON object: the plan and a row per device.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _client() -> None:
    import tensorflow as tf

    from dsgd import meshspec
    from dsgd.advisor import step_measure
    from dsgd.harness import measure, model_data

    payload = json.load(open(os.environ["DSGD_MEM_PAYLOAD"]))
    out, cid = os.environ["DSGD_MEM_OUT"], os.environ.get("DTENSOR_CLIENT_ID", "0")
    plan, batch = payload["plan"], int(payload["batch_size"])
    mesh = meshspec.make_mesh(plan["mesh"])
    examples = model_data.synthetic_examples(payload["inputs"], payload["outputs"], payload["loss"], batch,
                                             payload.get("vocab"))
    job = step_measure._build_job(payload, plan, "dsgd", mesh,
                                  lambda: model_data.dtensor_dataset(mesh, batch, examples=examples), None, set())
    for _ in range(3):
        job["step"]()
    measure.sync()
    peaks = [step_measure._memory_step(job).get("alloc_step_peak") for _ in range(3)]
    json.dump(peaks, open(os.path.join(out, f"client{cid}.json"), "w"))
    # the host tracer at level 2 records the allocators' events; nothing else is needed
    opts = tf.profiler.experimental.ProfilerOptions(host_tracer_level=2, python_tracer_level=0, device_tracer_level=0)
    tf.profiler.experimental.start(os.path.join(out, f"profile{cid}"), options=opts)
    job["step"]()
    measure.sync()
    time.sleep(0.5)  # as in the saved measurements (it does not prevent the crashes below)
    tf.profiler.experimental.stop()
    job["step"]()  # with every client: none leaves (closing the coordination service) before the rest are done
    measure.sync()


def _launch(out: str, devices: int, env: dict) -> None:
    subprocess.run(["dsgd", "launch", "--clients", str(devices), "--devices-per-client", "1", "--log-dir",
                    os.path.join(out, "logs"), "--", sys.executable, os.path.abspath(__file__)], env=env)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="module:function returning the tf_keras model")
    ap.add_argument("plan", help='a plan of `dsgd layouts`, e.g. "2x4 fsdp"')
    ap.add_argument("--out", default=None, help="directory for the clients' files (default: a new temporary one)")
    ap.add_argument("--devices", type=int, default=8, help="devices, one client each (default 8)")
    args = ap.parse_args(argv)

    from dsgd.advisor import step_advice, step_plans
    from dsgd.advisor.model_graph import read_graph
    from dsgd.harness import model_data
    from dsgd.harness.profile_summary import find_xplanes, memory_at_peak

    graph = read_graph(args.model)
    batch = int(graph.inputs[0].batch or step_advice.DEFAULT_BATCH)
    search = step_plans.search(graph, args.devices, global_batch=batch, rules=step_plans.RULES)
    plan = next((p for p in search.plans if p.name == args.plan), None)
    if plan is None:
        sys.exit(f"no plan {args.plan!r}; the plans: {', '.join(p.name for p in search.plans)}")
    out = args.out or tempfile.mkdtemp(prefix="dsgd-mem-")
    loss = model_data.infer_loss([vars(o) for o in graph.outputs])
    payload = dict(step_advice.worker_payload(args.model, graph, batch, loss),
                   plan=step_advice.plan_payload(plan, graph))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "payload.json")
    json.dump(payload, open(path, "w"))
    env = dict(os.environ, DSGD_MEM_PAYLOAD=path, DSGD_MEM_OUT=out, DSGD_MEM_CLIENT="1")
    # A client crashes now and then as its profiler stops (TF 2.21: SIGSEGV, "double free", "munmap_chunk():
    # invalid pointer"; one client of 8 in 17 runs over 21 plans here), and the launcher stops the rest: run
    # again, keeping each device's first complete report.
    held: dict = {}
    for _ in range(4):
        _launch(out, args.devices, env)
        for i in set(range(args.devices)) - set(held):
            try:
                peaks = json.load(open(os.path.join(out, f"client{i}.json")))
                traces = find_xplanes(os.path.join(out, f"profile{i}"))
                # a trace without memory events (a model whose tensors are all under 256 KiB) reports none
                mem = next(iter(memory_at_peak(traces).values()), {}) if traces else None
            except Exception:  # noqa: BLE001 - cut short: this device runs again
                mem = None
            if mem is None:
                continue
            held[i] = dict(device=i, step_peak_bytes=statistics.median(peaks),
                           **{k: mem.get(k) for k in ("tensors_peak", "smallest_traced", "tensors",
                                                      "collective_buffers", "allocator_slack")})
        if len(held) == args.devices:
            break
    else:
        sys.exit(f"devices {sorted(set(range(args.devices)) - set(held))} never completed in 4 runs; "
                 f"their logs: {os.path.join(out, 'logs')}")
    rows = [held[i] for i in range(args.devices)]
    print(json.dumps({"model": args.model, "plan": plan.name, "devices": rows}))


if __name__ == "__main__":
    if os.environ.get("DSGD_MEM_CLIENT"):
        _client()
    else:
        main()
