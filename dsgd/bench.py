"""``dsgd bench``: time one optimizer step across workloads, meshes, layouts, dtypes,
implementations and XLA on/off, side by side with tf_keras' reference, in one run.

Cases run in a worker process (:mod:`dsgd.isolate`) with the requested logical devices;
the numbers come from :mod:`dsgd.measure`; the table is rendered from a pandas frame.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from typing import Iterable, Optional, Sequence

import numpy as np

from dsgd import measure
from dsgd.measure import MODEL_MODES, MODES, NO_UPDATE, REFERENCE, Case

DEFAULT_WORKLOADS = ("one-big", "bert-mini", "many-small")
DEFAULT_MESHES = ("1", "batch=8", "batch=2,model=4")
DEFAULT_IMPLEMENTATIONS = ("auto", REFERENCE)
DEFAULT_MODELS = ("resmlp",)  # the train_step and fit modes' models (dsgd.models)
KEY = ["workload", "mesh", "layout", "dtype", "xla", "options", "mode"]

_COPY_GBPS: Optional[float] = None


def copy_gbps() -> float:
    global _COPY_GBPS
    if _COPY_GBPS is None:
        _COPY_GBPS = measure.copy_bandwidth_gbps()
    return _COPY_GBPS


def resolved_implementations(opt) -> str:
    """Which implementation(s) actually ran each group (for ``auto``)."""
    groups = getattr(opt, "plan", None)
    if groups is None:
        return REFERENCE
    names = sorted({n for g in groups for n in g.__dict__.get("_impls", {})})
    return "+".join(names) or "?"


def _row(built, t_ms: np.ndarray) -> dict:
    """The result row of one built case from its per-step times (ms)."""
    row = asdict(built.case)
    b = measure.bytes_for_case(built)
    bw = copy_gbps()
    median = float(np.median(t_ms))
    row.update(
        status="ok",
        first_step_s=built.first_step_s,
        impl_used=NO_UPDATE if built.case.implementation == NO_UPDATE else resolved_implementations(built.optimizer),
        steps=len(t_ms),
        median_ms=median,
        p10_ms=float(np.percentile(t_ms, 10)),
        p90_ms=float(np.percentile(t_ms, 90)),
        min_ms=float(t_ms.min()),
        params=b.params_total,
        param_bytes_per_device=b.params_per_device,
        state_bytes_per_device=measure.optimizer_state_bytes(built.optimizer),  # what the slots hold (ZeRO-1 too)
        traffic_bytes=b.step_traffic_total,
        achieved_gbps=b.step_traffic_total / (median * 1e-3) / 1e9,
        copy_gbps=bw,
        roofline_ms=b.step_traffic_total / (bw * 1e9) * 1e3,
    )
    row["roofline_frac"] = row["roofline_ms"] / median
    return row


def run_case(payload: dict) -> dict:
    """Measure one case (a :class:`Case` as a dict plus ``steps``); returns a result row."""
    steps = int(payload.pop("steps", 10))
    built = measure.build_case(Case(**payload))
    measure.time_first_step(built)
    return _row(built, measure.time_steps(built.step, steps=steps, warmup=1) * 1e3)


BLOCK = 4  # timed steps per implementation per round of run_paired


def run_paired(payload: dict) -> dict:
    """Measure several implementations of one configuration side by side, in one process.

    ``payload``: a :class:`Case` as a dict whose ``implementation`` is a list, plus ``steps``.
    Each implementation is built and its first step timed on its own; then their steps are
    interleaved in rounds (every implementation once per round, in reverse order on odd
    rounds), so a slow spell of the machine falls on all of them alike and their ratio holds.
    In a round an implementation runs one untimed step, then :data:`BLOCK` timed ones: every
    timed step follows a step of its own, as in a loop of steps (and as when measured alone),
    not a step of another implementation that left the caches full of its own buffers.
    Returns ``{"rows": [one row per implementation, in order]}``; an implementation that
    fails is a failed row and the others are still measured.
    """
    steps = int(payload.pop("steps", 10))
    impls = list(payload.pop("implementation"))
    built: dict[int, measure.Built] = {}
    rows: list[Optional[dict]] = [None] * len(impls)
    for k, impl in enumerate(impls):
        try:
            b = measure.build_case(Case(**payload, implementation=impl))
            measure.time_first_step(b)
            b.step()  # warm-up
            measure.sync()
            built[k] = b
        except Exception as e:  # noqa: BLE001 - recorded as failed; the others go on
            rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    times: dict[int, list[float]] = {k: [] for k in built}
    rounds = -(-steps // BLOCK)
    for r in range(rounds):
        for k in (list(built) if r % 2 == 0 else list(built)[::-1]):
            if k not in times:
                continue
            try:  # the warm-up step is untimed: the caches were the other implementation's
                n = min(BLOCK, steps - len(times[k]))
                times[k].extend(measure.time_steps(built[k].step, steps=n, warmup=1) * 1e3)
            except Exception as e:  # noqa: BLE001
                rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                del times[k]
    for k, t in times.items():
        rows[k] = _row(built[k], np.asarray(t))
        rows[k]["paired"] = True
    return {"rows": rows}


def make_cases(workloads: Sequence[str], meshes: Sequence[str], layouts: Sequence[str], dtypes: Sequence[str],
               implementations: Sequence[str], xla: Sequence[bool], options: Sequence[str],
               device: str = "CPU", modes: Sequence[str] = ("eager",),
               models: Sequence[str] = DEFAULT_MODELS) -> list[Case]:
    """The grid.  ``eager``/``graph`` modes run the workloads; ``train_step``/``fit`` run the
    models (:mod:`dsgd.models`), each with a :data:`NO_UPDATE` row beside the implementations:
    the same step with gradients computed and nothing applied, the floor of the optimizer's share."""
    cases = []
    for mode in modes:
        names, impls = workloads, list(implementations)
        if mode in MODEL_MODES:
            names = models
            impls = impls + ([NO_UPDATE] if NO_UPDATE not in impls else [])
        for w, m, l, d, o, x, i in itertools.product(names, meshes, layouts, dtypes, options, xla, impls):
            cases.append(Case(workload=w, mesh=m, layout=l, dtype=d, implementation=i, xla=x, options=o,
                              device=device, mode=mode))
    return cases


def _jobs(cases: Sequence[Case], steps: int, paired: bool) -> list[tuple[str, dict, list[int]]]:
    """(worker function, payload, indices of the cases it measures) for each unit of work."""
    if not paired:
        return [("run_case", dict(asdict(c), steps=steps), [i]) for i, c in enumerate(cases)]
    by_config: dict[tuple, list[int]] = {}
    for i, c in enumerate(cases):
        config = tuple((k, v) for k, v in asdict(c).items() if k != "implementation")
        by_config.setdefault(config, []).append(i)
    jobs = []
    for config, idx in by_config.items():
        if len(idx) == 1:
            jobs.append(("run_case", dict(asdict(cases[idx[0]]), steps=steps), idx))
        else:
            jobs.append(("run_paired", dict(config, implementation=[cases[i].implementation for i in idx],
                                            steps=steps), idx))
    return jobs


def _split(res: dict, n: int) -> list[dict]:
    """A job's result as one result per case (a failed job fails each of its cases)."""
    if "rows" in res:
        return [r if r is not None else {"status": "failed", "error": "not measured"} for r in res["rows"]]
    return [res] * n if n > 1 else [res]


def run(cases: Sequence[Case], *, steps: int = 10, devices: int = 8, isolate: bool = True,
        progress: bool = True, on_row=None, paired: bool = True):
    """Run cases; returns a pandas DataFrame with one row per case (failed ones included).

    ``paired`` (the default): the implementations of one configuration are measured side by
    side in one process, their steps interleaved (:func:`run_paired`), so the speed-up is a
    ratio of times taken in the same moments; otherwise each case runs on its own.

    As a DTensor client (:mod:`dsgd.multiclient`) the cases run in this process, whatever
    ``isolate`` says: every client runs the same cases in the same order, each case's mesh
    spanning all clients (the cluster cannot be re-formed in a worker process).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from dsgd import multiclient

    client = multiclient.is_client()
    if client:
        isolate = False
    jobs = _jobs(cases, steps, paired)
    rows: list[Optional[dict]] = [None] * len(cases)
    bar = tqdm(total=len(cases), desc="dsgd bench", unit="case", disable=not progress, leave=False)

    def got(j, res):
        idx = jobs[j][2]
        for i, r in zip(idx, _split(res, len(idx))):
            row = dict(asdict(cases[i]))
            row.update(r)
            rows[i] = row
            bar.update(1)
            bar.set_postfix_str(cases[i].label[:60])
            if on_row:
                on_row(row)

    if isolate:
        from dsgd.isolate import run_isolated

        # one worker function per sweep keeps run_isolated's one-func interface
        payloads = [dict(p, _func=func) for func, p, _ in jobs]
        run_isolated("dsgd.bench:run_job", payloads, devices=devices, on_result=got,
                     device_type=cases[0].device if cases else "CPU")
    else:
        for j, (func, p, idx) in enumerate(jobs):
            try:
                res = run_job(dict(p, _func=func))
            except Exception as e:  # noqa: BLE001 - recorded as failed; the sweep goes on
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if client:  # a case failed on some clients only: the others may be stuck in it, stop all
                ok = all(r.get("status", "ok") == "ok" for r in _split(res, len(idx)))
                oks = multiclient.agree(f"bench-job-{j}", ok)
                if len(set(oks)) > 1:
                    bad = [k for k, o in enumerate(oks) if not o]
                    msg = f"case {cases[idx[0]].label} failed on client(s) {bad} only: {res.get('error', '')}"
                    multiclient.report_error(msg)
                    raise RuntimeError(msg)
            got(j, res)
    bar.close()
    return add_ratios(pd.DataFrame(rows))


def run_job(payload: dict) -> dict:
    """A worker's entry point: ``payload["_func"]`` is ``run_case`` or ``run_paired``."""
    func = payload.pop("_func", "run_case")
    return {"run_case": run_case, "run_paired": run_paired}[func](payload)


def add_ratios(df):
    """``speedup`` = reference median / this median, for the same configuration (:data:`KEY`).

    Whole-step modes (``train_step``, ``fit``) also get the optimizer's *share* of the step:
    ``share_ms`` = this median - the :data:`NO_UPDATE` median of the same configuration (the
    forward and backward pass alone), and ``share_speedup`` = the reference's share / this share.
    """
    if df.empty or "median_ms" not in df:
        return df
    if "mode" not in df:
        df["mode"] = "eager"
    ok_all = df[df["status"] == "ok"]
    ok = ok_all[ok_all["implementation"] == REFERENCE]
    ref = ok.set_index(KEY)["median_ms"].to_dict()
    ref_first = ok.set_index(KEY)["first_step_s"].to_dict()
    keys = list(zip(*(df[k] for k in KEY)))
    df["speedup"] = [ref.get(k, np.nan) / m if m == m else np.nan for k, m in zip(keys, df["median_ms"])]
    df["first_step_speedup"] = [ref_first.get(k, np.nan) / f if f == f else np.nan
                                for k, f in zip(keys, df.get("first_step_s", np.nan))]
    floor = ok_all[ok_all["implementation"] == NO_UPDATE].set_index(KEY)["median_ms"].to_dict()
    if floor:
        df["floor_ms"] = [floor.get(k, np.nan) for k in keys]
        df["share_ms"] = df["median_ms"] - df["floor_ms"]
        ref_share = {k: ref[k] - f for k, f in floor.items() if k in ref}
        df["share_speedup"] = [ref_share.get(k, np.nan) / sh if sh == sh and sh > 0 else np.nan
                               for k, sh in zip(keys, df["share_ms"])]
        df.loc[df["implementation"] == NO_UPDATE, ["speedup", "share_ms", "share_speedup"]] = np.nan
    return df


TABLE_COLUMNS = ["mode", "workload", "mesh", "layout", "dtype", "options", "xla", "implementation", "impl_used",
                 "median_ms", "p10_ms", "p90_ms", "speedup", "share_ms", "share_speedup", "first_step_s", "achieved_gbps", "roofline_ms", "roofline_frac",
                 "state_bytes_per_device", "status"]


def render(df, fmt: str = "table") -> str:
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=1)
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    view = df[cols].copy()
    if "xla" in view:
        view["xla"] = view["xla"].map({True: "on", False: "off"})
    if "state_bytes_per_device" in view:
        view["state_MiB/dev"] = view.pop("state_bytes_per_device") / 2**20
    text = view.to_string(index=False, float_format=lambda x: f"{x:.3g}", na_rep="-")
    failed = df[df["status"] != "ok"] if "status" in df else df.iloc[0:0]
    if len(failed):
        text += "\n\nfailed cases:\n" + "\n".join(
            f"  {r.workload}|{r.mesh}|{r.layout}|{r.dtype}|{r.implementation}: {str(r.error)[:200]}"
            for r in failed.itertuples())
    if "copy_gbps" in df and df["copy_gbps"].notna().any():
        text += f"\n\nroofline: copy bandwidth {df['copy_gbps'].dropna().median():.1f} GB/s measured in this run; " \
                "traffic per step = params x device copies x bytes x (5 momentum | 3 sgd, +2 EMA, +1 norm clip)"
    return text


def plot(df, path: str) -> None:
    """Bar chart of median step ms per case, dsgd vs reference, with the roofline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"].copy()
    ok["config"] = ok["workload"] + "\n" + ok["mesh"] + " " + ok["layout"] + " " + ok["dtype"]
    pivot = ok.pivot_table(index="config", columns="implementation", values="median_ms", aggfunc="median")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(pivot)), 5.5))
    pivot.plot.bar(ax=ax, logy=True, rot=45)
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor", fontsize=8)
    roof = ok.groupby("config")["roofline_ms"].median().reindex(pivot.index)
    ax.scatter(range(len(roof)), roof.values, marker="_", s=600, color="k", label="roofline", zorder=3)
    ax.set_ylabel("median ms per step (log)")
    ax.set_title("dsgd bench: one optimizer step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_external(df, paths: Sequence[str]):
    """Add rows measured by another tool in the same column format (e.g. scripts/bench_jax.py
    --format csv) so they sit beside dsgd and the reference, with speed-ups vs the reference."""
    import pandas as pd

    frames = [df]
    for p in paths:
        try:
            ext = pd.read_csv(p)
        except (OSError, ValueError) as e:
            raise ValueError(f"--compare file {p}: {e}") from None
        missing = [c for c in ("workload", "mesh", "layout", "dtype", "options", "implementation", "median_ms")
                   if c not in ext.columns]
        if missing:
            raise ValueError(f"--compare file {p} lacks columns {missing}")
        ext = ext.copy()
        ext["xla"] = False  # compared against the reference with XLA off
        ext["status"] = ext.get("status", "ok")
        frames.append(ext)
    return add_ratios(pd.concat(frames, ignore_index=True))


def parse_xla(value: str) -> list[bool]:
    return {"on": [True], "off": [False], "both": [False, True]}[value]


def main(args) -> int:
    from dsgd import meshspec, multiclient

    meshes = args.mesh or DEFAULT_MESHES
    client = multiclient.config_from_env() if multiclient.is_client() else None
    if client is not None and not args.mesh:  # multi-client: the default meshes that span all clients' devices
        n = client.global_devices
        meshes = [m for m in DEFAULT_MESHES if meshspec.mesh_size(meshspec.parse_mesh_spec(m)) == n] or [f"batch={n}"]
    lead = client is None or client.client_id == 0  # only client 0 reports
    cases = make_cases(args.workload or DEFAULT_WORKLOADS, meshes, args.layout or ["sharded"],
                       args.dtype or ["float32"], args.implementation or DEFAULT_IMPLEMENTATIONS, parse_xla(args.xla),
                       args.options or ["momentum"], device=args.device, modes=args.mode or MODES,
                       models=args.model or DEFAULT_MODELS)
    df = run(cases, steps=args.steps, devices=args.devices, isolate=not args.no_isolate,
             progress=not args.quiet and lead, paired=not args.sequential)
    if args.compare:
        df = merge_external(df, args.compare)
    code = 0 if (df["status"] == "ok").all() else 3
    if not lead:
        return code
    out = render(df, args.format)
    if args.output:
        with open(args.output, "w") as f:
            f.write(out if args.format != "table" else render(df, "csv"))
    print(out)
    if args.plot:
        plot(df, args.plot)
        print(f"\nplot written to {args.plot}")
    return code


def add_arguments(p) -> None:
    p.add_argument("--workload", action="append", help="one-big | bert-mini | many-small | resnet-ish | FILE.json (repeatable)")
    p.add_argument("--mesh", action="append", help="e.g. 1, batch=8, batch=2,model=4 (repeatable)")
    p.add_argument("--layout", action="append", help="replicated | sharded | LAYOUT_MAP.json (repeatable)")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--implementation", action="append",
                   help="auto | reference (tf_keras) | ops | fused | per_shard | grouped | xla | sharded_state (repeatable)")
    p.add_argument("--options", action="append", choices=sorted(measure.OPTION_PRESETS),
                   help="optimizer options preset (repeatable; default momentum)")
    p.add_argument("--mode", action="append", choices=list(MODES),
                   help="where the step runs (repeatable; default: all): eager = apply_gradients called eagerly "
                        "(tf_keras' reference in a tf.function, its faster mode); graph = apply_gradients inside a "
                        "tf.function for both; train_step = a whole custom tf.function training step of --model; "
                        "fit = one model.fit step of --model (both with a no-update floor row)")
    p.add_argument("--model", action="append",
                   help=f"model of the train_step and fit modes (repeatable; default {DEFAULT_MODELS[0]}: a residual "
                        "MLP, 8.7M parameters, global batch 16; resmlp-small: a tiny one)")
    p.add_argument("--xla", choices=["on", "off", "both"], default="off")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--devices", type=int, default=8, help="logical devices in the worker (default 8)")
    p.add_argument("--device", default="CPU", choices=["CPU", "GPU"])
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--output", "-o", help="also write results (csv for table) to this file")
    p.add_argument("--plot", help="write a bar chart PNG here")
    p.add_argument("--no-isolate", action="store_true", help="run cases in this process")
    p.add_argument("--sequential", action="store_true",
                   help="measure each case on its own (default: the implementations of one configuration "
                        "side by side, their steps interleaved; needs all of them in memory at once)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compare", action="append", metavar="CSV",
                   help="merge rows measured elsewhere, e.g. `python scripts/bench_jax.py --format csv -o jax.csv`")
