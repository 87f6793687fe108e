"""The step model: a whole training step predicted from its parts, with the breakdown shown.

For a plan on a mesh, from the program DTensor ran for it (:class:`~dsgd.advisor.dtensor_program.
ProgramSummary`, scaled to another mesh by each tensor's sharding) and a hardware description::

    step = fixed + compute + collectives (per mesh axis) + update

* ``fixed``: running one program (``call_ms``) and its ops one after another (ops x ``op_us``);
* ``compute``: the MatMul / Einsum / Conv FLOPs of one device at ``flops_per_s``, plus the bytes every
  other op writes and reads at ``bytes_per_s`` -- per layer, scaled by its sharding, as DTensor expanded it;
* ``collectives``: per mesh axis, each all-reduce the step issues by an alpha-beta model, ``count x
  alpha + bytes x beta`` with ``alpha``, ``beta`` of that axis;
* ``update``: the optimizer's update from its roofline: parameter bytes per device x the element accesses
  per parameter (5 for momentum: :func:`dsgd.harness.measure.elements_moved`) at ``bytes_per_s``.

A :class:`Hardware` holds the rates.  On this host they come from microbenchmarks run on each measured
mesh (:mod:`dsgd.advisor.step_calibrate`): its logical devices share its cores, so the rates are the
host's, every device running at once, and a step's per-device work counts once per device.  For an
accelerator (``--hardware FILE``, :func:`load_hardware`) they come from its data sheet: every device runs
its own share, and an axis's collective runs on the link its devices share (ring all-reduce:
``2 (g - 1) / g x bytes / bandwidth + 2 (g - 1) x latency``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from dsgd.advisor import dtensor_program as dp

HARDWARE_DIR = Path(__file__).parent / "hardware"
PARTS = ("fixed", "compute", "collectives", "update")


@dataclass
class Link:
    """One mesh axis's (or link level's) collective cost."""

    alpha_us: float  # per collective
    beta_s_per_byte: float = 0.0  # measured here: seconds per byte of payload
    bandwidth_gbps: float = 0.0  # a data sheet's: GB/s per device, one direction (ring model)
    latency_us: float = 0.0
    merged_alpha_us: Optional[float] = None  # measured here: an all-reduce DTensor merged from several tensors
    merged_beta_s_per_byte: Optional[float] = None  # (it concatenates them first): None -- as any other

    def seconds(self, count: int, nbytes: float, group: int, merged: bool = False) -> float:
        if group < 2 or not count:
            return 0.0
        if self.bandwidth_gbps:  # ring all-reduce
            steps = 2 * (group - 1)
            return count * (self.alpha_us * 1e-6 + steps * self.latency_us * 1e-6) + \
                steps / group * nbytes / (self.bandwidth_gbps * 1e9)
        if merged and self.merged_beta_s_per_byte is not None:
            return count * (self.merged_alpha_us or 0.0) * 1e-6 + nbytes * self.merged_beta_s_per_byte
        return count * self.alpha_us * 1e-6 + nbytes * self.beta_s_per_byte


@dataclass
class Hardware:
    """The rates a prediction uses; ``shared`` -- the devices share one host's rates (logical CPU devices),
    so a step's per-device work counts once per device."""

    name: str
    flops_per_s: float
    bytes_per_s: float
    op_us: float
    call_ms: float
    shared: bool = False
    devices_per_node: int = 0  # 0: every device on one node
    links: dict = field(default_factory=dict)  # axis name or "intra_node" / "inter_node" -> Link
    source: dict = field(default_factory=dict)

    def link_for(self, axis: str, mesh: Sequence[tuple]) -> Optional[Link]:
        """The link an all-reduce over ``axis`` of ``mesh`` runs on: the axis's own (measured here), else
        ``intra_node`` when all of its group lies on one node (devices numbered row-major), else
        ``inter_node``."""
        if axis in self.links:
            return self.links[axis]
        sizes = dict(mesh)
        names = [a for a, _ in mesh]
        stride = math.prod(sizes[a] for a in names[names.index(axis) + 1:]) if axis in names else 1
        span = stride * sizes.get(axis, 1)
        per = self.devices_per_node or 10 ** 9
        level = "intra_node" if span <= per else "inter_node"
        return self.links.get(level)

    @classmethod
    def from_calibration(cls, cal: dict, name: str = "this host (measured)") -> "Hardware":
        links = {a: link_of(v) for a, v in cal.get("axes", {}).items()}
        return cls(name, cal["flops_per_s"], cal["bytes_per_s"], cal["op_us"], cal["call_ms"], True, 0, links,
                   {"measured": "dsgd.advisor.step_calibrate on the mesh measured"})


def link_of(v: dict) -> Link:
    """A :class:`Link` from a hardware file's or a calibration's figures."""
    return Link(float(v.get("alpha_us", 0.0)), float(v.get("beta_s_per_byte", 0.0)),
                float(v.get("bandwidth_gbps", 0.0)), float(v.get("latency_us", 0.0)),
                None if v.get("merged_alpha_us") is None else float(v["merged_alpha_us"]),
                None if v.get("merged_beta_s_per_byte") is None else float(v["merged_beta_s_per_byte"]))


def load_hardware(path: str) -> Hardware:
    """A hardware file (JSON): ``name``, ``flops_per_s``, ``bytes_per_s``, ``op_us``, ``call_ms``,
    ``devices_per_node``, ``links: {intra_node|inter_node|<axis>: {bandwidth_gbps, latency_us, alpha_us}
    or {alpha_us, beta_s_per_byte}}``, ``shared`` and ``source`` (where each figure comes from).  A bare
    name (``nvidia-h100-sxm``) is looked up among the files shipped in ``dsgd/advisor/hardware/``."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = HARDWARE_DIR / f"{path}.json"
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"--hardware {path!r}: no such file; give a JSON file or one of "
                         f"{sorted(x.stem for x in HARDWARE_DIR.glob('*.json'))}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--hardware {path!r}: not valid JSON (line {e.lineno}: {e.msg})") from None
    need = ("name", "flops_per_s", "bytes_per_s", "op_us", "call_ms", "links")
    missing = [k for k in need if k not in d]
    if missing:
        raise ValueError(f"--hardware {path!r}: missing {', '.join(missing)}; see {HARDWARE_DIR}/*.json")
    links = {k: link_of(v) for k, v in d["links"].items()}
    return Hardware(d["name"], float(d["flops_per_s"]), float(d["bytes_per_s"]), float(d["op_us"]),
                    float(d["call_ms"]), bool(d.get("shared", False)), int(d.get("devices_per_node", 0)), links,
                    d.get("source", {}))


def update_bytes(param_bytes: float, opts: dict) -> float:
    """Ideal memory traffic of one device's update (bytes)."""
    from dsgd.harness.measure import elements_moved

    return param_bytes * elements_moved(opts)


def predict(program: dp.ProgramSummary, hw: Hardware, mesh: Sequence[tuple], *, param_bytes: float,
            opts: dict, target: Optional[Sequence[tuple]] = None, batch_ratio: float = 1.0,
            with_update: bool = True) -> Optional[dict]:
    """The step's predicted parts (ms) on ``target`` (default: the mesh the program was read on):
    ``fixed``, ``compute``, ``collectives`` (and ``coll:<axes>`` per axis), ``update`` and ``total``;
    ``param_bytes`` is per device on that mesh.  None when the plan's tensors do not divide there."""
    tgt = list(target) if target is not None else list(mesh)
    n_dev = math.prod(n for _, n in tgt)
    if target is None:  # as read: the issued all-reduces, checked against the final program
        flops, nbytes = program.flops, program.out_bytes
        issued = dp.issued_list(program)
        if issued is None:  # not matched to their tensors: none counted as merged
            issued = [(tuple(c.axes), c.bytes / c.count, False) for c in program.issued for _ in range(c.count)]
    else:
        sc = dp.scaled_compute(program, tgt, batch_ratio)
        issued = dp.issued_list(program, tgt, batch_ratio)
        if sc is None or issued is None:
            return None
        flops, nbytes = sc
    devs = n_dev if hw.shared else 1
    out = {"fixed": hw.call_ms + program.ops * hw.op_us * 1e-3,
           "compute": (flops * devs / hw.flops_per_s + nbytes * devs / hw.bytes_per_s) * 1e3}
    coll = 0.0
    sizes = dict(tgt)
    for axes, b, merged in issued:
        group = math.prod(sizes.get(a, 1) for a in axes)
        t = 0.0
        for a in axes:  # a collective over several axes: the slowest of their links
            link = hw.link_for(a, tgt)
            if link is not None:
                t = max(t, link.seconds(1, b, group, merged))
        name = "+".join(axes)
        out["coll:" + name] = out.get("coll:" + name, 0.0) + t * 1e3
        out["coll_bytes:" + name] = out.get("coll_bytes:" + name, 0) + b
        coll += t * 1e3
    out["collectives"] = coll
    out["update"] = update_bytes(param_bytes, opts) * devs / hw.bytes_per_s * 1e3 if with_update else 0.0
    out["total"] = sum(out[p] for p in PARTS)
    out["flops"] = flops
    out["bytes"] = nbytes
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan with fewer than 2 pairs."""
    import numpy as np

    pairs = [(x, y) for x, y in zip(a, b) if x == x and y == y]
    if len(pairs) < 2:
        return float("nan")

    def ranks(v):
        v = np.asarray(v, float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for x in np.unique(v):
            m = v == x
            r[m] = r[m].mean()
        return r

    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


__all__ = ["Hardware", "Link", "link_of", "load_hardware", "predict", "spearman", "update_bytes", "PARTS", "HARDWARE_DIR"]
