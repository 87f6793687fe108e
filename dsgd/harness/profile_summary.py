"""Profile summaries without the UI (the ledger and the diff of two commits: :mod:`dsgd.harness.profile_ledger`).

Everything here reads files that ``dsgd profile`` wrote (``.xplane.pb`` traces, HLO text) and
returns plain data (dicts, pandas frames) that tests check and renderers print:

* :func:`summarize_xplane` — xprof's headless converters
  (``xprof.convert.raw_to_tool_data.xspace_to_tool_data``) for ``framework_op_stats``,
  ``kernel_stats`` and ``memory_profile``, plus the HLO modules the profiler stored in the
  trace's ``/host:metadata`` plane (one ``HloProto`` per compiled XLA program) and their fusions;
* :func:`hlo_text_stats` — module and fusion counts of HLO text files (``XLA_FLAGS=--xla_dump_to``
  and :func:`dsgd.impl.xla.capture_hlo`);
* :func:`op_type_rows` — self time and occurrences per op type and step (a whole step's
  breakdown), and :func:`render_op_type_comparison` of a floor's and optimizers' breakdowns;
* :func:`memory_at_peak` — what each allocator held at its peak (xprof's ``memory_profile``): the
  program's tensors, the collective runtime's own buffers and the allocator's rounding.

Step time is never taken from xprof (its step detection on CPU is unreliable); it comes from the
harness (:mod:`dsgd.harness.measure`).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterable, Optional, Sequence


# ------------------------------------------------------------------------------ xprof
def find_xplanes(run_dir: str) -> list[str]:
    """The ``.xplane.pb`` files of the newest profiler session under ``run_dir``."""
    sessions = sorted(glob.glob(os.path.join(run_dir, "plugins", "profile", "*")))
    for s in reversed(sessions):
        files = sorted(glob.glob(os.path.join(s, "*.xplane.pb")))
        if files:
            return files
    return []


def xprof_table(paths: Sequence[str], tool: str) -> list[dict]:
    """The rows of an xprof tool's (first) data table as dicts (column id -> value)."""
    from xprof.convert import raw_to_tool_data

    data, _ = raw_to_tool_data.xspace_to_tool_data(list(paths), tool, {})
    if not data:
        return []
    j = json.loads(data)
    t = j[0] if isinstance(j, list) else j
    cols = [c["id"] for c in t.get("cols", [])]
    return [dict(zip(cols, [c.get("v") if isinstance(c, dict) else None for c in row["c"]])) for row in t.get("rows", [])]


def xprof_json(paths: Sequence[str], tool: str) -> dict:
    from xprof.convert import raw_to_tool_data

    data, _ = raw_to_tool_data.xspace_to_tool_data(list(paths), tool, {})
    return json.loads(data) if data else {}


def memory_at_peak(paths: Sequence[str]) -> dict:
    """Per allocator, the allocations alive at its peak within the trace, as TensorFlow's profiler
    attributes them (``memory_profile``'s ``activeAllocations``; the peak is the allocator's own):

    * ``tensors``: the bytes requested by the traced program's ops (their outputs, temporaries);
    * ``collective_buffers``: the collective runtime's own (``CollectiveAdapterImpl::TempChunk``: on
      CPU a ring all-reduce receives each chunk into one), which the program does not name;
    * ``allocator_slack``: what the allocator gave beyond the tensors' requests (the BFC allocator
      hands a whole free chunk to a request it cannot split off);
    * ``peak_bytes``: the allocator's peak (including what was allocated before the trace began),
      and ``top``: the largest tensors, ``(op, shape, requested bytes)``;
    * ``tensors_peak``: the most bytes the program's tensors held at any one time (the same requests,
      followed allocation by allocation): while a large collective runs, the allocator peaks with its
      buffers, and the tensors alone may have held more at another moment;
    * ``smallest_traced``: the smallest request the trace recorded.  On CPU with oneDNN (TensorFlow's
      default) none under 256 KiB was recorded here: smaller ones go to oneDNN's small-size allocator,
      which records no events, so every figure above leaves them out.

    Memory events are recorded only within the trace: allocations made before it (variables) count
    in ``peak_bytes`` only."""
    peaks = _tensor_peaks(paths)
    out = {}
    for name, a in xprof_json(paths, "memory_profile").get("memoryProfilePerAllocator", {}).items():
        snaps = a.get("memoryProfileSnapshots", [])
        res = {"peak_bytes": int(a.get("profileSummary", {}).get("peakBytesUsageLifetime", 0)),
               "tensors": 0, "collective_buffers": 0, "allocator_slack": 0, "top": []}
        for e in a.get("activeAllocations", []):
            k = int(e.get("snapshotIndex", -1))
            if k < 0:  # the allocator's specials: unused reserve, stack -- nothing the step holds
                continue
            m = snaps[k].get("activityMetadata", {})
            n = int(e.get("numOccurrences", 1))
            got, asked = int(m.get("allocationBytes", 0)) * n, int(m.get("requestedBytes", 0)) * n
            op = m.get("tfOpName") or ""
            if _runtime_buffer(op, m.get("regionType")):
                res["collective_buffers"] += got
                continue
            res["tensors"] += asked
            res["allocator_slack"] += got - asked
            res["top"].append((op, m.get("tensorShape"), asked))
        res["top"] = sorted(res["top"], key=lambda t: -t[2])[:10]
        res["tensors_peak"], res["smallest_traced"] = peaks.get(name, (None, None))
        out[name] = res
    return out


def _runtime_buffer(op: str, region: Optional[str] = None) -> bool:
    """An allocation of the collective runtime's own (not one of the program's tensors)."""
    return "Collective" in op and region != "output" and "StatefulPartitionedCall" not in op


def _stat_value(stat, names: dict):
    """An XStat's value: a string (inline, or by reference to the plane's stat metadata) or a number."""
    if stat.str_value or stat.ref_value:
        return stat.str_value or names.get(stat.ref_value)
    return stat.int64_value or stat.uint64_value


def _tensor_peaks(paths: Sequence[str]) -> dict:
    """Per allocator, ``(the most bytes requested by the program's tensors alive at once, the smallest
    request recorded)``, from the trace's ``MemoryAllocation`` / ``MemoryDeallocation`` events in time
    order (matched by address)."""
    events = []
    for _, xs in _xspaces(paths):
        for plane in xs.planes:
            names = {k: v.name for k, v in plane.stat_metadata.items()}
            for line in plane.lines:
                for ev in line.events:
                    kind = plane.event_metadata[ev.metadata_id].name
                    if kind in ("MemoryAllocation", "MemoryDeallocation"):
                        st = {names.get(x.metadata_id): _stat_value(x, names) for x in ev.stats}
                        events.append((line.timestamp_ns * 1000 + ev.offset_ps, kind == "MemoryAllocation", st))
    live: dict = {}
    held: dict = {}
    peak: dict = {}
    smallest: dict = {}
    for _, alloc, st in sorted(events, key=lambda e: e[0]):
        who, addr, asked = st.get("allocator_name") or "", st.get("addr"), int(st.get("requested_bytes") or 0)
        if alloc:
            smallest[who] = min(smallest.get(who, asked), asked)
        if alloc and not _runtime_buffer(st.get("tf_op") or ""):
            live[(who, addr)] = asked
            held[who] = held.get(who, 0) + asked
            peak[who] = max(peak.get(who, 0), held[who])
        elif not alloc and (who, addr) in live:
            held[who] -= live.pop((who, addr))
    return {who: (peak.get(who, 0), smallest[who]) for who in smallest}


def _xspaces(paths: Sequence[str]):
    """``(path, XSpace)`` of each trace file, parsed (one reader for every summary below)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    for p in paths:
        xs = xplane_pb2.XSpace()
        with open(p, "rb") as f:
            xs.ParseFromString(f.read())
        yield p, xs


def trace_hlo_modules(paths: Sequence[str]) -> list[tuple[str, int]]:
    """``(module name, fusion count)`` of every HLO module the profiler stored in the trace.

    TensorFlow's profiler puts one ``HloProto`` (the optimised module) per XLA executable that
    ran during the trace into the ``/host:metadata`` plane; a path that executes no XLA has none.
    """
    from tensorflow.compiler.xla.service import hlo_pb2

    out = []
    for p, xs in _xspaces(paths):
        for plane in xs.planes:
            if plane.name != "/host:metadata":
                continue
            stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
            for em in plane.event_metadata.values():
                for st in em.stats:
                    if stat_names.get(st.metadata_id) != "Hlo Proto" or not st.bytes_value:
                        continue
                    proto = hlo_pb2.HloProto()
                    proto.ParseFromString(st.bytes_value)
                    fusions = sum(1 for c in proto.hlo_module.computations for i in c.instructions
                                  if i.opcode == "fusion")
                    out.append((em.name, fusions))
    return out


EAGER_PREFIX = "EagerLocalExecute: "
FUNCTION_PREFIXES = ("__inference_", "__forward_", "__backward_")  # tf.functions: their op already is a TF op


def annotate_eager_ops(paths: Sequence[str]) -> int:
    """Make xprof count eagerly executed single ops; returns how many events were annotated.

    On CPU the host tracer records an eager op as ``EagerLocalExecute: <op>`` (dispatch and the
    kernel, which runs inline) with no ``<name>:<type>`` event inside -- so xprof's framework op
    stats and overview, which count only TensorFlow ops, see nothing but idle time in an eager
    step (dsgd's default: a few custom-kernel calls).  xprof also counts any host event that
    carries a ``tf_op`` stat (``name:type``); this adds that stat, ``<op>:<op>``, to every
    ``EagerLocalExecute`` event of a single op (tf.function calls already hold a TensorFlow op
    event and are left alone).  Nothing else in the trace changes; a file already annotated is
    left as it is.
    """
    total = 0
    for p, xs in _xspaces(paths):
        changed = 0
        for plane in xs.planes:
            if not plane.name.startswith("/host:"):
                continue
            sid = next((k for k, v in plane.stat_metadata.items() if v.name == "tf_op"), None)
            if sid is None:
                sid = max(list(plane.stat_metadata.keys()) + [0]) + 1
                plane.stat_metadata[sid].id = sid
                plane.stat_metadata[sid].name = "tf_op"
            for line in plane.lines:
                for ev in line.events:
                    name = plane.event_metadata[ev.metadata_id].name
                    if not name.startswith(EAGER_PREFIX) or any(st.metadata_id == sid for st in ev.stats):
                        continue
                    op = name[len(EAGER_PREFIX):]
                    if not op or op.startswith(FUNCTION_PREFIXES):
                        continue
                    st = ev.stats.add()
                    st.metadata_id = sid
                    st.str_value = f"{op}:{op}"
                    changed += 1
        if changed:
            tmp = p + ".tmp"
            with open(tmp, "wb") as f:
                f.write(xs.SerializeToString())
            os.replace(tmp, p)
        total += changed
    return total


def hlo_op_rows(paths: Sequence[str]) -> list[dict]:
    """Per HLO instruction: occurrences and time, from the XLA CPU runtime's host-thread events.

    XLA on CPU runs its thunks on host threads and the profiler records each as an event with
    ``hlo_op`` / ``hlo_module`` / ``program_id`` stats; xprof's HLO op stats and op profile read
    only device planes (GPU, TPU), so on CPU they stay empty.  This is the same table from the
    host events: ``module``, ``hlo_op``, ``occurrences``, ``total_us``, ``avg_us``, ``pct``.
    """
    agg: dict[tuple[str, str], list[float]] = {}
    for p, xs in _xspaces(paths):
        for plane in xs.planes:
            if not plane.name.startswith("/host:"):
                continue
            names = {k: v.name for k, v in plane.stat_metadata.items()}
            ids = {v: k for k, v in names.items()}
            op_id, mod_id = ids.get("hlo_op"), ids.get("hlo_module")
            if op_id is None:
                continue

            def text(st) -> str:
                # stats hold a string, or a reference to a stat metadata whose name is the string
                return st.str_value or (names.get(st.ref_value, "") if st.ref_value else str(st.int64_value))

            for line in plane.lines:
                for ev in line.events:
                    md = plane.event_metadata[ev.metadata_id]
                    stats = {st.metadata_id: st for st in list(md.stats) + list(ev.stats)}
                    if op_id not in stats:
                        continue
                    module = short_module(text(stats[mod_id])) if mod_id in stats else "?"
                    a = agg.setdefault((module, md.name), [0.0, 0.0])
                    a[0] += 1
                    a[1] += ev.duration_ps / 1e6
    total = sum(t for _, t in agg.values()) or 1.0
    rows = [{"module": m, "hlo_op": op, "occurrences": int(n), "total_us": round(t, 3),
             "avg_us": round(t / n, 3) if n else 0.0, "pct": round(100.0 * t / total, 2)}
            for (m, op), (n, t) in agg.items()]
    return sorted(rows, key=lambda r: -r["total_us"])


def short_module(name: str) -> str:
    """An XLA module name without TensorFlow's compile-options suffix (``__XlaMustCompile_...``)."""
    return re.sub(r"__XlaMustCompile.*$", "", name)


def markdown_table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    """Rows as a Markdown table (TensorBoard's Text tab renders it)."""
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def eager_op_rows(paths: Sequence[str]) -> list[dict]:
    """framework_op_stats-like rows from the host plane's ``EagerLocalExecute: <op>`` events.

    On CPU, xprof's op statistics leave out eagerly executed single ops; the host tracer still
    records one event per op dispatch (its wall time includes the kernel, which runs inline).
    """
    agg: dict[str, list[float]] = {}
    for p, xs in _xspaces(paths):
        for plane in xs.planes:
            if not plane.name.startswith("/host:"):
                continue
            for line in plane.lines:
                for ev in line.events:
                    name = plane.event_metadata[ev.metadata_id].name
                    if name.startswith(EAGER_PREFIX):
                        a = agg.setdefault(name[len(EAGER_PREFIX):], [0.0, 0.0])
                        a[0] += 1
                        a[1] += ev.duration_ps / 1e6
    return [{"type": op, "operation": op, "occurrences": n, "total_self_time": us} for op, (n, us) in agg.items()]


def op_type_rows(paths: Sequence[str], steps: int) -> list[dict]:
    """Per op type: self time (ms) and occurrences per step, summed over every device's thread,
    largest first (xprof's framework op stats; eagerly executed ops from the host plane)."""
    steps = max(int(steps), 1)
    rows = [r for r in xprof_table(paths, "framework_op_stats") if r.get("type") != "IDLE"] or eager_op_rows(paths)
    agg: dict[str, list[float]] = {}
    for r in rows:
        a = agg.setdefault(str(r.get("type")), [0.0, 0.0])
        a[0] += float(r.get("total_self_time") or 0) / 1e3 / steps
        a[1] += float(r.get("occurrences") or 0) / steps
    total = sum(ms for ms, _ in agg.values()) or 1.0
    return [{"type": t, "self_ms_per_step": round(ms, 3), "per_step": round(n, 2), "pct": round(100 * ms / total, 1)}
            for t, (ms, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])]


def render_op_type_comparison(tables: dict, medians: dict, top: int = 12) -> str:
    """``tables``: name -> :func:`op_type_rows` (the first name the floor); one row per op type, each
    name's self ms per step (and ops per step), the op types that differ most from the floor first,
    then the totals and the measured step medians."""
    names = list(tables)
    by = {n: {r["type"]: r for r in tables[n]} for n in names}
    floor = by[names[0]]
    types = {t for n in names for t in by[n]}
    spread = {t: max(abs(by[n].get(t, {}).get("self_ms_per_step", 0.0) - floor.get(t, {}).get("self_ms_per_step", 0.0))
                     for n in names) for t in types}
    shown = sorted(types, key=lambda t: -spread[t])[:top]
    width = max([len("op type")] + [len(t) for t in shown])
    head = f"{'op type':<{width}}" + "".join(f"  {n[:18]:>18}" for n in names)
    lines = [head, f"{'':<{width}}" + "".join(f"  {'ms/step (ops/step)':>18}" for _ in names)]
    for t in shown:
        cells = []
        for n in names:
            r = by[n].get(t)
            text = "{:.1f} ({:.0f})".format(r["self_ms_per_step"], r["per_step"]) if r else "-"
            cells.append(f"  {text:>18}")
        lines.append(f"{t:<{width}}" + "".join(cells))
    totals = [sum(r["self_ms_per_step"] for r in tables[n]) for n in names]
    lines.append(f"{'all op types':<{width}}" + "".join(f"  {t:>18.1f}" for t in totals))
    meds = ["-" if medians.get(n) is None else f"{medians[n]:.1f}" for n in names]
    lines.append(f"{'step (median ms)':<{width}}" + "".join(f"  {m:>18}" for m in meds))
    return "\n".join(lines)


def _program_name(module: str) -> str:
    """A module name without the per-executable ``(N)`` suffix: the program it compiles."""
    return re.sub(r"\(\d+\)$", "", module)


def summarize_xplane(paths: Sequence[str], steps: int, top: int = 5) -> dict:
    """Per-step numbers from a trace of ``steps`` annotated steps (xprof, headless)."""
    steps = max(int(steps), 1)
    rows = [r for r in xprof_table(paths, "framework_op_stats") if r.get("type") != "IDLE"]
    if not rows:  # a step of eager single ops only (the local domain): xprof lists no framework ops
        rows = eager_op_rows(paths)
    occurrences = sum(float(r.get("occurrences") or 0) for r in rows)
    self_us = sum(float(r.get("total_self_time") or 0) for r in rows)
    by_time = sorted(rows, key=lambda r: -float(r.get("total_self_time") or 0))[:top]
    top_ops = [{"type": r["type"], "name": str(r.get("operation"))[:120],
                "self_us_per_step": round(float(r.get("total_self_time") or 0) / steps, 1),
                "pct": round(100.0 * float(r.get("total_self_time") or 0) / self_us, 1) if self_us else 0.0}
               for r in by_time]
    try:
        kernels = sum(float(r.get("occurrences") or 0) for r in xprof_table(paths, "kernel_stats"))
    except Exception:  # noqa: BLE001 - no device kernels on CPU
        kernels = 0.0
    peak = None
    try:
        mem = xprof_json(paths, "memory_profile").get("memoryProfilePerAllocator", {})
        peaks = [int(a.get("profileSummary", {}).get("peakBytesUsageLifetime", 0)) for a in mem.values()]
        peak = max(peaks) if peaks else None
    except Exception:  # noqa: BLE001 - memory events are recorded only by tracking allocators
        peak = None
    modules = trace_hlo_modules(paths)
    hlo_ops = hlo_op_rows(paths)
    return {
        "ops_per_step": occurrences / steps,
        "op_types": len({r["type"] for r in rows}),
        "kernels_per_step": kernels / steps,
        "host_op_ms_per_step": self_us / steps / 1e3,
        "top_ops": top_ops,
        "hlo_modules": len(modules),
        "hlo_programs": len({_program_name(m) for m, _ in modules}),
        "fusions": sum(f for _, f in modules),
        "hlo_ops_per_step": sum(r["occurrences"] for r in hlo_ops) / steps,
        "top_hlo_ops": [dict(r, us_per_step=round(r["total_us"] / steps, 1)) for r in hlo_ops[:top]],
        "peak_bytes_in_use": peak,
    }


# ------------------------------------------------------------------------------ HLO text
def hlo_text_stats(files: Iterable[str]) -> dict:
    """Module and fusion counts of HLO text files (dump or capture_hlo output).

    ``before_optimizations`` files count modules; fusions are counted in the optimised ones.
    """
    from dsgd.impl.xla import count_fusions  # light: no TensorFlow work at import

    files = list(files)
    before = [f for f in files if "before_optimizations" in os.path.basename(f)]
    after = [f for f in files if re.search(r"after_optimizations(\.hlo)?\.txt$", os.path.basename(f))]
    fusions = 0
    for f in after:
        with open(f, errors="replace") as fh:
            fusions += count_fusions(fh.read())
    return {"modules": len(before), "optimized": len(after), "fusions": fusions}
