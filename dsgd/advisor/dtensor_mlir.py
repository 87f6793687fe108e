"""DTensor's MLIR dumps as data: the ops of a dumped program (types, layouts, global shapes), the mesh axes of
a collective's device groups, each tensor dimension's sharding (the factors a program is scaled to another mesh
by), the FLOPs of compute ops, and which dump file is which stage.

Text parsing only, no TensorFlow.  :mod:`dsgd.advisor.dtensor_program` summarizes a step's program with these.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass
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
    """``%5:2`` -> ``%5#0, %5#1``, as the results are used; also in an island's ``%outputs:2, %control``."""
    out = []
    for name in (t.strip() for t in text.split(",")):
        base, colon, n = name.partition(":")
        out += [f"{base}#{k}" for k in range(int(n))] if colon and n.isdigit() else [base if colon else name]
    return out


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


def contracted_factors(op: Op, prod: dict, mesh, hints: Optional[dict] = None) -> list:
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



__all__ = ["TensorType", "Op", "parse_type", "parse_ops", "producers", "const_value", "axis_partitions", "group_axes",
           "layout_hints", "value_factors", "contracted_factors", "scale_factor", "op_flops", "stage_files",
           "function_files", "dump_env", "DUMP_ENV", "COMPUTE_OPS"]
