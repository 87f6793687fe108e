"""Each device's own allocator peak over one whole training step of a `dsgd layouts` plan.

In one process TensorFlow's logical CPU devices share one allocator, and they do not peak together, so
the allocator's peak over 8 devices / 8 is not a device's peak (`dsgd layouts` checks its estimate against
that, and says so).  Here every device runs in its own DTensor client (`dsgd launch --clients 8
--devices-per-client 1`), whose allocator serves that device alone.  The collectives then run over RPC,
whose buffers count too.

    python scripts/per_device_memory.py dsgd.harness.models:mlp "2x4 fsdp" [OUT_DIR]

prints each client's allocator peak over a step (median of 3), to set beside the plan's estimated
transient peak in `dsgd layouts --format json` (``transient_bytes``).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile


def _client() -> None:
    from dsgd import meshspec
    from dsgd.advisor import step_measure
    from dsgd.harness import measure, model_data

    payload = json.load(open(os.environ["DSGD_MEM_PAYLOAD"]))
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
    out = os.path.join(os.environ["DSGD_MEM_OUT"], f"client{os.environ.get('DTENSOR_CLIENT_ID', '0')}.json")
    json.dump(peaks, open(out, "w"))


def main(model: str, plan_name: str, out: str) -> None:
    from dsgd.advisor import step_advice, step_plans
    from dsgd.advisor.model_graph import read_graph
    from dsgd.harness import model_data

    graph = read_graph(model)
    batch = int(graph.inputs[0].batch or step_advice.DEFAULT_BATCH)
    search = step_plans.search(graph, 8, global_batch=batch, rules=step_plans.RULES)
    plan = next((p for p in search.plans if p.name == plan_name), None)
    if plan is None:
        sys.exit(f"no plan {plan_name!r}; the plans: {', '.join(p.name for p in search.plans)}")
    loss = model_data.infer_loss([vars(o) for o in graph.outputs])
    payload = dict(step_advice.worker_payload(model, graph, batch, loss),
                   plan=step_advice.plan_payload(plan, graph))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "payload.json")
    json.dump(payload, open(path, "w"))
    env = dict(os.environ, DSGD_MEM_PAYLOAD=path, DSGD_MEM_OUT=out, DSGD_MEM_CLIENT="1")
    subprocess.run(["dsgd", "launch", "--clients", "8", "--devices-per-client", "1", "--log-dir",
                    os.path.join(out, "logs"), "--", "python", os.path.abspath(__file__)], env=env, check=True)
    peaks = [statistics.median(json.load(open(os.path.join(out, f"client{i}.json")))) for i in range(8)]
    print(json.dumps({"model": model, "plan": plan.name, "per_device_peak_bytes": peaks}))


if __name__ == "__main__":
    if os.environ.get("DSGD_MEM_CLIENT"):
        _client()
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp(prefix="dsgd-mem-"))
