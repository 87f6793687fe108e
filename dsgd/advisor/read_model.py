"""The variables of the model ``dsgd layouts`` advises on: a named workload, a JSON variable list,
or ``module:function`` returning a tf_keras model (built in a worker process, read under a
recording ``LayoutMap`` so the names are the keys tf_keras looks layouts up by)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

from dsgd.workloads import WORKLOADS, VarSpec, WorkloadError, get_workload, load_json_workload


def load_model(spec: str, *, timeout: float = 300.0) -> list[VarSpec]:
    """The trainable variables of SPEC: a named workload, a JSON file, or ``module:function``."""
    if spec in WORKLOADS:
        return get_workload(spec)
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        return load_json_workload(path)
    if ":" in spec:
        return read_keras_model(spec, timeout=timeout)
    raise WorkloadError(f"--model {spec!r}: not a named workload ({', '.join(sorted(WORKLOADS))}), "
                        "not a JSON file, and not module:function")


def read_keras_model(target: str, *, timeout: float = 300.0) -> list[VarSpec]:
    """Build ``module:function``'s tf_keras model in a worker process and read its trainable variables.

    Names are the keys tf_keras' ``LayoutMap`` looks layouts up by (``dense_1.kernel``), so an
    emitted layout map applies to the model as it is.  Nothing is trained.
    """
    from dsgd.harness.isolate import run_isolated

    res = run_isolated("dsgd.advisor.read_model:read_model_variables", [{"target": target, "cwd": os.getcwd()}],
                       devices=1, timeout=timeout)[0]
    if res.get("status") != "ok":
        raise WorkloadError(f"--model {target!r}: could not build the model: {res.get('error')}")
    return [VarSpec(v["name"], tuple(v["shape"]), v["dtype"]) for v in res["variables"]]


def _resolve_function(target: str, cwd: Optional[str] = None):
    from dsgd.harness.model_data import resolve_function

    return resolve_function(target, cwd)


@contextlib.contextmanager
def recorded_paths():
    """Within: ``{id(DVariable): object path}`` of every DVariable a ``LayoutMap`` creates -- the keys tf_keras
    looks layouts up by (``dense_1.kernel``).  tf_keras keeps no record of them, so its one creation function
    (``layout_map._create_dvariable``) is wrapped for the duration, and restored."""
    from tf_keras.src.dtensor import layout_map as lm

    paths: dict[int, str] = {}
    original = lm._create_dvariable

    def recording(layout_map, object_path, variable):
        new = original(layout_map, object_path, variable)
        paths[id(new)] = object_path
        return new

    lm._create_dvariable = recording
    try:
        yield paths
    finally:
        lm._create_dvariable = original


def read_model_variables(payload: dict) -> dict:
    """Worker: build the model under a recording ``LayoutMap`` (everything replicated on one device)."""
    import tf_keras
    from tensorflow.experimental import dtensor
    from tf_keras.src.dtensor import layout_map as lm

    fn = _resolve_function(payload["target"], payload.get("cwd"))
    mesh = dtensor.create_mesh([("batch", 1)], devices=["CPU:0"])
    with recorded_paths() as paths, lm.layout_map_scope(tf_keras.dtensor.experimental.LayoutMap(mesh)):
        model = fn()
    if not isinstance(model, tf_keras.layers.Layer):
        raise TypeError(f"{payload['target']} returned {type(model).__name__}, not a tf_keras model")
    variables = model.trainable_variables
    if not variables:
        raise ValueError(f"{payload['target']}: the model has no trainable variables; build it "
                         "(give it an Input or call model.build(input_shape)) inside the function")
    out = []
    for v in variables:
        name = paths.get(id(v)) or v.name.split(":")[0]
        out.append({"name": name, "shape": [int(d) for d in v.shape], "dtype": v.dtype.name})
    return {"variables": out}
