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

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

DUMP_ENV = {"TF_CPP_VMODULE": "dtensor_mlir_passes=1"}
_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i32": 4, "i64": 8, "i8": 1, "i1": 1, "ui8": 1}
COMPUTE_OPS = ("MatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv2D", "Conv2DBackpropInput",
               "Conv2DBackpropFilter")


def dump_env(directory: str) -> dict:
    """The environment that makes DTensor dump its programs into ``directory`` (set before TF starts)."""
    return dict(DUMP_ENV, TF_DUMP_GRAPH_PREFIX=directory)


# ------------------------------------------------------------------------------ parsing
@dataclass
class TensorType:
    shape: Optional[tuple]  # None: unranked / unknown
    dtype: str

    @property
    def elements(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    @property
    def nbytes(self) -> int:
        return self.elements * _DTYPE_BYTES.get(self.dtype, 4)


@dataclass
class Op:
    results: list  # the names its results are referred to by: ["%5"], ["%1#0", "%1#1"], ["%loss", "%backprop"]
    name: str  # without "tf."
    operands: list
    attrs: str
    in_types: list
    out_types: list

    @property
    def result(self) -> str:
        return self.results[0] if self.results else ""

    def layout(self, k: int = 0) -> Optional[list]:
        """The sharding specs of result ``k``, from the ``_layout`` attribute (None when absent)."""
        m = re.search(r"_layout = \[(.*?)\]", self.attrs)
        if not m:
            return None
        specs = re.findall(r'"sharding_specs:([^ ]*) mesh:', m.group(1))
        if k >= len(specs):
            return None
        s = specs[k].rstrip(",")
        return s.split(",") if s else []

    def global_shape(self, k: int = 0) -> Optional[tuple]:
        """The global shape of result ``k``, from the ``_global_shape`` attribute (None when absent)."""
        m = re.search(r"_global_shape = \[(.*?)\]", self.attrs)
        if not m:
            return None
        shapes = re.findall(r"#tf_type\.shape<([^>]*)>", m.group(1))
        if k >= len(shapes):
            return None
        t = shapes[k]
        if not t:
            return ()
        try:
            return tuple(int(x) for x in t.split("x"))
        except ValueError:
            return None


_TYPE_RE = re.compile(r"tensor<([^<>]*(?:<[^<>]*>)?[^<>]*)>")
_LINE_RE = re.compile(r'^\s*((?:%[\w#.:]+)(?:, %[\w#.:]+)*) = (?:tf_executor\.island(?:\([^)]*\))? wraps )?"tf\.(\w+)"'
                      r"\(([^)]*)\)(.*)$")


def parse_type(text: str) -> TensorType:
    """``8x64x256xf32`` (the inside of ``tensor<...>``) -> shape and dtype."""
    parts = text.split("x")
    if text.startswith("*") or "?" in parts:
        return TensorType(None, parts[-1])
    dims = []
    for p in parts[:-1]:
        if not p.isdigit():
            return TensorType(None, parts[-1])
        dims.append(int(p))
    return TensorType(tuple(dims), parts[-1])


def _split_signature(rest: str) -> tuple[str, list, list]:
    """``attrs : (in types) -> out types`` -> (attrs, in types, out types)."""
    i = rest.rfind(" : (")
    if i < 0:
        return rest, [], []
    attrs, sig = rest[:i], rest[i + 3:]
    ins, _, outs = sig.partition(") -> ")
    return attrs, [parse_type(t) for t in _TYPE_RE.findall(ins)], [parse_type(t) for t in _TYPE_RE.findall(outs)]


def _result_names(text: str) -> list:
    names = [t.strip() for t in text.split(",")]
    if len(names) == 1 and ":" in names[0]:
        base, _, n = names[0].partition(":")
        return [f"{base}#{k}" for k in range(int(n))] if n.isdigit() else [base]
    return names


def parse_ops(text: str) -> list:
    """Every ``tf.*`` op of a dumped program, one per line, in order."""
    ops = []
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if not m:
            continue
        attrs, ins, outs = _split_signature(m.group(4))
        operands = [o.strip() for o in m.group(3).split(",") if o.strip()]
        ops.append(Op(_result_names(m.group(1)), m.group(2), operands, attrs, ins, outs))
    return ops


def producers(ops: list) -> dict:
    """``{value name: (op, result index)}``; a single result is also found as ``%5#0``."""
    out = {}
    for op in ops:
        for k, r in enumerate(op.results):
            out[r] = (op, k)
        if len(op.results) == 1:
            out[op.results[0] + "#0"] = (op, 0)
    return out


def const_value(op: Op):
    """The value of a ``tf.Const`` holding a dense integer array (group assignments), else None."""
    m = re.search(r"value = dense<(\[.*?\]|-?\d+)> : tensor", op.attrs)
    if not m:
        return None
    try:
        return json.loads(m.group(1))
    except ValueError:
        return None


# ------------------------------------------------------------------------------ mesh axes
def axis_partitions(mesh: Sequence[tuple]) -> dict:
    """``{axes: partition}``: for each non-empty set of mesh axes, the groups of device ids that a
    collective over those axes reduces within (devices numbered row-major, as DTensor numbers them)."""
    names = [a for a, _ in mesh]
    sizes = [n for _, n in mesh]
    n_dev = math.prod(sizes)
    coords = []
    for d in range(n_dev):
        c, rest = [], d
        for s in reversed(sizes):
            c.append(rest % s)
            rest //= s
        coords.append(tuple(reversed(c)))
    out = {}
    for mask in range(1, 1 << len(names)):
        axes = tuple(names[i] for i in range(len(names)) if mask >> i & 1)
        groups: dict[tuple, list] = {}
        for d, c in enumerate(coords):
            key = tuple(c[i] for i in range(len(names)) if not mask >> i & 1)
            groups.setdefault(key, []).append(d)
        out[axes] = frozenset(frozenset(g) for g in groups.values())
    return out


def group_axes(groups, mesh: Sequence[tuple]) -> tuple:
    """The mesh axes a group assignment (a list of device-id lists) reduces over; ``("?",)`` if none
    matches.  Axes of size 1 are dropped (they add no devices to a group)."""
    got = frozenset(frozenset(g) for g in groups)
    sizes = dict(mesh)
    matches = [axes for axes, part in axis_partitions(mesh).items() if part == got]
    if not matches:
        return ("?",)
    best = min(matches, key=len)
    return tuple(a for a in best if sizes[a] > 1) or best


# ------------------------------------------------------------------------------ sharding factors
# A dimension of a local tensor as [local size, global size, mesh axis or None]: what scaling to another
# mesh needs (the local size there is the global size -- times the batch ratio on the data axis -- over
# that axis's size there).
def _axis_for_ratio(ratio: int, mesh) -> Optional[str]:
    hits = [a for a, n in mesh if n == ratio and n > 1]
    return hits[0] if len(hits) == 1 else ("?" if ratio > 1 else None)


def layout_hints(ops: list) -> dict:
    """``{value: sharding specs}`` for results without a ``_layout`` of their own (a partial sum, before its
    all-reduce): the layout of a consumer whose result has the same local shape (the all-reduce, an
    elementwise op).  Where two mesh axes have the same size, the global / local ratio cannot tell them apart."""
    prod = producers(ops)
    hints: dict[str, list] = {}
    for op in ops:
        if op.layout(0) is None:
            continue
        passthrough = len(op.out_types) == len(op.operands) > 1  # IdentityN: operand i is result i
        for i, o in enumerate(op.operands):
            hit = prod.get(o)
            if hit is None or o in hints:
                continue
            j = i if passthrough else 0
            lay = op.layout(j)
            mine = op.out_types[j] if j < len(op.out_types) else None
            src, k = hit
            t = src.out_types[k] if k < len(src.out_types) else None
            if lay is not None and src.layout(k) is None and t is not None and mine is not None \
                    and t.shape == mine.shape:
                hints[o] = lay
    return hints


def value_factors(op: Op, k: int, mesh, hints: Optional[dict] = None) -> Optional[list]:
    """``[[local, global, axis], ...]`` for result ``k`` of ``op`` (None when its shape is unknown)."""
    if k >= len(op.out_types) or op.out_types[k].shape is None:
        return None
    local = op.out_types[k].shape
    lay = op.layout(k)
    if lay is None and hints:
        lay = next((hints[r] for r in (op.results[k] if k < len(op.results) else None,
                                       op.result + f"#{k}") if r in hints), None)
    glob_ = op.global_shape(k)
    sizes = dict(mesh)
    out = []
    for d, n in enumerate(local):
        axis = lay[d] if lay and d < len(lay) and lay[d] not in ("unsharded", "") else None
        if glob_ is not None and d < len(glob_):
            g = glob_[d]
            if axis is None and g != n and n:
                axis = _axis_for_ratio(g // n, mesh)
                if axis == "?" and d == 0 and any(a == "batch" and m == g // n for a, m in mesh):
                    axis = "batch"  # two axes of that size: a leading dimension split is the batch's
        else:
            g = n * sizes.get(axis, 1) if axis else n
        out.append([int(n), int(g), axis])
    return out


def _operand_factors(prod: dict, name: str, mesh, hints: Optional[dict] = None) -> Optional[list]:
    hit = prod.get(name)
    if hit is None:
        return None
    return value_factors(hit[0], hit[1], mesh, hints)


def _contracted(op: Op, prod: dict, mesh, hints: Optional[dict] = None) -> list:
    """The factors of the dimensions a compute op sums over (K of a matmul, cin x kh x kw of a conv)."""
    a = _operand_factors(prod, op.operands[0], mesh, hints) if op.operands else None
    if op.name == "MatMul" and a:
        return [a[0] if "transpose_a = true" in op.attrs else a[-1]]
    if op.name.startswith("BatchMatMul") and a:
        return [a[-2] if "adj_x = true" in op.attrs else a[-1]]
    if op.name == "Einsum" and a:
        m = re.search(r'equation = "([^"]+)"', op.attrs)
        if not m:
            return []
        lhs, _, outs = m.group(1).replace(" ", "").partition("->")
        ia, _, ib = lhs.partition(",")
        b = _operand_factors(prod, op.operands[1], mesh, hints) if len(op.operands) > 1 else None
        got, out = set(), []
        for idx, fac in ((ia, a), (ib, b)):
            if fac is None or len(idx) != len(fac):
                continue
            for ch, f in zip(idx, fac):
                if ch not in outs and ch not in got:
                    got.add(ch)
                    out.append(f)
        return out
    if op.name == "Conv2D" and a and len(op.in_types) > 1 and op.in_types[1].shape:
        kh, kw = op.in_types[1].shape[:2]
        return [a[3], [kh, kh, None], [kw, kw, None]]
    if op.name == "Conv2DBackpropInput" and len(op.operands) > 1 and len(op.in_types) > 1 and op.in_types[1].shape:
        f = _operand_factors(prod, op.operands[1], mesh, hints)
        kh, kw = op.in_types[1].shape[:2]
        cout = f[3] if f and len(f) == 4 else [op.in_types[1].shape[3]] * 2 + [None]
        return [cout, [kh, kh, None], [kw, kw, None]]
    if op.name == "Conv2DBackpropFilter" and len(op.operands) > 2:
        g = _operand_factors(prod, op.operands[2], mesh, hints)
        return g[:3] if g else []
    return []


def scale_factor(factors: Sequence, target: Sequence[tuple], batch_ratio: float = 1.0,
                 data_axis: str = "batch") -> Optional[float]:
    """How much a local tensor (or a compute op's work) grows from its mesh to ``target``: the product
    over its dimensions of (the global size -- times ``batch_ratio`` on ``data_axis`` -- over the target
    axis's size) / the local size.  None when a dimension does not divide there, or its axis is unknown."""
    sizes = dict(target)
    f = 1.0
    for local, glob_, axis in factors:
        if not local:
            continue
        if axis == "?":
            return None
        g = glob_ * batch_ratio if axis == data_axis else glob_
        n = sizes.get(axis, 1) if axis else 1
        tl = g / n
        if abs(tl - round(tl)) > 1e-9 or tl < 1:
            return None
        f *= tl / local
    return f


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
                "consistent": self.consistent, "files": self.files}

    @classmethod
    def from_dict(cls, d: dict) -> "ProgramSummary":
        def colls(xs):
            return [Collective(c["kind"], tuple(c["axes"]), c["group"], c["bytes"], c["count"]) for c in xs]

        return cls(colls(d.get("collectives", [])), colls(d.get("issued", [])), d.get("terms", []),
                   d.get("groups", []), d.get("compute", []), d.get("memory", []), d.get("flops", 0.0),
                   d.get("flops_by_op", {}), d.get("out_bytes", 0.0), d.get("ops", 0), d.get("peak_bytes", 0.0),
                   d.get("peak_expanded", 0.0), d.get("peak_set", []), d.get("final_collectives", 0),
                   d.get("final_bytes", 0),
                   d.get("consistent", True), d.get("files", []))


def _einsum_flops(eq: str, a: TensorType, b: TensorType) -> float:
    lhs, _, out = eq.replace(" ", "").partition("->")
    ia, _, ib = lhs.partition(",")
    sizes: dict[str, int] = {}
    for idx, t in ((ia, a), (ib, b)):
        if t.shape is None or len(idx) != len(t.shape):
            return 0.0
        for ch, n in zip(idx, t.shape):
            sizes[ch] = max(sizes.get(ch, 1), n)
    return 2.0 * math.prod(sizes.values())


def op_flops(op: Op) -> float:
    """Multiply-add FLOPs (2 per MAC) of one compute op, from its local tensor types."""
    if len(op.in_types) < 2 or not op.out_types or op.out_types[0].shape is None:
        return 0.0
    a, b, out = op.in_types[0], op.in_types[1], op.out_types[0]
    if op.name == "MatMul" and a.shape is not None:
        k = a.shape[0] if "transpose_a = true" in op.attrs else a.shape[-1]
        return 2.0 * out.elements * k
    if op.name.startswith("BatchMatMul") and a.shape is not None:
        k = a.shape[-2] if "adj_x = true" in op.attrs else a.shape[-1]
        return 2.0 * out.elements * k
    if op.name == "Einsum":
        m = re.search(r'equation = "([^"]+)"', op.attrs)
        return _einsum_flops(m.group(1), a, b) if m else 0.0
    if op.name == "Conv2D" and b.shape is not None:  # input NHWC, filter (kh, kw, cin, cout)
        kh, kw, cin, _ = b.shape
        return 2.0 * out.elements * kh * kw * cin
    if op.name == "Conv2DBackpropInput" and b.shape is not None:  # (input_sizes, filter, out_backprop)
        kh, kw, _, cout = b.shape
        return 2.0 * out.elements * kh * kw * cout
    if op.name == "Conv2DBackpropFilter" and len(op.in_types) > 2 and op.in_types[2].shape is not None:
        n, h, w, _ = op.in_types[2].shape  # (input, filter_sizes, out_backprop) -> filter gradient
        return 2.0 * out.elements * n * h * w
    return 0.0


def _find(files: Sequence[str], needle: str) -> Optional[str]:
    hits = [f for f in files if needle in os.path.basename(f)]
    return hits[-1] if hits else None


def stage_files(files: Sequence[str]) -> dict:
    """The dump file of each stage.  A pass that changed nothing writes no file, and the passes between the
    SPMD expansion and the combining of all-reduces vary (``AllReduceSumOptimization``, ``AllGatherLowering``,
    ``AllReduceScatterOptimization``), so the stages are found by position (files sort in the order DTensor
    wrote them): ``expanded`` -- after CSE (else the SPMD expansion); ``pre`` -- the last file before all-reduces
    are combined; ``issued`` -- the last file before they are lowered to ``CollectiveReduceV2``;
    ``final`` -- after ``BreakUpIslands``."""
    files = sorted(files)
    names = [os.path.basename(f) for f in files]

    def first(*needles: str) -> Optional[int]:
        hits = [i for i, n in enumerate(names) if any(x in n for x in needles)]
        return hits[0] if hits else None

    exp = first("after_CSE")
    exp = exp if exp is not None else first("after_DTensorSPMDExpansion")
    lower = first("after_DTensorAllReduceLowering")
    combine = first("after_DTensorAllReduceCombineOptimization", "after_DTensorReduceScatterLowering")
    combine = combine if combine is not None else lower
    pre = issued = None
    if exp is not None:
        pre = files[max(exp, (combine if combine is not None else len(files)) - 1)]
        issued = files[max(exp, (lower if lower is not None else len(files)) - 1)]
    return {"expanded": files[exp] if exp is not None else None, "pre": pre, "issued": issued,
            "final": _find(files, "BreakUpIslands")}


_COLL_OPS = ("DTensorAllReduce", "DTensorReduceScatter", "DTensorAllToAll")


def _coll_info(op: Op, prod: dict, mesh) -> dict:
    t = op.in_types[0] if op.in_types else TensorType(None, "f32")
    axes: tuple = ("?",)
    group = 0
    if len(op.operands) > 1 and op.operands[1] in prod:
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
        groups.append({"members": [free[k].pop(0) if free.get(k) else -1 for k in keys], "merged": merged})
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
                            "factors": (value_factors(op, 0, mesh, hints) or []) + _contracted(op, prod, mesh, hints)})
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


def liveness(ops: list, mesh) -> tuple[float, list]:
    """The most bytes of tensors alive at once when one device runs ``ops`` in program order, and the
    tensors alive at that point as ``[{bytes, factors}]`` (by factors).

    Each result is alive from its op to its last use.  A result that aliases another buffer (a variable
    read, a reshape) counts nothing, and one the size of an input that dies at its op takes that input's
    buffer over, as TensorFlow's kernels forward their inputs (``forward_input_or_allocate_output``)."""
    hints = layout_hints(ops)
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for o in op.operands:
            last[o] = i
            last[o.split("#")[0]] = i
    live: dict[str, tuple] = {}
    cur = peak = 0.0
    peak_live: dict = {}
    for i, op in enumerate(ops):
        dying = [o for o in op.operands if o in live and live[o][2] <= i]
        if op.name not in _ALIASING:
            for k, r in enumerate(op.results):
                t = op.out_types[k] if k < len(op.out_types) else None
                if t is None or t.shape is None or (r not in last and r.split("#")[0] not in last):
                    continue
                end = last.get(r, last.get(r.split("#")[0], i))
                donor = next((o for o in dying if live[o][0] == t.nbytes), None)
                if donor is not None:  # forwarded: the donor's buffer lives on as this result
                    dying.remove(donor)
                    live.pop(donor)
                    cur -= t.nbytes
                live[r] = (t.nbytes, value_factors(op, k, mesh, hints) or [], end)
                cur += t.nbytes
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
        out.append((axes, e * members[0]["dtype_bytes"], bool(g["merged"])))
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


def scaled_compute(summary: ProgramSummary, target: Sequence[tuple], batch_ratio: float = 1.0,
                   data_axis: str = "batch") -> Optional[tuple[float, float]]:
    """(FLOPs, output bytes) per device of the same program on ``target``; None when a tensor does not divide."""
    flops = 0.0
    for c in summary.compute:
        f = scale_factor(c["factors"], target, batch_ratio, data_axis)
        if f is None:
            return None
        flops += c["flops"] * f
    nbytes = 0.0
    for m in summary.memory:
        f = scale_factor(m["factors"], target, batch_ratio, data_axis)
        if f is None:
            return None
        nbytes += m["bytes"] * f
    return flops, nbytes


def scaled_peak(summary: ProgramSummary, target: Sequence[tuple], batch_ratio: float = 1.0, *,
                grads_bytes: float = 0.0, data_axis: str = "batch") -> Optional[float]:
    """The final program's peak of live tensors on ``target``: the larger of the expanded program's tensors
    alive at its peak, scaled there (times the final / expanded peak measured here), and the gradients plus
    the largest buffer DTensor merges all-reduces into (they are alive together).  None when a tensor does
    not divide there."""
    if not summary.peak_expanded:
        return None
    total = 0.0
    for t in summary.peak_set:
        f = scale_factor(t["factors"], target, batch_ratio, data_axis)
        if f is None:
            return None
        total += t["bytes"] * f
    issued = issued_list(summary, target, batch_ratio, data_axis) or []
    biggest = max((b for _, b, _ in issued), default=0)
    return max(summary.peak_bytes * total / summary.peak_expanded, grads_bytes + biggest)


def function_files(directory: str, since: set) -> dict:
    """``{function name: [files]}`` of the dump files in ``directory`` not in ``since``."""
    out: dict[str, list] = {}
    for f in glob.glob(os.path.join(directory, "*.mlir")):
        if f in since:
            continue
        m = re.search(r"\.(__inference_[\w]+?)\.mlir$", os.path.basename(f))
        if m:
            out.setdefault(m.group(1), []).append(f)
    return out


__all__ = ["ProgramSummary", "Collective", "summarize", "parse_ops", "parse_type", "producers", "group_axes",
           "axis_partitions", "op_flops", "function_files", "dump_env", "COMPUTE_OPS", "scale_factor", "issued_bytes",
           "scaled_compute", "scaled_peak", "issued_list", "value_factors", "layout_hints", "stage_files", "liveness"]
