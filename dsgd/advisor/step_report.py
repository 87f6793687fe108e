"""The whole-step advisor's output: a ranked table that fits in :data:`WIDTH` columns with the reason for
each place in its last column, then the details (collectives as DTensor ran them, memory, the predicted
breakdown, what was left out and why, the target mesh), JSON, and the layout map of a plan."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from dsgd.advisor.measurements import jsonable

WIDTH = 120


def _f(x, fmt: str = "{:.1f}", na: str = "-") -> str:
    try:
        if x is None or x != x or (isinstance(x, float) and math.isinf(x)):
            return na
    except TypeError:
        return na
    return fmt.format(x)


def _mib(b) -> str:
    return _f(b / 2**20 if b is not None and b == b else None, "{:.2f}")


def _ms(x) -> str:
    """A time in ms with 3 significant digits (a target's parts can be microseconds)."""
    if x is None or x != x:
        return "-"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def fit_table(header: list, rows: list, width: int = WIDTH, wrap_last: bool = True) -> list:
    """Rows of cells as lines no wider than ``width``: every column as wide as its widest cell (numbers
    right-aligned), the last column given what is left and cut with an ellipsis."""
    cols = len(header)
    widths = [max(len(str(r[c])) for r in [header] + rows) for c in range(cols - 1)]
    used = sum(widths) + 2 * (cols - 1)
    last = max(10, width - used)

    def cell(c, v):
        s = str(v)
        if c == cols - 1:
            return s if len(s) <= last else s[:last - 1] + "…"
        return s.rjust(widths[c]) if c >= 2 else s.ljust(widths[c])

    return ["  ".join(cell(c, r[c]) for c in range(cols)).rstrip() for r in [header] + rows]


def render_table(advice) -> list:
    df = advice.table
    header = ["#", "plan", "step ms", "±%", "floor", "dsgd", "pred ms", "coll MiB", "mem MiB", "why (ranked by step ms)"]
    rows = []
    for r in df.to_dict(orient="records"):
        rows.append([f"{r['rank']}{'*' if r['recommended'] else ''}", r["plan"], _f(r["step_ms"]),
                     _f(100 * r["spread"], "{:.0f}") if r["spread"] == r["spread"] else "-", _f(r["floor_ms"]),
                     _f(r["share_ms"]), _f(r["pred_ms"]), _mib(r["coll_bytes"]), _mib(r["mem_bytes"]), r["why"]])
    return fit_table(header, rows)


def render(advice, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(advice_dict(advice), indent=1, default=str)
    if fmt == "csv":
        cols = [c for c in advice.table.columns if c not in ("pred", "program", "coll_by_axis")]
        return advice.table[cols].to_csv(index=False)
    return "\n".join(wrap_lines(render_lines(advice)))


def wrap_lines(lines: list, width: int = WIDTH) -> list:
    """Lines longer than ``width`` wrapped at spaces, continuations indented under their first word."""
    import textwrap

    out = []
    for line in (part for text in lines for part in text.split("\n")):
        if len(line) <= width:
            out.append(line)
            continue
        lead = len(line) - len(line.lstrip(" "))
        bullet = 2 if line.lstrip().startswith("- ") else 0
        out += textwrap.wrap(line, width, subsequent_indent=" " * (lead + bullet + 2), break_on_hyphens=False)
    return out


def render_lines(advice) -> list:
    g = advice.graph
    out = [f"dsgd layouts: {advice.model} ({g.params:,} parameters, {len(g.variables())} variables), whole "
           f"model.fit step on {advice.devices} devices, global batch {advice.batch_size}, loss {advice.loss}, "
           f"dsgd {advice.implementation!r} ({advice.options})"]
    out.append("")
    out += render_table(advice)
    out.append(f"step ms: the {getattr(advice, 'statistic', 'median')} measured step (±%: interquartile range / "
               "median), all plans timed interleaved in "
               "one process; floor: the same step with the no-update optimizer; dsgd: step - floor, the optimizer's "
               "share; pred ms: the step model (below); coll MiB: collectives' payload per device per step, as DTensor "
               "ran it; mem MiB: params + slots (exact) + the step's transient peak (activations, gradients, buffers; "
               "estimated), per device; * recommended.")
    rec = advice.recommended()
    if rec is not None:
        out.append(f"\nrecommended: {rec['plan']} -- {rec['description']}")
    out.append("\ncollectives per step (as DTensor ran them, per device):")
    for r in advice.table.to_dict(orient="records"):
        out.append(f"  {r['plan']}: {r.get('collectives', '-')}")
    out.append("\nmemory per device, MiB: params, grads, slots exact (from the layouts; checked on the devices); the "
               "step's transient peak estimated from DTensor's program (each op's output in its layout, alive until "
               "its last use, the ops in the executor's order), and the same of its tensors of 256 KiB or more "
               "(the only ones TensorFlow's CPU allocator counts) against that allocator (its peak over one step / "
               "devices; on CPU the devices share it and need not peak together, so this can read below a device's "
               "own peak, which scripts/per_device_memory.py measures in one client per device, with what the "
               "device held at its peak: the program's tensors, the collective runtime's buffers, the allocator's "
               "rounding):")
    for r in advice.table.to_dict(orient="records"):
        chk = {True: "exact", False: "MISMATCH", None: "not checked"}[r.get("state_exact")]
        tf = _mib(r.get("alloc_step_per_device")) if r.get("alloc_step_per_device") else "-"
        ratio = _f(r.get("transient_check"), "{:.2f}x") if r.get("transient_check") else "-"
        out.append(f"  {r['plan']}: params {_mib(r['params_bytes'])}, grads {_mib(r['grads_bytes'])}, slots "
                   f"{_mib(r['slots_bytes'])} ({chk}); step peak ~{_mib(r['transient_bytes'])} (>=256 KiB "
                   f"~{_mib(r.get('transient_seen_bytes'))}), TF {tf} ({ratio})")
    out.append("\npredicted step, ms (fixed / compute / collectives by axis / update), from microbenchmarks here:")
    for r in advice.table.to_dict(orient="records"):
        out.append(f"  {r['plan']}: {breakdown_text(r.get('pred'))}")
    h = advice.host
    out.append(f"  this host: {h.flops_per_s / 1e9:.0f} GFLOP/s, {h.bytes_per_s / 1e9:.1f} GB/s, {h.op_us:.1f} us/op, "
               f"{h.call_ms:.2f} ms/call (medians over the meshes' microbenchmarks)")
    if advice.spearman == advice.spearman:
        own = advice.measured_spearman
        out.append(f"  predicted vs measured ranking: Spearman {advice.spearman:.2f} over "
                   f"{int((advice.table['status'] == 'ok').sum())} plans"
                   + (f" (the measurement's own, even vs odd rounds: {own:.2f})" if own == own else ""))
    if advice.scaling_checks:
        exact = sum(1 for c in advice.scaling_checks if c["bytes_exact"])
        fl = sum(1 for c in advice.scaling_checks if c["flops_exact"])
        n = sum(1 for c in advice.scaling_checks if c["count_exact"])
        out.append(f"  one mesh's program predicting another's (same rule): collective bytes exact {exact}/"
                   f"{len(advice.scaling_checks)} (their count {n}), FLOPs exact {fl}/{len(advice.scaling_checks)}")
    out += render_left_out(advice.search, "left out")
    if advice.target is not None:
        out += render_target(advice)
    est = next((e for s, e in getattr(advice, "estimates", []) if s >= 15), None)
    out.append(f"\ntime taken: {advice.elapsed_s:.0f} s" + (f" (the progress bar's estimate of the total after 15 s: "
                                                            f"{est:.0f} s)" if est else ""))
    return out


def breakdown_text(pred: Optional[dict]) -> str:
    if not pred:
        return "-"
    colls = " + ".join(f"{k[5:]} {_ms(pred[k])}" for k in sorted(pred) if k.startswith("coll:"))
    return (f"{_ms(pred['fixed'])} / {_ms(pred['compute'])} / {colls or '0'} / {_ms(pred['update'])} = "
            f"{_ms(pred['total'])}")


def render_left_out(search, title: str) -> list:
    out = []
    if search.general:
        out.append("\nfacts for every plan:")
        out += [f"  - {g}" for g in search.general]
    if search.excluded:
        out.append(f"\n{title}:")
        seen = {}
        for e in search.excluded:
            seen.setdefault(e.reason, []).append(e.name)
        for reason, names in seen.items():
            out.append(f"  - {', '.join(names)}: {reason}")
    return out


def render_target(advice) -> list:
    hw = advice.hardware
    out = [f"\npredicted on {advice.target_mesh} ({advice.target_devices} devices, global batch "
           f"{advice.target_batch}) with {hw.name}:"]
    header = ["#", "plan", "pred ms", "fixed", "compute", "collectives", "update", "coll MiB", "mem MiB", "why"]
    rows = []
    for r in advice.target.to_dict(orient="records"):
        p = r.get("pred") or {}
        colls = " ".join(f"{k[5:]}={_ms(p[k])}" for k in sorted(p) if k.startswith("coll:"))
        rows.append([f"{r['rank']}{'*' if r['recommended'] else ''}", r["plan"], _ms(r["pred_ms"]),
                     _ms(p.get("fixed")), _ms(p.get("compute")), colls or "-", _ms(p.get("update")),
                     _mib(r["coll_bytes"]), _mib(r["mem_bytes"]), r["why"] if p else r["note"]])
    out += fit_table(header, rows)
    for r in advice.target.to_dict(orient="records"):
        out.append(f"  {r['plan']}: {r['note']}")
    out.append("  validated here: the collective bytes and FLOPs of one mesh's program scaled to another mesh of the "
               "same rule (exact or not, above), and the step model's ranking on the meshes measured here.  Not "
               "validated: the hardware's rates and links (see its file's \"source\"), collectives across nodes, and "
               "DTensor's program on an accelerator (scaled from the CPU program, where all-gathers run as "
               "all-reduces of the whole tensor).")
    if advice.target_search is not None:
        out += render_left_out(advice.target_search, f"left out on {advice.target_mesh}")[2:] if \
            advice.target_search.general else render_left_out(advice.target_search, f"left out on {advice.target_mesh}")
    return out


def advice_dict(advice) -> dict:
    from dsgd.advisor.measurements import records

    rec = advice.recommended()
    drop = ("program",)
    return jsonable({
        "model": advice.model, "devices": advice.devices, "batch_size": advice.batch_size, "loss": advice.loss,
        "options": advice.options, "implementation": advice.implementation, "parameters": advice.graph.params,
        "plans": [{k: v for k, v in r.items() if k not in drop} for r in records(advice.table)],
        "recommended": None if rec is None else {"plan": rec["plan"], "mesh": rec["mesh"],
                                                 "layouts": advice.plan(rec["plan"]).layout_map(advice.graph)},
        "left_out": [{"plan": e.name, "mesh": e.mesh, "reason": e.reason} for e in advice.search.excluded],
        "facts": advice.search.general, "spearman": advice.spearman,
        "measured_spearman": advice.measured_spearman, "scaling_checks": advice.scaling_checks,
        "calibration": advice.calibration, "host": vars(advice.host) | {"links": {}},
        "target_mesh": advice.target_mesh, "target_batch": advice.target_batch,
        "target": records(advice.target) if advice.target is not None else None,
        "hardware": None if advice.hardware is None else {"name": advice.hardware.name, "source": advice.hardware.source},
        "elapsed_s": advice.elapsed_s, "estimates": getattr(advice, "estimates", []),
    })


def write_layout_map(advice, path: str, plan_name: Optional[str] = None, where: str = "local") -> dict:
    """Write ``{"mesh", "plan", "layouts"}`` for the recommended plan (or ``plan_name``): what
    :func:`dsgd.layoutmap.load_layout_map` turns into a tf_keras ``LayoutMap`` the model builds under."""
    if where == "target" and advice.target is not None:
        recs = advice.target[advice.target["recommended"]]
        name = plan_name or (recs.iloc[0]["plan"] if len(recs) else None)
        plans = advice.target_search.plans
    else:
        rec = advice.recommended()
        name = plan_name or (rec["plan"] if rec is not None else None)
        plans = advice.search.plans
    if name is None:
        raise ValueError("no plan could be recommended; no layout map written")
    p = next(x for x in plans if x.name == name)
    doc = {"mesh": p.mesh_spec, "plan": p.name, "description": p.description, "layouts": p.layout_map(advice.graph)}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


__all__ = ["render", "render_lines", "render_table", "fit_table", "advice_dict", "write_layout_map", "WIDTH"]
