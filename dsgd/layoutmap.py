"""Layout maps: ``{regex: layout spec}`` files, read, applied and written with tf_keras' rule.

A layout map is an ordered JSON object (bare, or under ``"layouts"`` as ``dsgd layouts
--emit-layout-map`` writes it) from a variable-name pattern to a layout spec
(``"unsharded,model"``, a list of entries, or ``"replicated"``).  A name's layout is the one
``tf_keras.dtensor.experimental.LayoutMap.__getitem__`` would give it: the exact key first,
then the first key that ``re.match``-es the name (anchored at the start, not ``re.search``);
no match means replicated.  Every reader goes through :func:`lookup`, so ``dsgd bench``, the
asv suite, ``dsgd profile``, ``dsgd layouts`` and a tf_keras model built under
:func:`load_layout_map` give a variable the same layout.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

from dsgd import meshspec
from dsgd.workloads import VarSpec, WorkloadError, sharded_spec

REPLICATED = "replicated"


def read(path: str | Path) -> dict[str, str]:
    """The ``{regex: spec}`` of a layout-map file, in file order; every key compiles.

    Errors (:class:`~dsgd.workloads.WorkloadError`) name the file and, for bad JSON, the line.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkloadError(f"layout map {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise WorkloadError(f"layout map {path} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("layouts"), dict):
        data = data["layouts"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, (str, list)) for k, v in data.items()):
        raise WorkloadError(f"layout map {path}: expected a JSON object mapping regex -> layout spec")
    out = {}
    for k, v in data.items():
        try:
            re.compile(k)
        except re.error as e:
            raise WorkloadError(f"layout map {path}: bad regex {k!r}: {e}") from None
        out[k] = v if isinstance(v, str) else ",".join(v)
    return out


def parse_force(item: str) -> tuple[re.Pattern, str]:
    """One ``--force REGEX=LAYOUT`` item (``dsgd layouts``): the compiled regex and the layout (a full spec,
    ``replicated``, or one axis name), split at the last ``=`` (a layout never holds one); a ValueError
    naming the item otherwise."""
    rx, sep, lay = item.rpartition("=")
    if not sep or not rx or not lay.strip():
        raise ValueError(f"--force {item!r}: expected REGEX=LAYOUT, e.g. 'word_embeddings=unsharded,model' or "
                         "'kernel=model'")
    try:
        return re.compile(rx), lay.strip()
    except re.error as e:
        raise ValueError(f"--force {item!r}: bad regex {rx!r} ({e}); fix the pattern") from None


def lookup(layout_map: Mapping[str, str], name: str) -> Optional[str]:
    """The spec ``name`` gets: exact key, else the first key that ``re.match``-es; else None.

    The same rule as ``tf_keras.dtensor.experimental.LayoutMap.__getitem__``.
    """
    if name in layout_map:
        return layout_map[name]
    for k, v in layout_map.items():
        if re.match(k, name):
            return v
    return None


def entries_for(layout_map: Mapping[str, str], var: VarSpec, source: str = "layout map") -> list[str]:
    """The layout (one entry per dimension) the map gives ``var``; rank is checked."""
    spec = lookup(layout_map, var.name)
    entries = meshspec.parse_layout_str(spec or REPLICATED, len(var.shape))
    if len(entries) != len(var.shape):
        raise WorkloadError(f"{source}: spec {spec!r} for {var.name} does not match rank {len(var.shape)}")
    return entries


def apply(layout_map: Mapping[str, str], specs: Sequence[VarSpec]) -> tuple[tuple[str, ...], ...]:
    """Every variable's layout under the map, as tuples of entries."""
    return tuple(tuple(entries_for(layout_map, s)) for s in specs)


def layout_entries(spec: VarSpec, mesh_dims: Sequence[tuple[str, int]], policy: str) -> list[str]:
    """The layout a policy gives a variable: ``replicated``, ``sharded``, or a layout-map file."""
    if policy == "replicated":
        return [meshspec.UNSHARDED] * len(spec.shape)
    if policy == "sharded":
        return sharded_spec(spec, mesh_dims)
    return entries_for(read(policy), spec, f"layout map {policy}")


# ------------------------------------------------------------------------------- writing
def _stem_regex(name: str) -> str:
    parts = re.split(r"(\d+)", name)
    return "^" + "".join(r"\d+" if i % 2 else re.escape(p) for i, p in enumerate(parts)) + "$"


def emit(specs: Sequence[VarSpec], layouts: Sequence[Sequence[str]], *, groups: Sequence[Sequence[int]] = (),
         include_replicated: bool = False) -> dict[str, str]:
    """Layouts as an ordered ``{regex: layout spec}`` map that :func:`lookup` reads back.

    Regexes are anchored and escaped variable names; each of ``groups`` (indices of tied
    variables, e.g. ``plans.tie_groups``) whose numbered-name pattern selects exactly that
    group's variables and whose layouts agree becomes one ``\\d+`` pattern.  Replicated
    variables are left out (the default) unless ``include_replicated``.  The result is
    verified to reproduce ``layouts``.
    """
    out: dict[str, str] = {}
    done: set[int] = set()
    for idx in groups:
        if len(idx) < 2:
            continue
        rx = _stem_regex(specs[idx[0]].name)
        hits = {i for i, s in enumerate(specs) if re.match(rx, s.name)}
        if hits == set(idx) and len({tuple(layouts[i]) for i in idx}) == 1:
            lay = meshspec.layout_str(layouts[idx[0]])
            if lay != REPLICATED or include_replicated:
                out[rx] = lay
            done |= set(idx)
    for i, s in enumerate(specs):
        lay = meshspec.layout_str(layouts[i])
        if i not in done and (lay != REPLICATED or include_replicated):
            out["^" + re.escape(s.name) + "$"] = lay
    for s, lay in zip(specs, layouts):
        got = meshspec.layout_str(entries_for(out, s))
        if got != meshspec.layout_str(lay):
            raise AssertionError(f"layout map does not reproduce the plan for {s.name}: {got} != {meshspec.layout_str(lay)}")
    return out


def write(path: str | Path, specs: Sequence[VarSpec], layouts, *, mesh: str = "", plan: str = "",
          groups: Sequence[Sequence[int]] = ()) -> dict:
    """Write ``{"mesh", "plan", "layouts": {regex: layout spec}}`` (JSON); returns it."""
    doc = {"mesh": mesh, "plan": plan, "layouts": emit(specs, layouts, groups=groups)}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


# ------------------------------------------------------------------------------- tf_keras
def check_axes(layout_map: Mapping[str, str], axes: Sequence[str], source: str = "layout map") -> None:
    """Every spec names only ``axes`` (or ``unsharded``); else :class:`~dsgd.meshspec.SpecError`."""
    for rx, spec in layout_map.items():
        bad = [p for p in meshspec.parse_layout_str(spec, 0) if p != meshspec.UNSHARDED and p not in axes]
        if bad:
            raise meshspec.SpecError(f"{source}: {rx!r} -> {spec!r} names axes {bad} that the mesh "
                                     f"{list(axes)} does not have")


def to_keras(layout_map: Mapping[str, str], mesh, source: str = "layout map"):
    """The map as a ``tf_keras.dtensor.experimental.LayoutMap`` on ``mesh``.

    A ``replicated`` entry has no rank until a variable meets it, so it is kept as a marker
    that the returned map's ``__getitem__`` turns into ``None`` (tf_keras' replicated
    default); it still shadows later keys, exactly as :func:`lookup` does.
    """
    import tf_keras
    from tensorflow.experimental import dtensor

    check_axes(layout_map, list(mesh.dim_names), source)
    lmap = _keras_class(tf_keras)(mesh=mesh)
    for rx, spec in layout_map.items():
        if spec.strip() in (REPLICATED, ""):
            lmap._layout_map[rx] = REPLICATED  # noqa: SLF001 - __setitem__ only takes Layouts
        else:
            lmap[rx] = dtensor.Layout(meshspec.parse_layout_str(spec, 0), mesh)
    return lmap


_KERAS_CLASS = None


def _keras_class(tf_keras):
    """``LayoutMap`` whose replicated markers read as ``None`` (defined once, lazily: tf_keras is heavy)."""
    global _KERAS_CLASS
    if _KERAS_CLASS is None:
        class DsgdLayoutMap(tf_keras.dtensor.experimental.LayoutMap):
            def __getitem__(self, key):
                got = super().__getitem__(key)
                return None if isinstance(got, str) else got

        _KERAS_CLASS = DsgdLayoutMap
    return _KERAS_CLASS


def load_layout_map(path: str | Path, mesh):
    """A layout-map file as a tf_keras ``LayoutMap`` on ``mesh``, in one call.

    >>> layout_map = dsgd.layoutmap.load_layout_map("layouts.json", mesh)
    >>> with layout_map.scope():
    ...     model = build_model()

    Unmatched variables are replicated; each spec is checked against the mesh's axes, ranks
    when the variable is created.
    """
    return to_keras(read(path), mesh, f"layout map {path}")
