"""Shared set-up of the dsgd asv suite: devices, the parameter grid, pruning and fixtures.

asv imports every benchmark module in a fresh process (the forkserver, or one interpreter
per parameter set with ``--launch-method spawn``).  Logical devices are fixed when
TensorFlow starts, so this module configures them once, at import, before any TensorFlow
context exists: 8 logical CPU devices (``DSGD_BENCH_DEVICES`` overrides).  Nothing here
may run a TensorFlow op at import time — forked benchmark processes each start their own
context.

All numbers come from :mod:`dsgd.harness.measure` (the one measurement core; ``dsgd.measure``
on commits from before the harness package, see :func:`harness_module`): cases are built with
``measure.build_case``, bytes counted with ``measure.count_bytes``, the roofline comes from
``measure.copy_bandwidth_gbps`` measured in the benchmark's own process and correctness from
``measure.float64_error``.

The grid.  Every benchmark class uses the same seven parameter names::

    mesh x layout x dtype x device x xla x implementation x options

but a class only sweeps the axes it is about (the others hold one value), and
:func:`skip_reason` prunes what adds no information or cannot run (asv records those as
skipped, via ``NotImplementedError`` in ``setup``):

* a mesh that needs more devices than are configured (or GPUs than are visible);
* ``device="GPU"`` where no GPU is visible;
* a non-replicated layout on a 1-D mesh (the ``sharded`` policy shards on the model axis,
  the last of two or more, so on ``1``/``batch=8`` it *is* ``replicated``; the mixed map
  names a ``model`` axis);
* ``replicated`` on a 2-D 8-device mesh (the same 8 full copies as ``batch=8``), and the
  mixed layout map on any 2-D mesh but the baseline's (``sharded`` covers the other);
* more than one of dtype / device / xla / options away from the baseline, or one away
  from it on a mesh/layout other than the baseline's (a star around the baseline
  ``batch=2,model=4`` / ``sharded`` / float32 / CPU / xla off / momentum: each axis is
  measured against the baseline, mesh and layout are crossed with each other);
* in a class whose ``only_off_baseline`` is set, the baseline itself (another class
  measures it already).
"""
from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from dsgd.devices import configure_devices  # noqa: E402

NUM_DEVICES = int(os.environ.get("DSGD_BENCH_DEVICES", "8"))
configure_devices(NUM_DEVICES, "CPU")

import tensorflow as _tf  # noqa: E402  (already imported by configure_devices; no context yet)

_tf.get_logger().setLevel("ERROR")  # the fixtures' per-variable tf.function retracing warnings


def harness_module(name: str):
    """``dsgd.harness.<name>``, or ``dsgd.<name>`` on the commits from before the harness package
    (asv installs older commits and imports this suite from the current checkout)."""
    try:
        return importlib.import_module(f"dsgd.harness.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("dsgd.harness", f"dsgd.harness.{name}"):
            raise  # the module is there but something it imports is not: not an older layout
        return importlib.import_module(f"dsgd.{name}")


try:  # the measurement core appeared in dsgd's second commit; older commits skip cleanly
    from dsgd import meshspec  # noqa: E402
    measure = harness_module("measure")
    from dsgd.impl import REGISTRY  # noqa: E402
    _IMPORT_ERROR: Optional[str] = None
    # Import now, once, what every case imports lazily: forked benchmark processes inherit it
    # (tf_keras and dsgd.optimizer alone cost ~1.8 s of CPU per process otherwise).  Imports
    # only: no TensorFlow context starts here.
    import tf_keras  # noqa: E402,F401
    from dsgd import optimizer as _optimizer, reference64 as _reference64, state as _state  # noqa: E402,F401
except ImportError as e:  # pragma: no cover - only on old commits
    measure = meshspec = None  # type: ignore[assignment]
    REGISTRY = {}
    _IMPORT_ERROR = f"this commit of dsgd has no measurement core ({e})"

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

#: The workload every class runs: a transformer block's variables (8 variables, 4.4M
#: parameters): big kernels for the bandwidth, biases and a norm for the per-variable cost.
#: Small enough that building a case (variables, gradients, first step) takes ~2 s of CPU.
WORKLOAD = str(DATA / "block.json")
#: Layout policies by display name; ``mixed`` is a layout-map file shipped here.
LAYOUTS = {"replicated": "replicated", "sharded": "sharded", "mixed": str(DATA / "mixed_layout.json")}

REFERENCE = "reference"  # tf_keras' DTensor SGD; the baseline every dsgd path is measured against
MESHES = ["1", "batch=8", "batch=2,model=4", "batch=4,model=2"]
DTYPES = ["float32", "bfloat16", "float16"]
DEVICES = ["CPU", "GPU"]
XLA = ["off", "on"]
#: The reference, then every dsgd implementation: those known when this suite was written, so
#: the parameter list stays the same across the commits one run compares (one missing from a
#: commit is skipped there), plus any other registered in dsgd.impl.REGISTRY (read at import:
#: a new implementation joins the suite by registering itself).
KNOWN_IMPLEMENTATIONS = ("ops", "fused", "per_shard", "grouped", "xla", "sharded_state")
IMPLEMENTATIONS = [REFERENCE, *KNOWN_IMPLEMENTATIONS, *(n for n in REGISTRY if n not in KNOWN_IMPLEMENTATIONS)]
OPTIONS = ["momentum", "full"]  # full: weight decay + global_clipnorm + EMA

#: Where the step runs (``dsgd.harness.measure.MODES``; fixed here, so older commits without modes
#: still get the ``eager`` rows): apply_gradients eagerly or inside a tf.function, a whole
#: custom tf.function training step, or a model.fit step of :data:`MODEL`.
MODES = ["eager", "graph", "train_step", "fit"]
MODEL_MODES = ("train_step", "fit")
#: The whole-step modes' model: dsgd.harness.models' residual MLP (8.7M parameters, global batch 16), or
#: a user's ``module:function`` (DSGD_ASV_MODEL) laid out by a layout-map file (DSGD_ASV_MODEL_LAYOUT, e.g.
#: from ``dsgd layouts --emit-layout-map``; the ``layout`` parameter then applies to the optimizer-step modes).
MODEL = os.environ.get("DSGD_ASV_MODEL", "resmlp")
MODEL_LAYOUT = os.environ.get("DSGD_ASV_MODEL_LAYOUT")
NO_UPDATE = "no-update"  # the floor: the same function applying nothing (whole steps; graph since FLOOR_MODES)

PARAM_NAMES = ["mesh", "layout", "dtype", "device", "xla", "implementation", "options"]
BASE = {"mesh": "batch=2,model=4", "layout": "sharded", "dtype": "float32", "device": "CPU",
        "xla": "off", "options": "momentum"}
_ONE_OFF_AXES = ("dtype", "device", "xla", "options")


def mesh_devices(mesh: str) -> int:
    return meshspec.mesh_size(meshspec.parse_mesh_spec(mesh))


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def skip_reason(mesh, layout, dtype, device, xla, implementation, options, *,
                only_off_baseline: bool = False) -> Optional[str]:
    """Why a parameter set is not run (asv shows it as skipped), or None to run it."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    p = dict(mesh=mesh, layout=layout, dtype=dtype, device=device, xla=xla, options=options)
    need = mesh_devices(mesh)
    if device == "GPU":
        have = gpu_count()
        if not have:
            return "no GPU visible"
        if need > have:
            return f"mesh {mesh!r} needs {need} GPUs, {have} visible"
    elif need > NUM_DEVICES:
        return f"mesh {mesh!r} needs {need} devices, {NUM_DEVICES} configured"
    if implementation not in (REFERENCE, "auto") and implementation not in REGISTRY:
        return f"implementation {implementation!r} is not registered in this commit"
    one_d = len(meshspec.parse_mesh_spec(mesh)) < 2
    if one_d and layout != "replicated":
        return f"layout {layout!r} on the 1-D mesh {mesh!r} is 'replicated'"
    if not one_d and layout == "replicated" and need == NUM_DEVICES:
        return "replicated on a 2-D 8-device mesh = replicated on batch=8"
    if layout == "mixed" and mesh != BASE["mesh"]:
        return f"the mixed layout map is measured on {BASE['mesh']} only"
    off = [a for a in _ONE_OFF_AXES if p[a] != BASE[a]]
    if len(off) > 1:
        return f"pruned: {', '.join(off)} all differ from the baseline"
    if off and off != ["device"] and (mesh, layout) != (BASE["mesh"], BASE["layout"]):
        return f"pruned: {off[0]} is measured on the baseline mesh/layout only"
    if only_off_baseline and not off:
        return "the baseline is measured by the mesh x layout class"
    return None


def check(*params, only_off_baseline: bool = False) -> None:
    """``setup``'s first line: raise NotImplementedError (asv: skipped) for pruned sets."""
    reason = skip_reason(*params, only_off_baseline=only_off_baseline)
    if reason:
        raise NotImplementedError(reason)


def mode_skip_reason(*params) -> Optional[str]:
    """:func:`skip_reason` for a parameter set with a trailing ``mode``."""
    *base, mode = params
    implementation = base[5]
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if mode != "eager" and mode not in getattr(measure, "MODES", ()):
        return f"mode {mode!r} is not in this commit of dsgd"
    if implementation == NO_UPDATE:
        floors = getattr(measure, "FLOOR_MODES", MODEL_MODES)  # graph's floor came later
        return None if mode in floors else f"{NO_UPDATE!r} is not a floor of mode {mode!r} in this commit of dsgd"
    return skip_reason(*base)


def case(mesh, layout, dtype, device, xla, implementation, options, mode: str = "eager") -> "measure.Case":
    """The measure.Case of a parameter set; ``mode`` (a trailing eighth parameter where a class
    sweeps it) runs a whole training step of :data:`MODEL` in the ``train_step``/``fit`` modes."""
    extra = {} if mode == "eager" else {"mode": mode}
    whole = mode in MODEL_MODES
    workload = MODEL if whole else WORKLOAD
    return measure.Case(workload=workload, mesh=mesh, layout=MODEL_LAYOUT if whole and MODEL_LAYOUT else LAYOUTS[layout],
                        dtype=dtype,
                        implementation=implementation, xla=(xla == "on"), options=options, device=device, **extra)


# One build per process and parameter set: asv's timer re-runs ``setup`` before every
# sample, and a build (variables, gradients, first step's trace) costs seconds.
_BUILT: dict = {}


def built(*params, warm: bool = True):
    """The case of ``params``, built once per process (and stepped once when ``warm``)."""
    key = tuple(params)
    b = _BUILT.get(key)
    if b is None:
        b = measure.build_case(case(*params))
        _BUILT[key] = b
    if warm and not b.first_step_s:
        measure.time_first_step(b)
    return b


def state_bytes_per_device(optimizer) -> Optional[int]:
    """Bytes of optimizer state on the busiest device, read from the optimizer's own variables
    (:func:`dsgd.harness.measure.optimizer_state_bytes`); None (asv: n/a) on commits from before it."""
    fn = getattr(measure, "optimizer_state_bytes", None)
    return fn(optimizer) if fn is not None else None


@functools.lru_cache(maxsize=1)
def copy_gbps() -> float:
    """This process's memory bandwidth (the roofline), measured once per process."""
    return measure.copy_bandwidth_gbps()


def metrics_case(payload: dict) -> dict:
    """One parameter set's tracked numbers, measured in this (worker) process.

    Run by :func:`metrics_for` through ``dsgd.harness.isolate``: the first step's time (trace +
    compile), the median of ten steps, the ideal traffic of a step (``measure.bytes_for_case``),
    the achieved GB/s and the fraction of the memory roofline (copy bandwidth measured in this
    same process), and the optimizer state bytes per device read from the optimizer.
    """
    import numpy as np

    params = tuple(payload["params"])
    b = built(*params)
    t = measure.time_steps(b.step, steps=int(payload.get("steps", 10)), warmup=1)
    median = float(np.median(t))
    traffic = measure.bytes_for_case(b).step_traffic_total
    bw = copy_gbps()
    if hasattr(measure, "roofline"):  # dsgd's one definition (issue 16 on)
        roof = measure.roofline(traffic, median * 1e3, bw)
        gbps, frac = roof["achieved_gbps"], roof["roofline_frac"]
    else:  # asv also runs this suite against commits from before it
        gbps, frac = traffic / median / 1e9, traffic / (bw * 1e9) / median
    return {"status": "ok", "first_step_s": b.first_step_s, "median_s": median, "traffic_bytes": traffic,
            "achieved_gbps": gbps, "copy_gbps": bw, "roofline_fraction": frac,
            "state_bytes_per_device": state_bytes_per_device(b.optimizer)}


def metrics_for(param_sets, steps: int = 10) -> dict:
    """``{params: result}`` for each parameter set, measured in ``dsgd.harness.isolate`` workers.

    One worker process measures the sets one after another (one TensorFlow start for all);
    a set that fails is recorded (``status="failed"``) and a fresh worker takes the rest, so
    one bad set neither poisons nor loses the others.
    """
    isolate = harness_module("isolate")
    child_env, run_isolated = isolate.child_env, isolate.run_isolated

    param_sets = [tuple(p) for p in param_sets]
    if not param_sets:
        return {}
    # The worker imports this module as ``benchmarks.common``: the suite's parent directory
    # goes *last* on the path, so the dsgd under test (installed in the environment) is the
    # one imported, never a checkout beside the benchmarks.
    path = child_env()["PYTHONPATH"] + os.pathsep + str(HERE.parent)
    results = run_isolated(f"{HERE.name}.common:metrics_case",
                           [{"params": list(p), "steps": steps} for p in param_sets],
                           devices=NUM_DEVICES, env={"PYTHONPATH": path})
    return dict(zip(param_sets, results))


def result_of(cache: dict, params) -> dict:
    """The measured row of ``params`` from a ``setup_cache`` dict; a failed one raises."""
    row = cache.get(tuple(params))
    if row is None:
        raise NotImplementedError("not measured (pruned)")
    if row.get("status") != "ok":
        raise RuntimeError(f"measurement failed: {row.get('error')}")
    return row
