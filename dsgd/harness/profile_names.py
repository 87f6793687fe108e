"""``dsgd profile``'s run names: what TensorBoard's session picker shows, one name per configuration
(used by the command, :mod:`dsgd.harness.profile`, and by the ledger, :mod:`dsgd.harness.profile_ledger`)."""
from __future__ import annotations

import os
import re

from dsgd.harness.measure import Case


def _slug(s: str) -> str:
    s = os.path.splitext(os.path.basename(s))[0] if (s.endswith(".json") or os.sep in s) else s
    return re.sub(r"[^A-Za-z0-9=,.+-]+", "-", s).strip("-") or "x"


def mesh_tag(mesh: str) -> str:
    """A short mesh name for run names: ``1dev``, ``b8``, ``b2m4`` (axis initial + size).

    Axes sharing an initial keep their whole name (``data2dcn4``); the full spec is in the
    run's ``summary.json`` and the ledger.
    """
    from dsgd import meshspec

    try:
        dims = meshspec.MeshSpec.of(mesh)
    except ValueError:
        return _slug(mesh)
    if dims.size == 1:
        return "1dev"
    initials = [a[0] for a, _ in dims]
    unique = len(set(initials)) == len(initials)
    return "".join(f"{a[0] if unique else a}{n}" for a, n in dims)


def config_name(case: Case) -> str:
    """The run name of a case, as TensorBoard's session picker shows it (about 28 characters).

    What tells configurations apart comes first: workload, mesh (:func:`mesh_tag`), XLA on or
    off, implementation; then only the fields that differ from ``dsgd profile``'s defaults
    (layout ``sharded``, dtype ``float32``, options ``momentum``, eager, CPU), e.g.
    ``bert-mini_b2m4_xla-on_auto`` or ``many-small_1dev_xla-off_auto_replicated_full``.
    """
    parts = [_slug(case.workload), mesh_tag(case.mesh), "xla-on" if case.xla else "xla-off",
             _slug(case.implementation)]
    if case.layout != "sharded":
        parts.append(_slug(case.layout))
    if case.dtype not in (None, "float32"):
        parts.append(_slug(case.dtype))
    if case.options != "momentum":
        parts.append(_slug(case.options))
    if case.mode != "eager":  # graph, train_step, fit
        parts.append(_slug(case.mode))
    if case.device.upper() != "CPU":
        parts.append(case.device.lower())
    return "_".join(parts)
