"""The mesh vocabulary, pure: mesh specs (``batch=2,model=4``) and layout strings (``model,unsharded``).

No TensorFlow here (the JAX comparison and the argument checks use it without starting it);
building meshes and ``dtensor.Layout`` objects is :mod:`dsgd.mesh`'s job.  Every front end
(CLI, benchmarks, advisor, tests) goes through these, so a spec means the same thing
everywhere and a bad one gets the same clear error.  The layout helpers below read any object
with ``sharding_specs`` and ``mesh`` (a ``dtensor.Layout``) without importing TensorFlow.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

UNSHARDED = "unsharded"
_AXIS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """A mesh or layout spec that is malformed or does not fit."""


def parse_mesh_spec(spec: str) -> list[tuple[str, int]]:
    """``"batch=2,model=4"`` -> ``[("batch", 2), ("model", 4)]``.

    ``"1"`` or ``""`` means a one-device mesh with a single axis ``batch``.
    """
    spec = (spec or "").strip()
    if spec in ("", "1"):
        return [("batch", 1)]
    dims: list[tuple[str, int]] = []
    for part in spec.split(","):
        name, sep, size = part.strip().partition("=")
        name = name.strip()
        if not sep or not _AXIS_RE.match(name):
            raise SpecError(
                f"mesh spec {spec!r}: expected comma-separated NAME=SIZE items such as "
                f"'batch=2,model=4', got {part!r}"
            )
        try:
            n = int(size)
        except ValueError:
            raise SpecError(f"mesh spec {spec!r}: size of axis {name!r} must be an integer, got {size!r}") from None
        if n < 1:
            raise SpecError(f"mesh spec {spec!r}: size of axis {name!r} must be >= 1, got {n}")
        if name in (d for d, _ in dims):
            raise SpecError(f"mesh spec {spec!r}: axis {name!r} appears twice")
        if name == UNSHARDED:
            raise SpecError(f"mesh spec {spec!r}: {UNSHARDED!r} is reserved and cannot name an axis")
        dims.append((name, n))
    return dims


def mesh_size(dims: Sequence[tuple[str, int]]) -> int:
    """Devices a mesh of these axes spans."""
    return math.prod(n for _, n in dims)


def format_mesh_spec(dims: Sequence[tuple[str, int]]) -> str:
    """``[("batch", 2), ("model", 4)]`` -> ``"batch=2,model=4"`` (read back by :func:`parse_mesh_spec`)."""
    return ",".join(f"{k}={v}" for k, v in dims)


def mesh_dims(mesh) -> list[tuple[str, int]]:
    """A ``dtensor.Mesh``'s axes as ``[(name, size), ...]``."""
    return [(n, mesh.dim_size(n)) for n in mesh.dim_names]


@dataclass(frozen=True)
class MeshSpec:
    """An immutable mesh shape: axis names and sizes, in order.  Iterates as ``(name, size)``
    pairs, so it goes wherever a list of pairs does."""

    dims: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, mesh: Union[str, Sequence[tuple[str, int]], "MeshSpec"]) -> "MeshSpec":
        """From a spec string, a list of pairs, a MeshSpec or a ``dtensor.Mesh``."""
        if isinstance(mesh, MeshSpec):
            return mesh
        if isinstance(mesh, str):
            return cls(tuple(parse_mesh_spec(mesh)))
        if hasattr(mesh, "dim_names"):
            return cls(tuple(mesh_dims(mesh)))
        return cls(tuple((str(n), int(k)) for n, k in mesh))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.dims)

    @property
    def size(self) -> int:
        return mesh_size(self.dims)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.dims)

    def __len__(self) -> int:
        return len(self.dims)

    def __str__(self) -> str:
        return format_mesh_spec(self.dims)


def layout_str(entries: Sequence[str]) -> str:
    """``('unsharded', 'model')`` -> ``'unsharded,model'``; all unsharded (or rank 0) -> ``'replicated'``.

    The one way a layout is written: :func:`parse_layout_spec` reads it back for any rank.
    """
    if all(e == UNSHARDED for e in entries):
        return "replicated"
    return ",".join(entries)


def parse_layout_str(spec: str, rank: int) -> list[str]:
    """A layout string as one entry per dimension (``"replicated"``/``""``: ``rank`` x unsharded).

    The inverse of :func:`layout_str`; the rank is the caller's to check.
    """
    s = spec.strip()
    if s in ("replicated", ""):
        return [UNSHARDED] * rank
    return [e.strip() for e in s.split(",")]


def layout_to_spec(layout) -> str:
    """A ``dtensor.Layout``'s entries, rank kept (``'unsharded,unsharded'``; ``'replicated'`` for rank 0).

    An identity, not a display form: ``plan.group_entries`` keys the step's groups on it, so a
    replicated vector and a replicated matrix stay in separate groups.  Layout maps, reports and
    messages write layouts with :func:`layout_str`; both read back with ``parse_layout_spec``.
    """
    specs = list(layout.sharding_specs)
    return ",".join(specs) if specs else "replicated"


def replication_factor(layout) -> int:
    """How many devices hold each element of a tensor with this layout."""
    mesh = layout.mesh
    sharded = {s for s in layout.sharding_specs if s != UNSHARDED}
    return math.prod(mesh.dim_size(n) for n in mesh.dim_names if n not in sharded)


def shards_per_dim(layout) -> list[int]:
    mesh = layout.mesh
    return [1 if s == UNSHARDED else mesh.dim_size(s) for s in layout.sharding_specs]


def local_shape(layout, shape: Sequence[int]) -> list[int]:
    return [d // k for d, k in zip(shape, shards_per_dim(layout))]


def __getattr__(name: str):
    # make_mesh and parse_layout_spec build TensorFlow objects: they live in dsgd.mesh; the old
    # names keep working without this module importing it (or TensorFlow) up front
    if name in ("make_mesh", "parse_layout_spec"):
        from dsgd import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
