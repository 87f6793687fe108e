"""The one measurement core: build a case, time a step, measure bandwidth, count bytes,
check against float64.  ``dsgd bench``, the asv suite, ``dsgd profile`` and ``dsgd layouts``
all call these; none grows its own timing loop.  (~410 lines: one home for everything a
measurement needs, so no caller keeps its own copy of a piece of it.)
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dsgd import meshspec
from dsgd.mesh import make_mesh, parse_layout_spec
from dsgd.layoutmap import layout_entries
from dsgd.workloads import VarSpec

# the shared names, defined once in dsgd.names (kept importable from here: the asv suite and older
# callers read them as dsgd.harness.measure.X)
from dsgd.names import (  # noqa: F401
    DTYPE_BYTES, FLOOR_MODES, MODEL_MODES, MODES, NO_UPDATE, OPTION_PRESETS, REFERENCE)


def elements_moved(opts: dict) -> int:
    """Ideal memory traffic of one step, in element accesses per parameter per device copy.

    momentum: read w, g, m; write w, m (5).  Plain SGD: read w, g; write w (3).  EMA: read and
    write the average (+2).  Clipping by norm: one more read of g (+1).  Weight decay is
    folded into the same pass (+0).
    """
    n = 5 if opts.get("momentum") else 3
    if opts.get("use_ema"):
        n += 2
    if opts.get("clipnorm") or opts.get("global_clipnorm"):
        n += 1
    return n


@dataclass
class Case:
    """One benchmark configuration.

    ``mesh`` is the spec as written (``"1"``, ``"batch=2,model=4"``): a case travels to worker
    processes as JSON and into result rows and the asv suite as plain fields; :attr:`mesh_spec`
    is the same mesh as a :class:`dsgd.meshspec.MeshSpec`, what the code works with.
    """

    workload: str
    mesh: str = "1"
    layout: str = "sharded"
    dtype: str = "float32"
    implementation: str = "auto"  # a dsgd implementation, or "reference" for tf_keras' DTensor SGD
    xla: bool = False
    options: str = "momentum"
    device: str = "CPU"
    mode: str = "eager"  # one of MODES: where the step runs (see MODES)

    @property
    def mesh_spec(self) -> meshspec.MeshSpec:
        """The mesh as a :class:`~dsgd.meshspec.MeshSpec` (a bad spec raises :class:`~dsgd.meshspec.SpecError`)."""
        return meshspec.MeshSpec.of(self.mesh)

    @property
    def label(self) -> str:
        return (f"{self.workload}|{self.mesh}|{self.layout}|{self.dtype}|{self.implementation}|"
                f"xla={'on' if self.xla else 'off'}|{self.options}" + (f"|{self.mode}" if self.mode != "eager" else ""))


@dataclass
class Built:
    """Variables, gradients and the step function of one case, ready to time."""

    case: Case
    specs: list[VarSpec]
    mesh: Any
    layouts: list
    variables: list
    grads: list
    optimizer: Any
    step: Callable[[], Any]
    first_step_s: float = 0.0


@functools.lru_cache(maxsize=None)
def _random_fn(shape: tuple, dtype: str):
    import tensorflow as tf

    # one trace per shape and dtype, the seed an input (a new tf.function per tensor cost ~0.1 s each)
    return tf.function(lambda seed: tf.cast(tf.random.stateless_normal(shape, seed=seed), dtype))


def random_dtensor(shape, dtype: str, layout, seed: int):
    """A fresh random DTensor (made inside a tf.function, as DTensor requires)."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    fn = _random_fn(tuple(int(d) for d in shape), str(dtype))
    seed_t = tf.constant([seed, 7], tf.int32)
    if layout is None:
        return fn(seed_t)
    seed_t = dtensor.copy_to_mesh(seed_t, dtensor.Layout.replicated(layout.mesh, 1))
    return dtensor.call_with_layout(fn, layout, seed_t)


def case_layouts(specs: Sequence[VarSpec], mesh, policy: str) -> list:
    dims = meshspec.mesh_dims(mesh)
    return [parse_layout_spec(layout_entries(s, dims, policy), mesh, len(s.shape), s.shape) for s in specs]


def make_optimizer(case: Case, mesh, opts: Optional[dict] = None, dense_gradients: bool = False):
    """dsgd.SGD for a dsgd implementation; tf_keras' DTensor SGD for ``reference`` (given dense
    gradients with ``dense_gradients``: :func:`dsgd.harness.models.dense_gradients`); the floor's
    optimizer that applies nothing for :data:`NO_UPDATE`."""
    if case.implementation == NO_UPDATE:
        from dsgd.harness import models

        return models.no_update_optimizer(mesh)
    opts = dict(OPTION_PRESETS[case.options] if opts is None else opts)
    if case.implementation == REFERENCE:
        import tf_keras

        opts.pop("momentum_dtype", None)
        cls = tf_keras.dtensor.experimental.optimizers.SGD
        if dense_gradients:
            from dsgd.harness import models

            cls = models.dense_gradients(cls)
        return cls(mesh=mesh, jit_compile=case.xla, **opts)
    import dsgd

    return dsgd.SGD(mesh=mesh, implementation=case.implementation, jit_compile=case.xla, **opts)


def build_case(case: Case, seed: int = 0, grad_seed: int = 1000) -> Built:
    """Create the mesh, variables (random), gradients (random) and the optimizer of a case."""
    import tensorflow as tf

    from dsgd.state import named_dvariable
    from dsgd.workloads import get_workload

    if case.mode in MODEL_MODES:
        return _build_model_case(case)
    if case.implementation == NO_UPDATE and case.mode not in FLOOR_MODES:
        raise ValueError(f"{NO_UPDATE!r} is the floor of the {'/'.join(FLOOR_MODES)} modes, not of mode {case.mode!r}")
    specs = get_workload(case.workload, case.dtype)
    mesh = make_mesh(case.mesh_spec, case.device)
    layouts = case_layouts(specs, mesh, case.layout)
    variables = [named_dvariable(random_dtensor(s.shape, s.dtype, lay, seed + i), s.name.replace("/", "_"), trainable=True)
                 for i, (s, lay) in enumerate(zip(specs, layouts))]
    grads = [random_dtensor(s.shape, s.dtype, lay, grad_seed + i) for i, (s, lay) in enumerate(zip(specs, layouts))]
    opt = make_optimizer(case, mesh)
    pairs = list(zip(grads, variables))
    if case.implementation == REFERENCE or case.mode == "graph":
        # The reference as users run it: its step inside one tf.function (eagerly it dispatches
        # every DTensor op separately and is 20x slower still). jit_compile as asked.
        fn = tf.function(lambda: opt.apply_gradients(pairs), jit_compile=bool(case.xla))

        def step():
            return fn()
    else:
        def step():
            return opt.apply_gradients(pairs)
    return Built(case, specs, mesh, layouts, variables, grads, opt, step)


def _build_model_case(case: Case) -> Built:
    """A whole training step of a named model (``train_step`` or ``fit`` mode)."""
    from dsgd.harness import models
    from dsgd.workloads import VarSpec

    spec = models.get_model_spec(case.workload)
    mesh = make_mesh(case.mesh_spec, case.device)
    opt = make_optimizer(case, mesh, dense_gradients=spec.sparse_gradients)
    ts = models.build_training_step(spec, mesh, opt, case.mode, policy=case.layout, jit_compile=case.xla)
    variables = list(ts.model.trainable_variables)
    specs = [VarSpec(v.name, tuple(v.shape.as_list()), v.dtype.name) for v in variables]
    layouts = [getattr(v, "layout", None) for v in variables]
    return Built(case, specs, mesh, layouts, variables, [], opt, ts.step)


def sync() -> None:
    """Wait for DTensor's asynchronous eager work (it returns before the work is done).

    In a multi-client run (:mod:`dsgd.multiclient`) it then waits for every client to get
    here too (:func:`dsgd.multiclient.step_barrier`), so a step timed around it is the whole
    mesh's step -- done on every client -- not this client's share of it.
    """
    from tensorflow.python.eager import context

    from dsgd import multiclient

    context.async_wait()
    if multiclient.is_client():
        multiclient.step_barrier()


def resolved_implementations(opt) -> str:
    """Which implementation(s) actually ran each group (for ``auto``)."""
    used = getattr(opt, "implementations_used", None)
    if used is None:  # tf_keras' optimizer
        return REFERENCE
    return "+".join(used()) or "?"


def prepare_kernels(implementations: Sequence[str]) -> float:
    """Build (once per machine) and load dsgd's C++ kernels before any step is timed, so that
    the ~20 s build is not a first step's time; the seconds it took here (0: not needed, or
    already loaded).  Only ``auto`` and ``grouped`` use the kernels."""
    if not {"auto", "grouped"} & set(implementations):
        return 0.0
    from dsgd import kernels

    return kernels.prepare()


def warm_up(case: Case) -> None:
    """Pay the process's and the mesh's one-time costs before any first step is timed.

    The first ``tf.function`` run on a mesh in a process pays ~50-80 ms that no later one does
    (TensorFlow's tracing machinery, DTensor's first program on the mesh).  Timed cold, that went
    to whichever implementation of a configuration was measured first: ``dsgd bench`` builds dsgd
    first, and its first step read 0.103 s against tf_keras' 0.099 on one-big, where each measured
    cold reads 0.135 against 0.183 and each measured after a warm-up 0.057 against 0.096.
    """
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    mesh = make_mesh(case.mesh_spec, case.device)
    v = dtensor.DVariable(dtensor.call_with_layout(tf.zeros, dtensor.Layout.replicated(mesh, 1), [8]))
    tf.function(lambda: v.assign(v * 2.0 + 1.0))()
    sync()


def time_first_step(built: Built) -> float:
    """Trace + compile + one step, in seconds (the optimizer is fresh)."""
    t0 = time.perf_counter()
    built.step()
    sync()
    built.first_step_s = time.perf_counter() - t0
    return built.first_step_s


def time_steps(step: Callable[[], Any], steps: int = 10, warmup: int = 2, min_time: float = 0.0,
               max_steps: Optional[int] = None) -> np.ndarray:
    """Per-step wall times in seconds, each synchronized: at least ``steps`` of them, and more until
    ``min_time`` seconds are timed, up to ``max_steps`` (default ``10 * steps``)."""
    for _ in range(warmup):
        step()
    sync()
    out = []
    t_start = time.perf_counter()
    while len(out) < steps or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t0)
        if len(out) >= (max_steps or 10 * steps):
            break
    return np.asarray(out)


def step_stats(t_ms: Sequence[float], percentiles: Sequence[int] = (10, 90), *, with_min: bool = True) -> dict:
    """Statistics of per-step times (ms): ``steps``, ``median_ms``, ``p<q>_ms`` for each of
    ``percentiles`` and (``with_min``) ``min_ms`` -- the one place bench, profile, layouts and
    asv compute them, so a "median" or a "p90" means the same everywhere."""
    t = np.asarray(t_ms, dtype=float)
    out = {"steps": len(t), "median_ms": float(np.median(t))}
    out.update({f"p{q}_ms": float(np.percentile(t, q)) for q in percentiles})
    if with_min:
        out["min_ms"] = float(t.min())
    return out


def roofline(traffic_bytes: float, step_ms: float, copy_gbps: float) -> dict:
    """How close a step is to the memory roofline: ``achieved_gbps`` (ideal traffic / step time),
    ``roofline_ms`` (that traffic at the copy bandwidth) and ``roofline_frac`` (their ratio; 1 =
    memory-bound)."""
    roof_ms = traffic_bytes / (copy_gbps * 1e9) * 1e3
    return {"achieved_gbps": traffic_bytes / (step_ms * 1e-3) / 1e9, "roofline_ms": roof_ms,
            "roofline_frac": roof_ms / step_ms}


def copy_bandwidth_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Host memory bandwidth in GB/s (bytes read + written), the roofline's denominator.

    The best of two streaming kernels over a buffer far larger than the caches, measured in
    this process: a copy split over the host's cores (NumPy, preallocated destination), and
    TensorFlow's in-place ``AssignAddVariableOp`` on a plain variable (reads 2, writes 1 —
    the same access pattern as an optimizer update, by the same thread pool).
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    n = nbytes // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    threads = max(1, min(os.cpu_count() or 1, 16))
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def part(i):
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    best_copy = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(part, range(threads)))
            best_copy = min(best_copy, time.perf_counter() - t0)
    del src, dst
    gbps = 2 * n * 4 / best_copy / 1e9
    try:
        import tensorflow as tf

        with tf.device("CPU:0"):
            v = tf.Variable(tf.zeros([n // 2]))
            d = tf.ones([n // 2])
            v.assign_add(d)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                v.assign_add(d)
                v[0].numpy()  # synchronize
                best = min(best, time.perf_counter() - t0)
        gbps = max(gbps, 3 * (n // 2) * 4 / best / 1e9)
    except Exception:  # noqa: BLE001 - the copy alone is still a valid measure
        pass
    return gbps


@dataclass
class Bytes:
    """Per-device byte counts (the busiest device) and the step's total traffic."""

    params_per_device: int
    momentum_per_device: int
    ema_per_device: int
    step_traffic_total: int  # ideal bytes moved by one step, all devices together
    params_total: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def optimizer_state_per_device(self) -> int:
        return self.momentum_per_device + self.ema_per_device


def count_bytes(specs: Sequence[VarSpec], layout_entries_list: Sequence[Sequence[str]],
                mesh_dims: Sequence[tuple[str, int]], opts: dict,
                zero1: bool = False) -> Bytes:
    """Exact bytes per device of parameters and optimizer state for a layout plan.

    ``layout_entries_list[i]`` is variable ``i``'s layout (one mesh axis or 'unsharded' per
    dimension).  Every device of a mesh holds the same number of bytes for a given layout
    (DTensor shards evenly), so per-device counts are exact.  ``zero1``: the momentum in its
    ZeRO-1 layout (``sharded_state``: :func:`dsgd.meshspec.zero1_entries`).
    """
    sizes = dict(mesh_dims)
    n_dev = meshspec.mesh_size(mesh_dims)
    p = m = e = traffic = total = 0
    for s, entries in zip(specs, layout_entries_list):
        b = DTYPE_BYTES[s.dtype]
        shards = 1
        for d, a in zip(s.shape, entries):
            if a != meshspec.UNSHARDED:
                shards *= sizes[a]
        local = s.size // shards
        p += local * b
        mom = local * b if opts.get("momentum") else 0
        if mom and zero1:
            slot = meshspec.zero1_entries(entries, mesh_dims, s.shape)
            mom //= math.prod(sizes[a] for a in slot if a != meshspec.UNSHARDED and a not in entries)
        m += mom
        e += local * b if opts.get("use_ema") else 0
        traffic += local * n_dev * b * elements_moved(opts)
        total += s.size
    return Bytes(p, m, e, traffic, total)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state (slots, EMA averages) on the busiest device, read from the
    optimizer's own variables and their layouts — not from what the plan intended."""
    import tensorflow as tf

    from dsgd.plan import variable_layout

    total = 0
    for v in getattr(optimizer, "variables", []):
        v = v() if callable(v) and not isinstance(v, tf.Variable) else v
        shape = list(v.shape)
        if not shape:
            continue  # iterations, learning rate: scalars
        layout = variable_layout(v)
        local = meshspec.local_shape(layout, shape) if layout is not None else shape
        total += math.prod(local) * tf.as_dtype(v.dtype).size
    return int(total)


def bytes_for_case(built: Built) -> Bytes:
    entries = [list(l.sharding_specs) for l in built.layouts]
    dims = meshspec.mesh_dims(built.mesh)
    return count_bytes(built.specs, entries, dims, OPTION_PRESETS[built.case.options])


def float64_error(case: Case, steps: int = 3) -> float:
    """Max relative error of the case's implementation against float64 after ``steps`` steps.

    Uses fresh random gradients each step (never zeros); NaN gives inf.
    """
    from dsgd import reference64 as r64
    from dsgd.state import to_numpy

    built = build_case(case, seed=11, grad_seed=5000)
    opts = dict(OPTION_PRESETS[case.options])
    o64 = r64.Options64(**{k: v for k, v in opts.items() if k in r64.Options64.__dataclass_fields__})
    state = r64.init_state([to_numpy(v) for v in built.variables], o64)
    for k in range(steps):
        grads = [random_dtensor(s.shape, s.dtype, lay, 9000 + 100 * k + i)
                 for i, (s, lay) in enumerate(zip(built.specs, built.layouts))]
        built.optimizer.apply_gradients(zip(grads, built.variables))
        r64.step(state, [to_numpy(g) for g in grads], o64)
    return max(r64.max_rel_error(to_numpy(v), w) for v, w in zip(built.variables, state.weights))
