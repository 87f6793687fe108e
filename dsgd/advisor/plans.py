"""Layout candidates per variable and whole-model layout plans, built by rules (not brute force).

A *layout* is one entry per dimension: a mesh axis name or ``"unsharded"`` (as
:mod:`dsgd.meshspec` parses them).  A *plan* gives every variable of a model one layout.

Per variable the candidates are: replicated; each dimension that divides by a mesh axis
sharded on that axis; and 2-D combinations (two dimensions on two different axes).  The
product over variables is astronomically large (bert-mini: ~10^60), so whole-model plans
are built by rules instead:

* **shard the largest matrices first** -- variables are visited largest first, and the
  "top" plans shard only the largest ones until a share of the parameter bytes is covered;
* **threshold** -- variables smaller than ``min_shard_bytes`` stay replicated (sharding a
  bias saves nothing and costs collectives in the forward pass);
* **largest divisible dimension** -- a variable is sharded along its largest dimension that
  divides by the axis (bert-mini's 30522-row embedding does not divide by 4: its 256
  columns do);
* **match tied variables** -- variables with the same shape, dtype and name stem (the name
  with its numbers taken out: ``encoder/layer_#/attention/query/kernel``) always get the
  same layout, so the layer stack stays uniform and the layout map stays short;
* **user-forced layouts** (``force``) are honoured first; one that no candidate satisfies
  is an error naming the variable.

Plans that give every variable the same layouts are merged (the first name is kept).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from dsgd import layoutmap, meshspec
from dsgd.meshspec import layout_str
from dsgd.harness.measure import DTYPE_BYTES
from dsgd.workloads import VarSpec

UNSHARDED = meshspec.UNSHARDED
Layout = tuple[str, ...]

DEFAULT_MIN_SHARD_BYTES = 64 * 1024
DEFAULT_COVERAGE = 0.9  # the "top" plans shard the largest variables until this share of bytes is sharded


class PlanError(ValueError):
    """A variable no candidate layout fits, or a plan that does not fit the mesh."""


@dataclass(frozen=True)
class Plan:
    """One layout per variable, with how the plan was made."""

    name: str
    layouts: tuple[Layout, ...]
    description: str = ""
    rules: tuple[str, ...] = ()
    axes: tuple[str, ...] = ()  # mesh axes the plan shards parameters on

    def sharded_count(self) -> int:
        return sum(1 for lay in self.layouts if any(e != UNSHARDED for e in lay))


# ------------------------------------------------------------------------------- helpers
def var_bytes(spec: VarSpec) -> int:
    try:
        return spec.size * DTYPE_BYTES[spec.dtype]
    except KeyError:
        raise PlanError(f"variable {spec.name!r}: unsupported dtype {spec.dtype!r}; "
                        f"choose one of {sorted(DTYPE_BYTES)}") from None


def replicated(spec: VarSpec) -> Layout:
    return (UNSHARDED,) * len(spec.shape)


def shards(layout: Sequence[str], mesh_dims: Sequence[tuple[str, int]]) -> int:
    sizes = dict(mesh_dims)
    n = 1
    for e in layout:
        if e != UNSHARDED:
            n *= sizes[e]
    return n


def name_stem(name: str) -> str:
    """The name with its numbers replaced by ``#``: tied variables share it."""
    return re.sub(r"\d+", "#", name)


def tie_groups(specs: Sequence[VarSpec]) -> list[list[int]]:
    """Indices of tied variables (same shape, dtype and name stem), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault((tuple(s.shape), s.dtype, name_stem(s.name)), []).append(i)
    return list(groups.values())


def check_layout(spec: VarSpec, layout: Sequence[str], mesh_dims: Sequence[tuple[str, int]]) -> Optional[str]:
    """None when ``layout`` fits ``spec`` on the mesh, else why not."""
    sizes = dict(mesh_dims)
    if len(layout) != len(spec.shape):
        return f"layout {layout_str(layout)!r} has {len(layout)} entries but the variable has rank {len(spec.shape)}"
    used = set()
    for d, (n, e) in enumerate(zip(spec.shape, layout)):
        if e == UNSHARDED:
            continue
        if e not in sizes:
            return f"{e!r} is not an axis of the mesh ({meshspec.format_mesh_spec(mesh_dims)})"
        if e in used:
            return f"mesh axis {e!r} is used twice"
        used.add(e)
        if n % sizes[e]:
            return f"dimension {d} (size {n}) does not divide by mesh axis {e!r} (size {sizes[e]})"
    return None


def shard_on(spec: VarSpec, axes: Sequence[tuple[str, int]], dim_rule: str = "largest") -> Optional[Layout]:
    """Shard ``spec`` on every axis of ``axes`` (largest axis first), each on its own dimension.

    ``dim_rule``: ``largest`` -- each axis on the largest still-free dimension that divides
    by it; ``last`` -- the last such dimension (column sharding); ``first`` -- the first
    (row sharding).  None when not every axis finds a dimension.
    """
    rank = len(spec.shape)
    lay = [UNSHARDED] * rank
    for a, n in sorted(axes, key=lambda x: -x[1]):
        free = [d for d in range(rank) if lay[d] == UNSHARDED and spec.shape[d] % n == 0]
        if not free:
            return None
        if dim_rule == "largest":
            d = max(free, key=lambda k: (spec.shape[k], -k))
        elif dim_rule == "last":
            d = free[-1]
        elif dim_rule == "first":
            d = free[0]
        else:
            raise ValueError(f"unknown dim_rule {dim_rule!r}")
        lay[d] = a
    return tuple(lay)


def best_effort(spec: VarSpec, axes: Sequence[tuple[str, int]], dim_rule: str) -> Layout:
    """Shard on all of ``axes`` if possible, else on as many as fit (largest axes first), else replicate."""
    axes = [(a, n) for a, n in axes if n > 1]
    for k in range(len(axes), 0, -1):
        for sub in sorted(itertools.combinations(axes, k), key=lambda c: -_prod(n for _, n in c)):
            lay = shard_on(spec, sub, dim_rule)
            if lay is not None:
                return lay
    return replicated(spec)


def _prod(it: Iterable[int]) -> int:
    n = 1
    for x in it:
        n *= x
    return n


# ------------------------------------------------------------------------------- forced layouts
def parse_force(items: Optional[Sequence[str]]) -> list[tuple[re.Pattern, str]]:
    """``["REGEX=LAYOUT", ...]``; LAYOUT is a full spec (``unsharded,model``), ``replicated``,
    or one axis name (``model``: shard on that axis, on whichever dimension divides)."""
    out = []
    for item in items or ():
        try:
            out.append(layoutmap.parse_force(item))
        except ValueError as e:
            raise PlanError(str(e)) from None
    return out


def forced_layout(spec: VarSpec, force: Sequence[tuple[re.Pattern, str]], mesh_dims, dim_rule: str = "largest"):
    """The forced layout of ``spec`` (None if no pattern matches); PlanError if none fits."""
    for rx, lay in force:
        if not rx.search(spec.name):
            continue
        sizes = dict(mesh_dims)
        if lay == "replicated":
            return replicated(spec)
        if "," not in lay and lay in sizes:
            got = shard_on(spec, [(lay, sizes[lay])], dim_rule)
            if got is None:
                raise PlanError(
                    f"variable {spec.name!r} (shape {list(spec.shape)}) is forced onto mesh axis {lay!r} "
                    f"(size {sizes[lay]}) by --force {rx.pattern}={lay}, but no candidate layout fits: "
                    f"no dimension divides by {sizes[lay]}")
            return got
        entries = tuple(e.strip() for e in lay.split(","))
        why = check_layout(spec, entries, mesh_dims)
        if why:
            raise PlanError(f"variable {spec.name!r} (shape {list(spec.shape)}): forced layout {lay!r} "
                            f"(--force {rx.pattern}={lay}) does not fit: {why}")
        return entries
    return None


# ------------------------------------------------------------------------------- plans
def _apply(specs, groups, chosen_groups: set[int], axes, dim_rule, forced, min_shard_bytes) -> tuple[Layout, ...]:
    out: list[Layout] = [replicated(s) for s in specs]
    for gi, idx in enumerate(groups):
        s = specs[idx[0]]
        if forced[idx[0]] is not None:
            lay = forced[idx[0]]
        elif gi in chosen_groups and var_bytes(s) >= min_shard_bytes and len(s.shape) >= 1:
            lay = best_effort(s, axes, dim_rule)
        else:
            lay = replicated(s)
        for i in idx:  # tied variables: one layout for the group
            out[i] = forced[i] if forced[i] is not None else lay
    return tuple(out)


@dataclass
class PlanNote:
    """One whole-model plan the rules considered: kept as a candidate, or why not."""

    name: str
    status: str  # "candidate" | "same as another" | "over --max-plans" | "not built"
    why: str = ""


@dataclass
class PlanSearch:
    """The candidate plans and, as plain data, what was considered and why some were left out."""

    plans: list[Plan]
    notes: list[PlanNote] = field(default_factory=list)
    general: list[str] = field(default_factory=list)  # facts that hold for every plan

    def left_out(self) -> list[PlanNote]:
        return [n for n in self.notes if n.status != "candidate"]


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} B"


def search_plans(specs: Sequence[VarSpec], mesh_dims: Sequence[tuple[str, int]], *,
                 min_shard_bytes: int = DEFAULT_MIN_SHARD_BYTES, coverage: float = DEFAULT_COVERAGE,
                 force: Optional[Sequence[str]] = None, max_plans: int = 12,
                 dim_rules: Sequence[str] = ("largest",)) -> PlanSearch:
    """Whole-model plans for ``specs`` on a mesh, built by the module's rules, de-duplicated,
    with a note for every plan considered (kept, or why not).

    For each set of mesh axes (each axis alone, and every pair for 2-D) and each dimension
    rule: shard every tied group at or above the threshold (``all``), and shard only the
    largest groups until ``coverage`` of the bytes are sharded (``top``).  Plus the
    all-replicated plan.  At most ``max_plans`` are kept (replicated first, then by the
    number of devices the largest variables are split over).
    """
    if not specs:
        raise PlanError("the model has no variables")
    for s in specs:
        var_bytes(s)  # dtype check
    force_rx = parse_force(force)
    forced = [forced_layout(s, force_rx, mesh_dims) for s in specs]
    groups = tie_groups(specs)
    gbytes = [sum(var_bytes(specs[i]) for i in g) for g in groups]
    order = sorted(range(len(groups)), key=lambda g: -gbytes[g])  # largest matrices first
    total = sum(gbytes)
    eligible = [g for g in order if var_bytes(specs[groups[g][0]]) >= min_shard_bytes]
    top: list[int] = []
    acc = 0
    for g in eligible:
        if acc >= coverage * total:
            break
        top.append(g)
        acc += gbytes[g]

    search = PlanSearch([])
    plans = search.plans
    seen: dict[tuple, str] = {}

    def add(plan: Plan) -> None:
        if plan.layouts in seen:
            other = seen[plan.layouts]
            why = (f"the same layouts as {other!r}" if other != "replicated" else
                   "the same layouts as 'replicated': no variable it would shard has a dimension that divides"
                   f" by {' x '.join(plan.axes)}" if plan.axes else "the same layouts as 'replicated'")
            search.notes.append(PlanNote(plan.name, "same as another", why))
            return
        seen[plan.layouts] = plan.name
        plans.append(plan)
        search.notes.append(PlanNote(plan.name, "candidate", plan.description))

    # facts that hold for every plan (what a reader asks first when a plan is missing)
    biggest = max(specs, key=var_bytes)
    small = [s for s in specs if var_bytes(s) < min_shard_bytes]
    if small:
        frac = sum(var_bytes(s) for s in small) / total
        share = f"{frac:.0%}" if frac >= 0.01 or frac == 0 else f"{frac:.2%}"
        search.general.append(f"{len(small)} of {len(specs)} variables ({share} of the bytes) are under "
                              f"--min-shard-bytes ({_kib(min_shard_bytes)}) and stay replicated in every plan")
    n_forced = sum(f is not None for f in forced)
    if n_forced:
        search.general.append(f"{n_forced} variable(s) have a layout forced by --force in every plan")
    one = [a for a, n in mesh_dims if n == 1]
    if one:
        search.general.append(f"mesh axis {', '.join(map(repr, one))} has size 1: sharding on it changes nothing, "
                              "so no plan uses it")

    thresh = f"variables under {min_shard_bytes} bytes stay replicated"
    tied = "tied variables (same shape and name stem) share one layout"
    add(Plan("replicated", tuple(forced[i] or replicated(s) for i, s in enumerate(specs)),
             "every variable replicated on every device (pure data parallelism)", ("baseline",), ()))
    axes = [(a, n) for a, n in mesh_dims if n > 1]
    if not axes:
        search.notes.append(PlanNote("(any sharded plan)", "not built",
                                     f"the mesh {meshspec.format_mesh_spec(mesh_dims)} has one device: "
                                     "there is nothing to shard over"))
    elif not eligible:
        search.notes.append(PlanNote(
            "(any sharded plan)", "not built",
            f"no variable reaches --min-shard-bytes ({_kib(min_shard_bytes)}; the largest, {biggest.name!r}, "
            f"is {_kib(var_bytes(biggest))}), so every sharded plan would equal 'replicated'; "
            f"give --min-shard-bytes {var_bytes(biggest)} or less to consider sharding"))
    axis_sets = [[ax] for ax in axes] + [list(c) for c in itertools.combinations(axes, 2)]
    axis_sets.sort(key=lambda c: -_prod(n for _, n in c))  # most sharding first
    for rule in dim_rules:
        if not eligible:
            break
        for aset in axis_sets:
            names = tuple(a for a, _ in aset)
            label = "+".join(names)
            suffix = "" if rule == "largest" else f"/{rule}"
            dim_text = {"largest": "its largest dimension that divides", "last": "its last dimension that divides",
                        "first": "its first dimension that divides"}[rule]
            how = f"sharded over {' x '.join(f'{a}({n})' for a, n in aset)} on {dim_text}"
            add(Plan(f"{label}{suffix}", _apply(specs, groups, set(eligible), aset, rule, forced, min_shard_bytes),
                     f"every variable >= {min_shard_bytes} B {how} (2-D where both axes fit, else the largest axis that fits)"
                     if len(aset) > 1 else f"every variable >= {min_shard_bytes} B {how}",
                     (thresh, tied, "largest dimension that divides" if rule == "largest" else f"{rule} dimension"),
                     names))
            top_name = f"{label}{suffix}/top{int(round(coverage * 100))}"
            if len(top) < len(eligible):
                add(Plan(top_name, _apply(specs, groups, set(top), aset, rule, forced, min_shard_bytes),
                         f"only the largest variables, {len(top)} tied groups covering >= {coverage:.0%} of the "
                         f"bytes, {how}; the rest replicated",
                         ("shard the largest matrices first", thresh, tied), names))
            else:
                search.notes.append(PlanNote(
                    top_name, "not built",
                    f"covering {coverage:.0%} of the bytes (--coverage) takes every variable over the threshold: "
                    f"it would equal {label + suffix!r}"))
    if len(plans) > max_plans:
        cut = {p.name for p in plans[max_plans:]}
        del plans[max_plans:]
        for n in search.notes:
            if n.name in cut:
                n.status, n.why = "over --max-plans", f"--max-plans {max_plans} keeps the first {max_plans} (" \
                                                       "replicated, then the most sharded)"
    return search


def enumerate_plans(specs: Sequence[VarSpec], mesh_dims: Sequence[tuple[str, int]], *,
                    min_shard_bytes: int = DEFAULT_MIN_SHARD_BYTES, coverage: float = DEFAULT_COVERAGE,
                    force: Optional[Sequence[str]] = None, max_plans: int = 12,
                    dim_rules: Sequence[str] = ("largest",)) -> list[Plan]:
    """The candidate plans of :func:`search_plans` (without its notes)."""
    return search_plans(specs, mesh_dims, min_shard_bytes=min_shard_bytes, coverage=coverage, force=force,
                        max_plans=max_plans, dim_rules=dim_rules).plans


__all__ = ["Plan", "PlanError", "PlanNote", "PlanSearch", "enumerate_plans", "search_plans", "tie_groups",
           "check_layout", "parse_force"]
