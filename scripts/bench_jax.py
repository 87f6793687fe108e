#!/usr/bin/env python3
"""JAX + optax baseline for ``dsgd bench``: one optimizer step, jitted with shardings.

What a user would write instead of dsgd (issue 3's "JAX + optax" column): the same
workloads, meshes, layout policies, dtypes and option presets as ``dsgd bench``, run as one
``jax.jit`` step over ``NamedSharding``-placed arrays on the first N of 8 host CPU devices,
with parameters and optimizer state donated.  Not a test and not a runtime dependency of
dsgd; it needs ``pip install jax optax`` (CPU wheels).

Usage::

    python scripts/bench_jax.py                                  # the default set (below)
    python scripts/bench_jax.py --workload bert-mini --mesh batch=2,model=4 --options full
    python scripts/bench_jax.py --format csv --output jax.csv    # merge with `dsgd bench --format csv`

Defaults: workloads one-big, bert-mini, many-small; meshes 1, batch=8, batch=2,model=4;
layout sharded; dtype float32; options momentum; 20 timed steps after 3 warm-up steps.

Columns (as ``dsgd bench``): workload, mesh, layout, dtype, options, implementation
(``jax+optax``), median_ms, p10_ms, p90_ms, first_step_s, state_bytes_per_device, plus xla
(always on: JAX compiles), steps, min_ms, init_s/lower_s/compile_s (parts of first_step_s),
params, param_bytes_per_device, max_rel_err, status, error.

* ``median_ms``/``p10_ms``/``p90_ms``: wall time of one step ``params, state =
  step(params, state, grads)`` followed by ``block_until_ready``, over ``--steps`` steps.
* ``first_step_s``: optimizer-state creation (a jitted, sharded ``tx.init``) + trace +
  compile + one step, with JAX's caches cleared first (``jax.clear_caches``); JAX's own
  start-up (backend creation) is paid before, once per process, and not counted.
* ``state_bytes_per_device``: bytes of optimizer state (momentum trace, EMA) held by the
  busiest device, counted from the arrays' addressable shards.
* ``max_rel_err``: after the timing, 3 steps on fresh weights and gradients against dsgd's
  float64 model (``dsgd/reference64.py``), weights and EMA averages; past the dtype's
  tolerance the case's status is ``mismatch`` (``--no-check`` skips it).

Option presets (``dsgd.harness.measure.OPTION_PRESETS``) and how they map onto optax, so that the
update is the same as ``dsgd/rules.py`` (tf_keras order: clip, decoupled decay, momentum, EMA):

* ``sgd``:      ``scale(-lr)`` (what ``optax.sgd(lr)`` is).
* ``momentum``: ``optax.sgd(lr, momentum=mu)`` = ``chain(trace(mu), scale(-lr))``.  optax keeps
  ``t = mu*t + g`` and steps by ``-lr*t``; dsgd keeps ``m = mu*m - lr*g`` and steps by ``+m``.
  So ``m = -lr*t``: identical weights for a constant learning rate (the buffers differ by
  the factor ``-lr``; they would diverge only under a learning-rate schedule).
* ``full`` (momentum + weight_decay + global_clipnorm + use_ema)::

      chain(clip_by_global_norm(c), trace(mu), add_decayed_weights(wd), scale(-lr))
      then, in the same jitted step: avg = ema*avg + (1-ema)*w_new

  which is dsgd's ``w <- w - lr*wd*w + m_new`` (decoupled decay, not through momentum).  The
  naive ``chain(clip, add_decayed_weights(wd), sgd(lr, momentum))`` puts ``wd*w`` *into* the
  momentum buffer (coupled L2, as ``optax.sgd`` docs describe), which is a different rule;
  both cost the same passes over memory.  ``optax.ema`` averages *updates*, not parameters,
  so the parameter EMA is written by hand (its average starts at the initial weights, as in
  dsgd and tf_keras; ``ema_overwrite_frequency`` is None in the preset, so no overwrite).

Note: importing ``dsgd.workloads`` runs ``dsgd/__init__.py``, which imports TensorFlow.  This
script loads ``dsgd.workloads``, ``dsgd.meshspec`` and ``dsgd.harness.measure`` (all TF-free at import)
without running the package ``__init__``, so TensorFlow never loads next to JAX.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HOST_DEVICES = 8
IMPLEMENTATION = "jax+optax"
DEFAULT_WORKLOADS = ("one-big", "bert-mini", "many-small")
DEFAULT_MESHES = ("1", "batch=8", "batch=2,model=4")
COLUMNS = ["workload", "mesh", "layout", "dtype", "options", "implementation", "median_ms", "p10_ms", "p90_ms",
           "first_step_s", "state_bytes_per_device"]
EXTRA_COLUMNS = ["xla", "device", "steps", "min_ms", "init_s", "lower_s", "compile_s", "params",
                 "param_bytes_per_device", "max_rel_err", "status", "error"]


# ----------------------------------------------------------------------------- dsgd, without TensorFlow
def _import_dsgd_pure():
    """Import dsgd's pure-Python modules without executing ``dsgd/__init__.py`` (it imports TF)."""
    if "dsgd" not in sys.modules:
        here = Path(__file__).resolve().parent.parent / "dsgd"  # this checkout first, else the installed one
        path = [str(here)] if here.is_dir() else list(importlib.util.find_spec("dsgd").submodule_search_locations)
        pkg = types.ModuleType("dsgd")
        pkg.__path__ = path  # a bare package: its submodules import, its __init__ does not run
        sys.modules["dsgd"] = pkg
    from dsgd import layoutmap, meshspec, workloads
    from dsgd.harness import measure

    assert "tensorflow" not in sys.modules, "dsgd's pure modules imported TensorFlow"
    return workloads, meshspec, measure


# ----------------------------------------------------------------------------- JAX start-up
def _set_host_devices(n: int) -> None:
    """Ask XLA for ``n`` host CPU devices; must run before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("bench_jax: jax was imported before the host device count could be set")
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ----------------------------------------------------------------------------- the optax step
def make_transform(opts: dict):
    """The optax transformation for a dsgd option preset (see the module docstring)."""
    import optax

    lr = float(opts.get("learning_rate", 0.01))
    mu = float(opts.get("momentum") or 0.0)
    if opts.get("nesterov"):
        raise NotImplementedError("nesterov: optax.trace(nesterov=True) differs in scaling; not mapped here")
    if opts.get("clipnorm") or opts.get("clipvalue"):
        raise NotImplementedError("per-variable clipnorm/clipvalue are not mapped (no preset uses them)")
    parts = []
    if opts.get("global_clipnorm"):
        parts.append(optax.clip_by_global_norm(float(opts["global_clipnorm"])))
    if mu:
        parts.append(optax.trace(decay=mu))
    if opts.get("weight_decay"):
        parts.append(optax.add_decayed_weights(float(opts["weight_decay"])))  # after trace: decoupled
    parts.append(optax.scale(-lr))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def make_step(tx, ema_momentum: float | None):
    """``(params, state, grads) -> (params, state)``; ``state = (opt_state, ema_or_None)``."""
    import jax
    import optax

    def step(params, state, grads):
        opt_state, avg = state
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema_momentum is not None:
            avg = jax.tree.map(lambda a, w: (ema_momentum * a + (1.0 - ema_momentum) * w).astype(a.dtype), avg, params)
        return params, (opt_state, avg)

    return step


# ----------------------------------------------------------------------------- one case
def _device_bytes(tree) -> dict:
    """Bytes each device holds of a pytree of jax arrays."""
    import jax

    per: dict = {}
    for leaf in jax.tree.leaves(tree):
        for sh in leaf.addressable_shards:
            per[sh.device] = per.get(sh.device, 0) + sh.data.nbytes
    return per


def check_against_float64(specs, opts: dict, init_fn, step, random_tree, steps: int = 3) -> float:
    """Max relative error of the jitted step against dsgd's float64 model after ``steps`` steps.

    Fresh weights and fresh gradients every step; reuses the compiled ``init_fn`` and ``step``.
    """
    from dsgd import reference64 as r64

    params = random_tree(11)
    w0 = [np.asarray(params[s.name], np.float64) for s in specs]
    o64 = r64.Options64(**{k: v for k, v in opts.items() if k in r64.Options64.__dataclass_fields__})
    ref = r64.init_state(w0, o64)
    state = init_fn(params)
    for k in range(steps):
        grads = random_tree(5000 + k)
        params, state = step(params, state, grads)
        r64.step(ref, [np.asarray(grads[s.name], np.float64) for s in specs], o64)
    errs = [r64.max_rel_error(np.asarray(params[s.name], np.float64), w) for s, w in zip(specs, ref.weights)]
    if state[1] is not None:  # the EMA averages too
        errs += [r64.max_rel_error(np.asarray(state[1][s.name], np.float64), a) for s, a in zip(specs, ref.averages)]
    return max(errs)


def run_case(workload: str, mesh_spec: str, layout: str, dtype: str, options: str, steps: int,
             warmup: int = 3, check: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    workloads, meshspec, measure = _import_dsgd_pure()
    specs = workloads.get_workload(workload, dtype)
    dims = meshspec.parse_mesh_spec(mesh_spec)
    n = meshspec.mesh_size(dims)
    devices = jax.devices("cpu")
    if n > len(devices):
        raise meshspec.SpecError(f"mesh {mesh_spec!r} needs {n} devices, {len(devices)} host devices configured")
    mesh = Mesh(np.asarray(devices[:n]).reshape([s for _, s in dims]), tuple(a for a, _ in dims))
    entries = [layoutmap.layout_entries(s, dims, layout) for s in specs]
    for s, e in zip(specs, entries):  # same checks as dsgd: known axes, each used once, divisible
        used = [a for a in e if a != meshspec.UNSHARDED]
        if len(e) != len(s.shape) or len(set(used)) != len(used) or any(a not in dict(dims) for a in used) \
                or any(d % dict(dims)[a] for d, a in zip(s.shape, e) if a != meshspec.UNSHARDED):
            raise meshspec.SpecError(f"layout {e} does not fit {s.name} {s.shape} on mesh {mesh_spec!r}")
    shardings = {s.name: NamedSharding(mesh, PartitionSpec(*[None if a == meshspec.UNSHARDED else a for a in e]))
                 for s, e in zip(specs, entries)}
    opts = dict(measure.OPTION_PRESETS[options])

    def random_tree(key_seed: int):
        """Standard-normal arrays made on the host and placed with their sharding (no compile)."""
        rng = np.random.default_rng(key_seed)
        return {s.name: jax.device_put(rng.standard_normal(s.shape, np.float32).astype(jnp.dtype(s.dtype)),
                                       shardings[s.name]) for s in specs}

    params = random_tree(0)
    grads = random_tree(1000)
    jax.block_until_ready((params, grads))

    tx = make_transform(opts)
    ema = float(opts.get("ema_momentum", 0.99)) if opts.get("use_ema") else None

    def init(p):
        return tx.init(p), (jax.tree.map(jnp.copy, p) if ema is not None else None)

    replicated = NamedSharding(mesh, PartitionSpec())

    def state_sharding(path, leaf):
        """Optimizer state takes its parameter's sharding (optax states mirror the params dict)."""
        for k in reversed(path):
            name = getattr(k, "key", None)
            if name in shardings and tuple(leaf.shape) == tuple(params[name].shape):
                return shardings[name]
        if leaf.ndim:
            raise ValueError(f"optimizer state leaf {jax.tree_util.keystr(path)} matches no parameter")
        return replicated  # scalars (counters)

    # ---- time to first step: state creation + trace + compile + one step, caches cleared.
    # Ahead-of-time stages (lower, compile) so the parts can be reported; the compiled
    # executable is what a plain jit call would run (same C++ call path, donation, shardings).
    jax.clear_caches()
    t0 = time.perf_counter()
    state_shardings = jax.tree_util.tree_map_with_path(state_sharding, jax.eval_shape(init, params))
    init_fn = jax.jit(init, out_shardings=state_shardings)
    state = jax.block_until_ready(init_fn(params))
    t1 = time.perf_counter()
    lowered = jax.jit(make_step(tx, ema), in_shardings=(shardings, state_shardings, shardings),
                      out_shardings=(shardings, state_shardings), donate_argnums=(0, 1)).lower(params, state, grads)
    t2 = time.perf_counter()
    step = lowered.compile()
    t3 = time.perf_counter()
    params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    first_step_s = time.perf_counter() - t0
    parts = {"init_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2}

    # ---- steady state
    for _ in range(warmup):
        params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state = step(params, state, grads)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
    t = np.asarray(times) * 1e3

    state_bytes = _device_bytes(state)
    param_bytes = _device_bytes(params)
    del params, state
    err = check_against_float64(specs, opts, init_fn, step, random_tree) if check else None
    return {
        **parts,
        "max_rel_err": err,
        "median_ms": float(np.median(t)),
        "p10_ms": float(np.percentile(t, 10)),
        "p90_ms": float(np.percentile(t, 90)),
        "min_ms": float(t.min()),
        "first_step_s": first_step_s,
        "state_bytes_per_device": max(state_bytes.values(), default=0),
        "param_bytes_per_device": max(param_bytes.values(), default=0),
        "params": workloads.total_params(specs),
        "steps": len(t),
    }


# ----------------------------------------------------------------------------- output
def render(rows: Sequence[dict], fmt: str) -> str:
    cols = COLUMNS + EXTRA_COLUMNS
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in cols} for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    shown = [c for c in COLUMNS if c != "state_bytes_per_device"] + ["state_MiB/dev", "max_rel_err", "status"]

    def cell(r, c):
        v = r.get("state_bytes_per_device") / 2**20 if c == "state_MiB/dev" and r.get("state_bytes_per_device") is not None \
            else r.get(c)
        if v is None:
            return "-"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    table = [shown] + [[cell(r, c) for c in shown] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(shown))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "failed cases:"] + [f"  {r['workload']}|{r['mesh']}|{r['layout']}|{r['dtype']}|{r['options']}: "
                                          f"{str(r.get('error'))[:200]}" for r in failed]
    return "\n".join(lines)


def versions() -> str:
    import jax
    import jaxlib
    import optax

    return f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, optax {optax.__version__}"


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring (python -m pydoc scripts/bench_jax.py) for details.")
    p.add_argument("--workload", action="append", help="one-big | bert-mini | many-small | resnet-ish | FILE.json (repeatable)")
    p.add_argument("--mesh", action="append", help="e.g. 1, batch=8, batch=2,model=4 (repeatable)")
    p.add_argument("--layout", action="append", help="replicated | sharded | LAYOUT_MAP.json (repeatable; default sharded)")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"],
                   help="variable dtype (repeatable; default float32)")
    p.add_argument("--options", action="append", help="option preset: momentum | sgd | full (repeatable; default momentum)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (default 3)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--output", "-o", help="also write the results to this file (csv when --format table)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check against dsgd's float64 model (3 steps on fresh weights, after the timing)")
    p.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, meshspec, measure = _import_dsgd_pure()
    from dsgd import reference64

    meshes = args.mesh or list(DEFAULT_MESHES)
    try:
        need = max(meshspec.mesh_size(meshspec.parse_mesh_spec(m)) for m in meshes)
    except meshspec.SpecError as e:
        print(f"bench_jax: error: {e}", file=sys.stderr)
        return 2
    for o in args.options or []:
        if o not in measure.OPTION_PRESETS:
            print(f"bench_jax: error: unknown options preset {o!r}; choose from {sorted(measure.OPTION_PRESETS)}",
                  file=sys.stderr)
            return 2
    _set_host_devices(max(HOST_DEVICES, need))
    if args.dtype and "float64" in args.dtype:
        os.environ["JAX_ENABLE_X64"] = "1"
    import jax

    jax.devices()  # backend start-up, outside every timing
    jax.block_until_ready(jax.jit(lambda x: x + 1)(np.zeros(4, np.float32)))  # first-jit overheads, once
    if not args.quiet:
        print(f"bench_jax: {versions()}; {len(jax.devices())} host devices; XLA_FLAGS={os.environ['XLA_FLAGS']}",
              file=sys.stderr)

    rows = []
    grid = [(w, m, l, d, o) for w in (args.workload or DEFAULT_WORKLOADS) for m in meshes
            for l in (args.layout or ["sharded"]) for d in (args.dtype or ["float32"])
            for o in (args.options or ["momentum"])]
    for i, (w, m, l, d, o) in enumerate(grid):
        row: dict[str, Any] = dict(workload=w, mesh=m, layout=l, dtype=d, options=o, implementation=IMPLEMENTATION,
                                   xla=True, device="CPU")
        try:
            row.update(run_case(w, m, l, d, o, steps=args.steps, warmup=args.warmup, check=not args.no_check),
                       status="ok")
            tol = reference64.TOLERANCE.get(d)
            if row["max_rel_err"] is not None and tol is not None and not row["max_rel_err"] <= tol:
                row.update(status="mismatch", error=f"max_rel_err {row['max_rel_err']:.3g} > tolerance {tol:g} "
                                                    "against dsgd's float64 model")
        except Exception as e:  # noqa: BLE001 - recorded; the sweep goes on
            row.update(status="failed", error=f"{type(e).__name__}: {e}")
        rows.append(row)
        if not args.quiet:
            msg = f"{row['median_ms']:.3g} ms" if "median_ms" in row else ""
            msg += f" ({row['status']}: {row['error'][:160]})" if row["status"] != "ok" else ""
            print(f"[{i + 1}/{len(grid)}] {w} | {m} | {l} | {d} | {o}: {msg}", file=sys.stderr)

    out = render(rows, args.format)
    if args.output:
        Path(args.output).write_text(render(rows, "csv" if args.format == "table" else args.format))
    print(out)
    return 0 if all(r["status"] == "ok" for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
