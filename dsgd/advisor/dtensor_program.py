"""What DTensor actually ran: the collectives and the compute of a training step, read from the MLIR
that DTensor dumps after each of its passes.

With ``TF_CPP_VMODULE=dtensor_mlir_passes=1`` and ``TF_DUMP_GRAPH_PREFIX=DIR`` set before TensorFlow
starts, DTensor writes ``DIR/dtensor.NNNN.dtensor_mlir.after_<Pass>.<function>.mlir`` when it compiles a
function for a mesh (:func:`dump_env`).  Of those files (TF 2.21's pass order):

* ``after_CSE`` -- the SPMD-expanded program, one device's view: every op with its local tensor types,
  ``_layout`` and ``_global_shape``; collectives as ``tf.DTensorAllReduce`` / ``DTensorAllGather`` /
  ``DTensorAllScatter`` (a local slice, no communication) with their group assignments;
* ``after_DTensorAllGatherLowering`` -- each all-gather lowered, on CPU, to a ``TensorStridedSliceUpdate``
  into zeros and an all-reduce of the full tensor: every collective is now a ``DTensorAllReduce`` with
  its tensor, layout and group assignment -- what :func:`summarize` counts, by kind and mesh axis;
* ``after_DTensorReduceScatterLowering`` -- after all-reduces of one group were combined into one
  (``DTensorAllReduceCombineOptimization``): the all-reduces the step issues, one per
  ``tf.CollectiveReduceV2`` of the final program (``...BreakUpIslands...``), which :func:`summarize`
  checks op for op.

Everything here is text parsing, no TensorFlow: tests feed it small programs.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from dsgd.advisor.dtensor_mlir import (  # noqa: F401 - parsing names re-exported: callers read them from here
    _DTYPE_BYTES, COMPUTE_OPS, DUMP_ENV, Op, TensorType, axis_partitions, const_value, contracted_factors, dump_env,
    function_files, group_axes, layout_hints, op_flops, parse_ops, parse_type, producers, scale_factor, stage_files,
    value_factors)

# ------------------------------------------------------------------------------ summaries
@dataclass
class Collective:
    """One collective (or all of one kind on one axis set, with ``count``): its payload per device."""

    kind: str  # "all-reduce" | "all-gather" | "reduce-scatter" | "all-to-all"
    axes: tuple
    group: int
    bytes: int  # per device, all of them together
    count: int = 1

    def to_dict(self) -> dict:
        return {"kind": self.kind, "axes": list(self.axes), "group": self.group, "bytes": self.bytes,
                "count": self.count}


@dataclass
class ProgramSummary:
    """A step's program as DTensor ran it, per device.

    ``collectives`` -- by (kind, axes), before DTensor merged them; ``issued`` -- by axes, the all-reduces
    the step issues (merged buffers padded), checked against the final program (``consistent``);
    ``terms`` -- each collective's tensor with its sharding factors, ``groups`` -- which terms each issued
    all-reduce carries; ``compute`` -- each MatMul / Einsum / Conv with its FLOPs and factors (output and
    summed-over dimensions); ``memory`` -- the other ops' output bytes, by factors.
    """

    collectives: list = field(default_factory=list)
    issued: list = field(default_factory=list)
    terms: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    compute: list = field(default_factory=list)
    memory: list = field(default_factory=list)
    flops: float = 0.0
    flops_by_op: dict = field(default_factory=dict)
    out_bytes: float = 0.0  # bytes every op of the expanded program writes and reads (per device)
    ops: int = 0  # ops of the final program (one device's), Const excluded
    peak_bytes: float = 0.0  # the most bytes of tensors alive at once in the final program (per device)
    peak_expanded: float = 0.0  # the same in the expanded program (before collectives are merged and lowered)
    peak_set: list = field(default_factory=list)  # {bytes, factors}: the expanded program's tensors at its peak
    final_collectives: int = 0
    final_bytes: int = 0
    consistent: bool = True
    files: list = field(default_factory=list)
    peak_seen_bytes: float = 0.0  # peak_bytes of the tensors of at least SEEN_BYTES alone

    def bytes_by_axes(self, issued: bool = True) -> dict:
        out: dict[tuple, int] = {}
        for c in (self.issued if issued else self.collectives):
            out[tuple(c.axes)] = out.get(tuple(c.axes), 0) + c.bytes
        return out

    def to_dict(self) -> dict:
        return {"collectives": [c.to_dict() for c in self.collectives], "issued": [c.to_dict() for c in self.issued],
                "terms": self.terms, "groups": self.groups, "compute": self.compute, "memory": self.memory,
                "flops": self.flops, "flops_by_op": self.flops_by_op, "out_bytes": self.out_bytes, "ops": self.ops,
                "peak_bytes": self.peak_bytes, "peak_expanded": self.peak_expanded, "peak_set": self.peak_set,
                "final_collectives": self.final_collectives, "final_bytes": self.final_bytes,
                "consistent": self.consistent, "files": self.files, "peak_seen_bytes": self.peak_seen_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "ProgramSummary":
        def colls(xs):
            return [Collective(c["kind"], tuple(c["axes"]), c["group"], c["bytes"], c["count"]) for c in xs]

        return cls(colls(d.get("collectives", [])), colls(d.get("issued", [])), d.get("terms", []),
                   d.get("groups", []), d.get("compute", []), d.get("memory", []), d.get("flops", 0.0),
                   d.get("flops_by_op", {}), d.get("out_bytes", 0.0), d.get("ops", 0), d.get("peak_bytes", 0.0),
                   d.get("peak_expanded", 0.0), d.get("peak_set", []), d.get("final_collectives", 0),
                   d.get("final_bytes", 0),
                   d.get("consistent", True), d.get("files", []), d.get("peak_seen_bytes", 0.0))


_COLL_OPS = ("DTensorAllReduce", "DTensorReduceScatter", "DTensorAllToAll")


def _all_to_all_axes(op: Op, mesh) -> tuple:
    """The mesh axes a ``DTensorAllToAll`` exchanges over: those that move to another dimension between its
    ``input_layout`` and ``output_layout`` (it has no group assignment operand)."""
    specs = [s.rstrip(",").split(",") for s in re.findall(r"_layout = #dtensor\.layout<sharding_specs:([^ ]*) mesh:",
                                                           op.attrs)]
    if len(specs) != 2:
        return ("?",)
    sizes = dict(mesh)
    moved = tuple(a for a in dict(mesh) if sizes[a] > 1 and
                  (a in specs[0]) and (a in specs[1]) and specs[0].index(a) != specs[1].index(a))
    return moved or ("?",)


def _coll_info(op: Op, prod: dict, mesh) -> dict:
    t = op.in_types[0] if op.in_types else TensorType(None, "f32")
    axes: tuple = ("?",)
    group = 0
    if op.name == "DTensorAllToAll":
        axes = _all_to_all_axes(op, mesh)
        group = math.prod(dict(mesh)[a] for a in axes) if axes != ("?",) else 0
    elif len(op.operands) > 1 and op.operands[1] in prod:
        groups = const_value(prod[op.operands[1]][0])
        if isinstance(groups, list) and groups and isinstance(groups[0], list):
            axes = group_axes(groups, mesh)
            group = len(groups[0])
    if op.name == "DTensorAllReduce":
        src = prod.get(op.operands[0]) if op.operands else None
        kind = "all-gather" if src is not None and src[0].name == "TensorStridedSliceUpdate" else "all-reduce"
    else:
        kind = {"DTensorReduceScatter": "reduce-scatter", "DTensorAllToAll": "all-to-all"}[op.name]
    out = {"kind": kind, "axes": list(axes), "group": group,
           "shape": list(t.shape) if t.shape is not None else None, "dtype_bytes": _DTYPE_BYTES.get(t.dtype, 4),
           "bytes": t.nbytes, "factors": value_factors(op, 0, mesh) or []}
    if kind == "reduce-scatter" and op.out_types and op.out_types[0].shape is not None:
        # its result (and layout) is the scattered piece; the tensor reduced is the group's pieces together
        out["scatter_elements"] = op.out_types[0].elements
    return out


def _aggregate(infos: list) -> list:
    agg: dict[tuple, Collective] = {}
    for c in infos:
        k = (c["kind"], tuple(c["axes"]))
        if k not in agg:
            agg[k] = Collective(c["kind"], tuple(c["axes"]), c["group"], 0, 0)
        agg[k].bytes += c["bytes"]
        agg[k].count += 1
    return sorted(agg.values(), key=lambda c: (c.axes, c.kind))


def _issued_groups(ops: list, mesh, terms: list) -> tuple[list, list]:
    """The all-reduces the step issues, each as the pre-combine collectives (``terms`` indices) it
    carries.  DTensor merges independent all-reduces of one group into one 1-D buffer (a ``Fill`` then a
    ``TensorStridedSliceUpdate`` of each flattened tensor) padded to a multiple of 1024 elements
    (``kAllReducePadding`` in TensorFlow's ``dtensor_allreduce_combine_optimization.cc``)."""
    prod = producers(ops)
    free: dict[tuple, list] = {}
    for i, t in enumerate(terms):
        free.setdefault((tuple(t["shape"] or ()), tuple(t["axes"])), []).append(i)
    groups, infos = [], []
    for op in ops:
        if op.name not in _COLL_OPS:
            continue
        info = _coll_info(op, prod, mesh)
        infos.append(info)
        chain, cur = [], op.operands[0] if op.operands else None
        while cur in prod and prod[cur][0].name == "TensorStridedSliceUpdate":
            chain.append(prod[cur][0])
            cur = prod[cur][0].operands[0]

        def flattened(tssu) -> Optional[tuple]:
            v = prod.get(tssu.operands[4]) if len(tssu.operands) > 4 else None
            if v is None or v[0].name != "Reshape" or not v[0].in_types or v[0].in_types[0].shape is None:
                return None
            return v[0].in_types[0].shape

        members = [flattened(t) for t in reversed(chain)]
        merged = bool(chain) and info["shape"] is not None and len(info["shape"]) == 1 and \
            all(m is not None for m in members) and (len(chain) >= 2 or (cur in prod and prod[cur][0].name == "Fill"))
        keys = [(tuple(m), tuple(info["axes"])) for m in members] if merged else \
            [(tuple(info["shape"] or ()), tuple(info["axes"]))]
        # the issued element type: DTensor all-reduces an int32 gather's padded buffer as int64 on CPU
        groups.append({"members": [free[k].pop(0) if free.get(k) else -1 for k in keys], "merged": merged,
                       "dtype_bytes": info["dtype_bytes"]})
    return groups, infos


def _inventory(ops: list, mesh) -> tuple[list, list, float, float, dict]:
    prod = producers(ops)
    hints = layout_hints(ops)
    compute, memory = [], {}
    flops = out_bytes = 0.0
    by_op: dict[str, float] = {}
    for op in ops:
        if op.name in COMPUTE_OPS:
            f = op_flops(op)
            flops += f
            by_op[op.name] = by_op.get(op.name, 0.0) + f
            compute.append({"op": op.name, "flops": f,
                            "factors": (value_factors(op, 0, mesh, hints) or []) + contracted_factors(op, prod, mesh, hints)})
        if op.name == "Const" or op.name.startswith("DTensor"):
            continue
        # memory traffic: what the op writes, and what it reads of other ops' results
        touched = [(op, k) for k in range(len(op.out_types))]
        touched += [prod[o] for o in op.operands if o in prod and prod[o][0].name != "Const"]
        for src, k in touched:
            t = src.out_types[k] if k < len(src.out_types) else None
            if t is None or t.shape is None or not t.elements:
                continue
            key = json.dumps(value_factors(src, k, mesh, hints) or [])
            memory[key] = memory.get(key, 0) + t.nbytes
            out_bytes += t.nbytes
    mem = [{"bytes": b, "factors": json.loads(k)} for k, b in memory.items()]
    return compute, mem, flops, out_bytes, by_op


#: ops whose results are no new buffer (they alias a variable or carry no data)
_ALIASING = ("Const", "ReadVariableOp", "Identity", "IdentityN", "StopGradient", "Reshape", "Squeeze", "ExpandDims",
             "DTensorLayout", "VarHandleOp")


#: The smallest allocation TensorFlow's CPU allocator counts here: oneDNN's (TensorFlow's default on
#: CPU) serves smaller requests from a pool that neither its statistics nor the profiler record (no
#: allocation under 262144 bytes in 21 profiled steps; a model whose tensors are all smaller reads 0).
SEEN_BYTES = 256 * 1024

#: Eigen's alignment on this host's TensorFlow (AVX-512): a slice starting on it can be a view
_ALIGN_BYTES = 64


def _views_input(op: Op) -> Optional[int]:
    """The operand a ``Slice`` / ``StridedSlice`` / ``Split`` result is a view of, or None.

    TensorFlow's kernels return a view instead of a copy when only the first dimension is cut and the
    cut falls on aligned addresses (``IsDim0SliceAligned`` in ``slice_op.cc``; ``strided_slice_op.cc``
    and ``split_op.cc`` alike): so DTensor's slices of a merged all-reduce buffer, or of a gathered
    weight, keep the whole buffer alive.  The offsets are runtime values; they are taken as aligned
    when the sizes are (the pieces of a packed buffer start at the sums of the earlier sizes)."""
    if op.name not in ("Slice", "StridedSlice", "Split") or not op.out_types:
        return None
    k = 1 if op.name == "Split" else 0  # Split(axis, value)
    if k >= len(op.in_types):
        return None
    src, out = op.in_types[k], op.out_types[0]
    if not src.shape or out.shape is None or len(src.shape) != len(out.shape) or src.shape[1:] != out.shape[1:]:
        return None
    item = src.nbytes // src.elements if src.elements else 0
    row = math.prod(src.shape[1:]) if len(src.shape) > 1 else out.shape[0]
    return k if item and row * item % _ALIGN_BYTES == 0 else None


def executor_order(ops: list) -> list:
    """``ops`` in the order TensorFlow's executor runs them: each op as soon as its operands are ready,
    the ready ones first come first served (its ready queue), not in the program's text order.

    It matters for memory: DTensor merges a step's gradient all-reduces into one buffer, filled by a
    chain of slice updates that the text places just before the all-reduce, but each update runs as
    soon as its gradient exists -- so the buffer is alive through the rest of the backward pass (the
    convnet's peaks, as each device's own allocator and TensorFlow's profiler show them)."""
    prod: dict[str, int] = {}
    for i, op in enumerate(ops):
        for r in op.results:
            prod[r] = prod[r.split("#")[0]] = i
    waiting, users = [], [[] for _ in ops]
    for i, op in enumerate(ops):
        deps = {prod[o] for o in op.operands if prod.get(o, i) != i}
        waiting.append(len(deps))
        for d in deps:
            users[d].append(i)
    ready = collections.deque(i for i, n in enumerate(waiting) if n == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(ops[i])
        for j in users[i]:
            waiting[j] -= 1
            if not waiting[j]:
                ready.append(j)
    # a cycle (none in a well-formed program) leaves its ops where the text has them
    return order + [op for i, op in enumerate(ops) if waiting[i] > 0]


def liveness(ops: list, mesh, min_bytes: int = 0) -> tuple[float, list]:
    """The most bytes of tensors alive at once when one device runs ``ops`` (in :func:`executor_order`),
    and the tensors alive at that point as ``[{bytes, factors}]`` (by factors).  Results smaller than
    ``min_bytes`` count nothing: to set beside a measurement that sees only larger allocations.

    Each result is alive from its op to its last use, or its aliases' last.  A result that aliases another
    buffer (a variable read, a reshape, an identity) counts nothing, and one the size of an input that dies
    at its op takes that input's buffer over, as TensorFlow's kernels forward their inputs
    (``forward_input_or_allocate_output``)."""
    hints = layout_hints(ops)
    ops = executor_order(ops)
    # a result that aliases an operand (a reshape, an identity) keeps the operand's buffer alive until the
    # alias's own last use: every gradient passes through dsgd's guard (an IdentityN) on its way to the update
    root: dict[str, str] = {}
    # a view (a slice of a buffer) keeps the whole buffer alive; a result takes over whole buffers only
    # (a kernel may reuse a view's part in place, which the buffer's liveness cannot show: counted as new)
    views = {id(op): k for op in ops if (k := _views_input(op)) is not None and k < len(op.operands)}
    partial: set[str] = set()
    for op in ops:
        if op.name in _ALIASING and op.operands:
            for k, r in enumerate(op.results):
                src = op.operands[k] if op.name == "IdentityN" and k < len(op.operands) else op.operands[0]
                root[r] = root.get(src, src)
                if src in partial:
                    partial.add(r)
        elif id(op) in views:
            src = op.operands[views[id(op)]]
            for r in op.results:
                root[r] = root.get(src, src)
                partial.add(r)
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for o in op.operands:
            for v in {o, root.get(o, o)}:
                last[v] = i
                last[v.split("#")[0]] = i
    live: dict[str, tuple] = {}
    cur = peak = 0.0
    peak_live: dict = {}
    for i, op in enumerate(ops):
        dying = list(dict.fromkeys(v for v in (root.get(o, o) for o in op.operands) if v in live and live[v][2] <= i))
        if op.name not in _ALIASING and id(op) not in views:
            whole = {root.get(o, o) for o in op.operands if o not in partial}  # buffers it may take over
            for k, r in enumerate(op.results):
                t = op.out_types[k] if k < len(op.out_types) else None
                if t is None or t.shape is None or (r not in last and r.split("#")[0] not in last):
                    continue
                end = last.get(r, last.get(r.split("#")[0], i))
                donor = next((o for o in dying if o in whole and live[o][0] == t.nbytes), None)
                if donor is not None:  # forwarded: the donor's buffer lives on as this result
                    dying.remove(donor)
                    live.pop(donor)
                    cur -= t.nbytes
                nbytes = t.nbytes if t.nbytes >= min_bytes else 0
                live[r] = (nbytes, value_factors(op, k, mesh, hints) or [], end)
                cur += nbytes
        if cur > peak:
            peak, peak_live = cur, dict(live)
        for r in [r for r, v in live.items() if v[2] <= i]:
            cur -= live.pop(r)[0]
    agg: dict[str, float] = {}
    for nbytes, fac, _ in peak_live.values():
        key = json.dumps(fac)
        agg[key] = agg.get(key, 0.0) + nbytes
    return peak, [{"bytes": b, "factors": json.loads(k)} for k, b in agg.items()]


def summarize(files: Sequence[str], mesh: Sequence[tuple]) -> ProgramSummary:
    """The collectives and compute of one function's dump files (one device's program)."""
    files = sorted(files)
    out = ProgramSummary(files=[os.path.basename(f) for f in files])
    st = stage_files(files)
    if st["pre"]:
        ops = parse_ops(open(st["pre"]).read())
        prod = producers(ops)
        out.terms = [_coll_info(op, prod, mesh) for op in ops if op.name in _COLL_OPS]
        out.collectives = _aggregate(out.terms)
    if st["issued"]:
        out.groups, infos = _issued_groups(parse_ops(open(st["issued"]).read()), mesh, out.terms)
        by_axes: dict[tuple, Collective] = {}
        for c in _aggregate(infos):
            b = by_axes.setdefault(c.axes, Collective("all-reduce", c.axes, c.group, 0, 0))
            b.bytes += c.bytes
            b.count += c.count
        out.issued = sorted(by_axes.values(), key=lambda c: c.axes)
    if st["expanded"]:
        ops = parse_ops(open(st["expanded"]).read())
        out.compute, out.memory, out.flops, out.out_bytes, out.flops_by_op = _inventory(ops, mesh)
        out.peak_expanded, out.peak_set = liveness(ops, mesh)
    if st["final"]:
        ops = parse_ops(open(st["final"]).read())
        out.peak_bytes = liveness(ops, mesh)[0]
        out.peak_seen_bytes = liveness(ops, mesh, min_bytes=SEEN_BYTES)[0]
        out.ops = sum(1 for op in ops if op.name != "Const")
        coll = [op for op in ops if op.name.startswith("Collective")]
        out.final_collectives = len(coll)
        out.final_bytes = sum(op.in_types[0].nbytes for op in coll if op.in_types)
        out.consistent = (sum(c.count for c in out.issued) == out.final_collectives
                          and sum(c.bytes for c in out.issued) == out.final_bytes)
    return out


def issued_list(summary: ProgramSummary, target: Optional[Sequence[tuple]] = None, batch_ratio: float = 1.0,
                data_axis: str = "batch") -> Optional[list]:
    """``[(axes, bytes, merged)]``, one per all-reduce the step issues -- as read (``target`` None), or
    predicted for another mesh of the same plan by scaling each collective's tensor and padding each merged
    buffer to 1024 elements again; ``merged``: DTensor concatenated several tensors into it.  None when a tensor
    does not divide on ``target``."""
    out = []
    sizes = dict(target) if target is not None else None
    for g in summary.groups:
        members = [summary.terms[i] for i in g["members"] if 0 <= i < len(summary.terms)]
        if not members or len(members) != len(g["members"]):
            return None  # an issued collective not matched to its tensors: cannot be scaled
        axes = tuple(members[0]["axes"])
        if sizes is not None and all(sizes.get(a, 1) == 1 for a in axes):
            continue  # the axis has size 1 there: no collective
        elems = 0.0
        for t in members:
            n = float(math.prod(t["shape"] or ()))
            if sizes is not None:
                f = scale_factor(t["factors"], target, batch_ratio, data_axis)
                if f is None:
                    return None
                if "scatter_elements" in t:  # the scattered piece scales; the group gathers it back
                    n = t["scatter_elements"] * f * math.prod(sizes.get(a, 1) for a in t["axes"])
                else:
                    n *= f
            elems += n
        e = int(round(elems))
        if g["merged"] and e % 1024:
            e = e // 1024 * 1024 + 1024
        out.append((axes, e * g["dtype_bytes"], bool(g["merged"])))
    return out


def issued_bytes(summary: ProgramSummary, target: Optional[Sequence[tuple]] = None, batch_ratio: float = 1.0,
                 data_axis: str = "batch") -> Optional[dict]:
    """``{axes: (count, bytes)}`` of :func:`issued_list`."""
    got = issued_list(summary, target, batch_ratio, data_axis)
    if got is None:
        return None
    out: dict[tuple, list] = {}
    for axes, b, _ in got:
        c = out.setdefault(axes, [0, 0])
        c[0] += 1
        c[1] += b
    return {k: tuple(v) for k, v in out.items()}


def _scaled_total(items: Sequence[dict], key: str, target: Sequence[tuple], batch_ratio: float,
                  data_axis: str) -> Optional[float]:
    """The sum of ``item[key]`` each scaled to ``target`` by its tensor's factors; None when one does not divide."""
    total = 0.0
    for item in items:
        f = scale_factor(item["factors"], target, batch_ratio, data_axis)
        if f is None:
            return None
        total += item[key] * f
    return total


def scaled_compute(summary: ProgramSummary, target: Sequence[tuple], batch_ratio: float = 1.0,
                   data_axis: str = "batch") -> Optional[tuple[float, float]]:
    """(FLOPs, output bytes) per device of the same program on ``target``; None when a tensor does not divide."""
    flops = _scaled_total(summary.compute, "flops", target, batch_ratio, data_axis)
    nbytes = _scaled_total(summary.memory, "bytes", target, batch_ratio, data_axis)
    return None if flops is None or nbytes is None else (flops, nbytes)


def scaled_peak(summary: ProgramSummary, target: Sequence[tuple], batch_ratio: float = 1.0, *,
                grads_bytes: float = 0.0, data_axis: str = "batch") -> Optional[float]:
    """The final program's peak of live tensors on ``target``: the larger of the expanded program's tensors
    alive at its peak, scaled there (times the final / expanded peak measured here), and the gradients plus
    the largest buffer DTensor merges all-reduces into (they are alive together).  None when a tensor does
    not divide there."""
    if not summary.peak_expanded:
        return None
    total = _scaled_total(summary.peak_set, "bytes", target, batch_ratio, data_axis)
    if total is None:
        return None
    issued = issued_list(summary, target, batch_ratio, data_axis) or []
    biggest = max((b for _, b, _ in issued), default=0)
    return max(summary.peak_bytes * total / summary.peak_expanded, grads_bytes + biggest)


__all__ = ["ProgramSummary", "Collective", "summarize", "issued_list", "issued_bytes", "scaled_compute", "scaled_peak",
           "liveness", "executor_order", "SEEN_BYTES", "parse_ops", "parse_type", "producers", "group_axes",
           "axis_partitions", "op_flops", "function_files", "dump_env", "COMPUTE_OPS", "scale_factor", "value_factors",
           "stage_files", "layout_hints"]
