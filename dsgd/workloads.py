"""Named workloads (variable lists) and layout policies: what bench, asv, profile and the
advisor all run on.

A workload is a list of :class:`VarSpec`.  A *layout policy* turns a spec and a mesh into
a layout: ``replicated``, ``sharded`` (each variable's largest dimension that divides by
the model axis — the last mesh axis — sharded on it; vectors stay replicated), or a
layout-map file (read by :mod:`dsgd.layoutmap`, which resolves all three).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from dsgd import meshspec


@dataclass(frozen=True)
class VarSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def one_big() -> list[VarSpec]:
    """One 4096x4096 matrix: the bandwidth-bound case."""
    return [VarSpec("dense/kernel", (4096, 4096))]


def bert_mini(layers: int = 4, hidden: int = 256, intermediate: int = 1024, vocab: int = 30522,
              positions: int = 512, token_types: int = 2) -> list[VarSpec]:
    """BERT-mini's trainable variables (~11M parameters, ~70 variables)."""
    v = [
        VarSpec("embeddings/word_embeddings", (vocab, hidden)),
        VarSpec("embeddings/position_embeddings", (positions, hidden)),
        VarSpec("embeddings/token_type_embeddings", (token_types, hidden)),
        VarSpec("embeddings/layer_norm/gamma", (hidden,)),
        VarSpec("embeddings/layer_norm/beta", (hidden,)),
    ]
    for i in range(layers):
        p = f"encoder/layer_{i}"
        for n in ("query", "key", "value"):
            v += [VarSpec(f"{p}/attention/{n}/kernel", (hidden, hidden)), VarSpec(f"{p}/attention/{n}/bias", (hidden,))]
        v += [
            VarSpec(f"{p}/attention/output/kernel", (hidden, hidden)),
            VarSpec(f"{p}/attention/output/bias", (hidden,)),
            VarSpec(f"{p}/attention/layer_norm/gamma", (hidden,)),
            VarSpec(f"{p}/attention/layer_norm/beta", (hidden,)),
            VarSpec(f"{p}/intermediate/kernel", (hidden, intermediate)),
            VarSpec(f"{p}/intermediate/bias", (intermediate,)),
            VarSpec(f"{p}/output/kernel", (intermediate, hidden)),
            VarSpec(f"{p}/output/bias", (hidden,)),
            VarSpec(f"{p}/output/layer_norm/gamma", (hidden,)),
            VarSpec(f"{p}/output/layer_norm/beta", (hidden,)),
        ]
    v += [VarSpec("pooler/kernel", (hidden, hidden)), VarSpec("pooler/bias", (hidden,))]
    return v


def many_small() -> list[VarSpec]:
    """400 small variables: 200 of (256,) and 200 of (64, 64) — the per-op-overhead case."""
    out = []
    for i in range(200):
        out.append(VarSpec(f"small/bias_{i}", (256,)))
        out.append(VarSpec(f"small/kernel_{i}", (64, 64)))
    return out


def resnet_ish() -> list[VarSpec]:
    """A small ResNet's conv kernels and batch-norm scales/offsets (~2.8M parameters)."""
    v = [VarSpec("stem/conv/kernel", (7, 7, 3, 64)), VarSpec("stem/bn/gamma", (64,)), VarSpec("stem/bn/beta", (64,))]
    cin = 64
    for stage, cout in enumerate((64, 128, 256)):
        for block in range(2):
            p = f"stage{stage}/block{block}"
            v += [VarSpec(f"{p}/conv1/kernel", (3, 3, cin, cout)), VarSpec(f"{p}/bn1/gamma", (cout,)),
                  VarSpec(f"{p}/bn1/beta", (cout,)), VarSpec(f"{p}/conv2/kernel", (3, 3, cout, cout)),
                  VarSpec(f"{p}/bn2/gamma", (cout,)), VarSpec(f"{p}/bn2/beta", (cout,))]
            if cin != cout:
                v += [VarSpec(f"{p}/shortcut/kernel", (1, 1, cin, cout))]
            cin = cout
    v += [VarSpec("head/kernel", (cin, 1000)), VarSpec("head/bias", (1000,))]
    return v


WORKLOADS: dict[str, Callable[[], list[VarSpec]]] = {
    "one-big": one_big,
    "bert-mini": bert_mini,
    "many-small": many_small,
    "resnet-ish": resnet_ish,
}


class WorkloadError(ValueError):
    pass


def _read_json(path: Path, what: str):
    """Parse a JSON file; errors name the file and, for bad JSON, the line and column."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkloadError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{what} {path} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None


def load_json_workload(path: str | Path) -> list[VarSpec]:
    """A JSON list of ``{"name": str, "shape": [int, ...], "dtype": str}`` objects."""
    path = Path(path)
    data = _read_json(path, "workload file")
    if not isinstance(data, list) or not data:
        raise WorkloadError(f"workload file {path}: expected a non-empty JSON list of variables")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item or "shape" not in item:
            raise WorkloadError(f"workload file {path}: entry {i} must be an object with 'name' and 'shape'")
        shape = item["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise WorkloadError(
                f"workload file {path}: variable {item['name']!r} has shape {shape!r}; dimensions must be positive integers")
        out.append(VarSpec(str(item["name"]), tuple(shape), str(item.get("dtype", "float32"))))
    return out


def get_workload(name: str, dtype: Optional[str] = None) -> list[VarSpec]:
    """A named workload or a JSON file; ``dtype`` overrides every variable's dtype."""
    if name in WORKLOADS:
        specs = WORKLOADS[name]()
    elif name.endswith(".json") or Path(name).exists():
        specs = load_json_workload(name)
    else:
        raise WorkloadError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)} or give a JSON file")
    if dtype is not None:
        specs = [VarSpec(s.name, s.shape, dtype) for s in specs]
    return specs


# ---------------------------------------------------------------------------- layout policies
LAYOUT_POLICIES = ("replicated", "sharded")


def sharded_spec(spec: VarSpec, mesh_dims: Sequence[tuple[str, int]]) -> list[str]:
    """Shard the largest dimension that divides by the model (last) axis; else replicate."""
    rank = len(spec.shape)
    entries = [meshspec.UNSHARDED] * rank
    if len(mesh_dims) < 2 or rank < 2:
        return entries
    axis, size = mesh_dims[-1]
    if size == 1:
        return entries
    for d in sorted(range(rank), key=lambda d: -spec.shape[d]):
        if spec.shape[d] % size == 0:
            entries[d] = axis
            break
    return entries


def total_params(specs: Sequence[VarSpec]) -> int:
    return sum(s.size for s in specs)
