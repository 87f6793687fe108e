"""Candidate plans for a whole training step: a mesh (a data axis ``batch`` x a model axis ``model``)
and a layout for every variable, built by the field's rules from the model's layers, feasibility first.

Meshes: every factoring of the device count into ``batch=B,model=M`` (``1x8``, ``2x4``, ``4x2``, ``8x1``
for 8 devices), plus any ``--mesh`` given.  Rules (each a plan on every mesh it applies to):

* ``dp`` -- data parallel: every weight replicated, the batch split over ``batch``.  Only on meshes with
  ``model=1``: with weights replicated over a model axis every device of it would compute the same step.
* ``tp`` -- tensor parallel over ``model`` (Megatron-style), the batch split over ``batch`` (a hybrid
  when both axes are > 1):

  - consecutive ``Dense`` pairs (the first's output feeding only the second, through activations or
    dropout): the first column-sharded (kernel ``[unsharded, model]``, bias ``[model]``), the second
    row-sharded (kernel ``[model, unsharded]``);
  - ``MultiHeadAttention`` sharded by heads: query/key/value kernels ``[unsharded, model, unsharded]``,
    their biases ``[model, unsharded]``, the output projection ``[model, unsharded, unsharded]``;
  - ``Embedding`` tables by hidden size ``[unsharded, model]`` (DTensor cannot gather rows from a table
    sharded by vocabulary: "unshard dimension 0");
  - ``Conv2D`` kernels stay replicated: DTensor's ``Conv2D`` requires a fully replicated filter ("Filter
    for convolution must have fully replicated layout"; checked with TF 2.21), and partitioning the
    images instead needs a halo exchange, which DTensor supports only on TPU;
* ``fsdp`` -- fully sharded data parallel (ZeRO-3), on meshes with ``batch`` > 1: the ``tp`` plan's layouts
  (the ``dp`` plan's where ``model=1``) with every weight also sharded over ``batch``, on its first dimension
  that is not sharded yet and divides.  dsgd keeps the slots in their variable's layout, so weights,
  gradients and slots per device all shrink by ``batch`` (weights under 1 KiB excepted); DTensor all-gathers each weight where the forward
  and backward passes need it whole and reduce-scatters its gradient (on CPU both run as all-reduces of
  the whole tensor).  Conv kernels stay replicated (as above), embedding tables are never sharded on
  their rows, and attention sharded by heads puts ``batch`` on its weights' last dimension (DTensor's
  Einsum cannot contract a dimension split over one axis with another split over the other);
* ``zero1`` -- ZeRO-1, on meshes with ``batch`` > 1: the ``tp`` plan's layouts (the ``dp`` plan's where
  ``model=1``), trained with dsgd's ``implementation="sharded_state"``, which shards each momentum further
  over the largest axis its weight is replicated on and all-gathers the updated weights each step;
* ``tp-mlp`` -- the ``Dense`` pairs only (attention and embeddings replicated), where it differs from ``tp``.

By default ``dp``, ``tp`` and ``fsdp``; ``zero1`` and ``tp-mlp`` on request (``--rules dp,tp,fsdp,zero1``),
so that a model's advice stays within minutes here.

``--force REGEX=LAYOUT`` sets the layout of every matching variable in every plan.  A plan that cannot
be built on a mesh (a dimension that does not divide, heads not divisible by the axis, the batch not
divisible by ``batch``) is left out with its reason: :class:`Excluded`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from dsgd import layoutmap, meshspec
from dsgd.advisor.model_graph import ELEMENTWISE, ModelGraph
from dsgd.workloads import VarSpec

U = meshspec.UNSHARDED
DATA_AXIS = "batch"
MODEL_AXIS = "model"
RULES = ("dp", "tp", "fsdp", "zero1", "tp-mlp")
#: the dsgd implementation a rule trains with ("": the one the advice was asked for)
RULE_IMPLEMENTATION = {"zero1": "sharded_state"}
DEFAULT_RULES = ("dp", "tp", "fsdp")  # tp-mlp on request (--rules): a variant of tp, one more plan per mesh to measure
#: the fsdp rule leaves tinier weights (a classifier's bias) whole over batch: a few floats per device save
#: nothing, and the plan's layouts then stay the same on larger data axes (what a prediction at scale needs).
#: Biases above it are sharded: left whole, DTensor gathered more around them (the MLP's 2x4 fsdp: 15 all-gathers,
#: 5.9 MiB, 64 ms a step, against 9, 3.9 MiB and 47 ms with them sharded; one run each, 2026-12-07)
FSDP_MIN_BYTES = 1 << 10
#: layers whose weights the fsdp rule leaves as the base plan has them: DTensor's convolutions need a
#: fully replicated filter
_CONV = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")


class StepPlanError(ValueError):
    """A plan request that cannot work (a bad ``--force`` or ``--mesh``); the message names the value."""


@dataclass(frozen=True)
class StepPlan:
    """One candidate: a mesh and a layout per variable, with the rule that made it."""

    rule: str
    mesh: tuple  # ((axis, size), ...)
    layouts: tuple  # ((variable path, (entries...)), ...), every trainable variable in model order
    description: str = ""
    notes: tuple = ()  # what the rule left replicated, and why
    implementation: str = ""  # the dsgd implementation it needs ("": the advice's)

    @property
    def mesh_spec(self) -> str:
        return meshspec.format_mesh_spec(self.mesh)

    @property
    def mesh_label(self) -> str:
        """``4x2``: batch x model."""
        d = dict(self.mesh)
        return f"{d.get(DATA_AXIS, 1)}x{d.get(MODEL_AXIS, 1)}"

    @property
    def name(self) -> str:
        return f"{self.mesh_label} {self.rule}"

    def layout_of(self, path: str) -> tuple:
        return dict(self.layouts)[path]

    def sharded(self) -> list:
        return [p for p, lay in self.layouts if any(e != U for e in lay)]

    def layout_map(self, graph: ModelGraph) -> dict:
        """``{regex: layout spec}`` (tied names folded into ``\\d+`` patterns): what tf_keras' ``LayoutMap``
        is given; variables left out are replicated."""
        from dsgd.advisor.plans import tie_groups

        specs = [VarSpec(v.path, tuple(v.shape), v.dtype) for v in graph.variables()]
        lays = [self.layout_of(s.name) for s in specs]
        return layoutmap.emit(specs, lays, groups=tie_groups(specs))


@dataclass(frozen=True)
class Excluded:
    """A plan left out, and why."""

    name: str
    mesh: str
    reason: str


@dataclass
class StepPlanSearch:
    plans: list = field(default_factory=list)
    excluded: list = field(default_factory=list)
    general: list = field(default_factory=list)  # facts that hold for every plan


# ------------------------------------------------------------------------------ meshes
def factor_meshes(devices: int) -> list:
    """Every ``batch=B,model=M`` with ``B * M == devices``, most model-parallel first."""
    return [((DATA_AXIS, b), (MODEL_AXIS, devices // b)) for b in range(1, devices + 1) if devices % b == 0]


def normalize_mesh(spec: str) -> tuple:
    """A ``--mesh`` as ``((batch, B), (model, M))``; only the axes ``batch`` and ``model`` are allowed."""
    dims = meshspec.parse_mesh_spec(spec)
    names = [a for a, _ in dims]
    bad = [a for a in names if a not in (DATA_AXIS, MODEL_AXIS)]
    if bad:
        raise StepPlanError(f"--mesh {spec!r}: axis {bad[0]!r} is not one the whole-step advisor lays out; name the "
                            f"axes {DATA_AXIS!r} (the batch) and {MODEL_AXIS!r} (tensor parallel), e.g. batch=2,model=4")
    d = dict(dims)
    return ((DATA_AXIS, d.get(DATA_AXIS, 1)), (MODEL_AXIS, d.get(MODEL_AXIS, 1)))


# ------------------------------------------------------------------------------ rules
def _dense_pairs(graph: ModelGraph, m: int, notes: list) -> dict:
    out: dict[str, tuple] = {}
    taken: set[str] = set()
    for ly in graph.layers:
        if ly.cls != "Dense" or ly.name in taken or not ly.var("kernel"):
            continue
        nxt = graph.next_through(ly.name, ELEMENTWISE) if graph.functional else None
        if nxt is None or nxt.cls != "Dense" or nxt.name in taken or not nxt.var("kernel"):
            continue
        k1, k2 = ly.var("kernel"), nxt.var("kernel")
        width = k1.shape[-1]
        if width % m:
            notes.append(f"{ly.name}->{nxt.name}: width {width} does not divide by model={m}; kept replicated")
            continue
        taken |= {ly.name, nxt.name}
        out[k1.path] = (U,) * (len(k1.shape) - 1) + (MODEL_AXIS,)
        if ly.var("bias"):
            out[ly.var("bias").path] = (MODEL_AXIS,)
        out[k2.path] = (MODEL_AXIS,) + (U,) * (len(k2.shape) - 1)
    return out


def _attention(graph: ModelGraph, m: int, notes: list) -> dict:
    out: dict[str, tuple] = {}
    for ly in graph.layers:
        if ly.cls != "MultiHeadAttention":
            continue
        heads = int(ly.config.get("num_heads") or 0)
        if not heads or heads % m:
            notes.append(f"{ly.name}: {heads} heads do not divide by model={m}; kept replicated")
            continue
        for part in ("query", "key", "value"):
            k, b = ly.var(f"_{part}_dense.kernel"), ly.var(f"_{part}_dense.bias")
            if k is not None:
                out[k.path] = (U, MODEL_AXIS, U)
            if b is not None:
                out[b.path] = (MODEL_AXIS, U)
        o = ly.var("_output_dense.kernel")
        if o is not None:
            out[o.path] = (MODEL_AXIS,) + (U,) * (len(o.shape) - 1)
    return out


def _embeddings(graph: ModelGraph, m: int, notes: list) -> dict:
    out: dict[str, tuple] = {}
    for ly in graph.layers:
        if ly.cls != "Embedding" or not ly.var("embeddings"):
            continue
        t = ly.var("embeddings")
        if t.shape[1] % m:
            notes.append(f"{ly.name}: hidden size {t.shape[1]} does not divide by model={m}; kept replicated")
            continue
        out[t.path] = (U, MODEL_AXIS)
    return out


def _fsdp(graph: ModelGraph, base: dict, b: int, notes: list) -> dict:
    """``base`` with every weight of at least :data:`FSDP_MIN_BYTES` also sharded over ``batch`` (size ``b``)
    on its first dimension that is not sharded yet and divides by ``b``: conv kernels and embedding rows
    excepted (DTensor cannot use them so)."""
    out = dict(base)
    kept, small = [], 0
    for ly in graph.layers:
        for v in ly.variables:
            lay = list(base.get(v.path, (U,) * len(v.shape)))
            if ly.cls in _CONV and v.path.endswith("kernel"):
                continue
            if v.nbytes < FSDP_MIN_BYTES:
                small += 1
                continue
            first = 1 if ly.cls == "Embedding" else 0  # a table's rows cannot be gathered from shards
            dims = range(first, len(v.shape))
            if ly.cls == "MultiHeadAttention" and MODEL_AXIS in lay:
                # sharded by heads: DTensor's Einsum expander refuses a weight with a contracted dimension on
                # batch and another on model ("label 'c' is mapped to mesh dimension 'batch' and 'model'",
                # TF 2.21); its last dimension (head size, or the output's width) on batch runs
                dims = reversed(dims)
            dim = next((d for d in dims if lay[d] == U and v.shape[d] % b == 0), None)
            if dim is None:
                kept.append(v.path)
                continue
            lay[dim] = DATA_AXIS
            out[v.path] = tuple(lay)
    if small:
        notes.append(f"{small} weight(s) under {FSDP_MIN_BYTES >> 10} KiB not sharded over batch: too small to gain")
    if kept:
        notes.append(f"{len(kept)} weight(s) ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}) have no "
                     f"unsharded dimension that divides by batch={b}; not sharded over batch")
    return out


def _general_facts(graph: ModelGraph) -> list:
    facts = []
    convs = [ly.name for ly in graph.layers if ly.cls in ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D")]
    if convs:
        facts.append(f"{len(convs)} conv layer(s) ({', '.join(convs[:4])}{', ...' if len(convs) > 4 else ''}) keep "
                     "replicated kernels in every plan: DTensor's Conv2D needs a fully replicated filter, and "
                     "splitting the images needs a halo exchange, which DTensor has only on TPU")
    if any(ly.cls == "Embedding" for ly in graph.layers):
        facts.append("embeddings are sharded by hidden size, never by vocabulary: DTensor cannot gather rows from "
                     "a table sharded on dimension 0")
    if any(ly.cls in ("BatchNormalization",) or (ly.cls == "LayerNormalization" and
                                                  float(ly.config.get("epsilon") or 0) >= 1.001e-5)
           for ly in graph.layers):
        facts.append("the model uses FusedBatchNormV3 (BatchNormalization, or LayerNormalization with epsilon >= "
                     "1.001e-5), which DTensor cannot lay out: every plan is expected to fail on a mesh")
    if not graph.functional:
        facts.append("a subclassed model: its layers' connections are unknown, so no Dense pairs are sharded")
    return facts


def _parse_force(force: Optional[Sequence[str]]) -> list:
    out = []
    for item in force or ():
        try:
            out.append((*layoutmap.parse_force(item), item))
        except ValueError as e:
            raise StepPlanError(str(e)) from None
    return out


def _forced(graph: ModelGraph, force: list, mesh: tuple) -> tuple[dict, Optional[str]]:
    """The forced layouts on ``mesh`` and, when one does not fit, why."""
    from dsgd.advisor.plans import check_layout

    out: dict[str, tuple] = {}
    for v in graph.variables():
        for rx, lay, item in force:
            if not rx.search(v.path):
                continue
            entries = (U,) * len(v.shape) if lay == "replicated" else tuple(e.strip() for e in lay.split(","))
            why = check_layout(VarSpec(v.path, tuple(v.shape), v.dtype), entries, mesh)
            if why:
                return out, f"--force {item}: {v.path} (shape {list(v.shape)}): {why}"
            out[v.path] = entries
            break
    return out, None


def search(graph: ModelGraph, devices: int, *, global_batch: int, meshes: Sequence[str] = (),
           force: Optional[Sequence[str]] = None, rules: Sequence[str] = DEFAULT_RULES,
           factor: bool = True) -> StepPlanSearch:
    """The candidate plans of ``graph`` on every mesh that factors ``devices`` (``factor``) and on the extra
    ``meshes``, with every plan left out and why.  ``global_batch`` must divide by each plan's ``batch``."""
    force_rx = _parse_force(force)
    out = StepPlanSearch(general=_general_facts(graph))
    all_meshes = factor_meshes(devices) if factor else []
    for spec in meshes:
        m = normalize_mesh(spec)
        if m not in all_meshes:
            all_meshes.append(m)
    variables = graph.variables()
    seen: dict[tuple, str] = {}
    for mesh in all_meshes:
        d = dict(mesh)
        b, m = d[DATA_AXIS], d[MODEL_AXIS]
        label = f"{b}x{m}"
        if global_batch % b:
            out.excluded.append(Excluded(f"{label} *", meshspec.format_mesh_spec(mesh),
                                         f"the global batch {global_batch} does not divide by batch={b}"))
            continue
        forced, bad = _forced(graph, force_rx, mesh)
        for rule in rules:
            name = f"{label} {rule}"
            notes: list[str] = []
            if rule == "zero1":
                if b == 1:
                    out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh),
                                                 "batch=1: no data axis to shard the momentum over"))
                    continue
                lay = {}
                if m > 1:
                    lay = _dense_pairs(graph, m, notes)
                    lay.update(_attention(graph, m, notes))
                    lay.update(_embeddings(graph, m, notes))
                    if not lay and not forced:
                        out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh), (
                            f"no layer can be sharded on model: weights replicated over model={m} would compute the "
                            f"same step {m} times; ZeRO-1 is the {devices}x1 plan")))
                        continue
                desc = ("ZeRO-1: each momentum also sharded over an axis its weight is replicated on (dsgd "
                        "sharded_state), the weights all-gathered after each update" +
                        (f", on tensor parallel over model={m}" if m > 1 else ""))
            elif rule == "fsdp":
                if b == 1:
                    out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh),
                                                 "batch=1: no data axis to shard the weights over (this is the tp plan)"))
                    continue
                base: dict[str, tuple] = {}
                if m > 1:
                    base = _dense_pairs(graph, m, notes)
                    base.update(_attention(graph, m, notes))
                    base.update(_embeddings(graph, m, notes))
                    if not base and not forced:
                        out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh), (
                            f"no layer can be sharded on model: weights unsharded over model={m} would compute the "
                            f"same step {m} times; fully sharded data parallel is the {devices}x1 plan")))
                        continue
                lay = _fsdp(graph, base, b, notes)
                desc = (f"fully sharded data parallel over batch={b} (weights, gradients and slots sharded over "
                        "batch, gathered where used)" + (f", on tensor parallel over model={m}" if m > 1 else ""))
                if lay == base and not forced:
                    out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh), (
                        f"no weight of {FSDP_MIN_BYTES >> 10} KiB or more has a free dimension that divides by "
                        f"batch={b}")))
                    continue
            elif rule == "dp":
                if m > 1:
                    out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh), (
                        f"weights replicated over model={m} would compute the same step {m} times; data parallel "
                        f"is the {devices}x1 plan")))
                    continue
                lay: dict[str, tuple] = {}
                desc = "data parallel: every weight replicated, the batch split over batch"
            else:
                if m == 1:
                    out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh),
                                                 "model=1: nothing to shard over (this is the dp plan)"))
                    continue
                lay = _dense_pairs(graph, m, notes)
                if rule == "tp":
                    lay.update(_attention(graph, m, notes))
                    lay.update(_embeddings(graph, m, notes))
                    desc = (f"tensor parallel over model={m} (Dense pairs column/row, attention by heads, embeddings "
                            "by hidden size)" + (f", data parallel over batch={b}" if b > 1 else ""))
                else:
                    desc = f"tensor parallel over model={m}, Dense pairs only" + \
                           (f", data parallel over batch={b}" if b > 1 else "")
                if not lay and not forced:
                    out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh), (
                        "no layer can be sharded on model: " + ("; ".join(notes) if notes else
                                                                  "no Dense pair, attention or embedding"))))
                    continue
            if bad:
                out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh), bad))
                continue
            lay.update(forced)
            layouts = tuple((v.path, lay.get(v.path, (U,) * len(v.shape))) for v in variables)
            key = (mesh, layouts, RULE_IMPLEMENTATION.get(rule, ""))
            if key in seen:
                why = f"the same layouts as {seen[key]!r}"
                if rule == "tp-mlp":
                    why += " (the model has no attention or embedding to leave out)"
                out.excluded.append(Excluded(name, meshspec.format_mesh_spec(mesh), why))
                continue
            seen[key] = name
            if forced:
                desc += f"; {len(forced)} variable(s) forced by --force"
            out.plans.append(StepPlan(rule, mesh, layouts, desc, tuple(notes), RULE_IMPLEMENTATION.get(rule, "")))
    return out


__all__ = ["StepPlan", "Excluded", "StepPlanSearch", "StepPlanError", "search", "factor_meshes", "normalize_mesh",
           "RULES", "DEFAULT_RULES", "RULE_IMPLEMENTATION", "DATA_AXIS", "MODEL_AXIS", "FSDP_MIN_BYTES"]
