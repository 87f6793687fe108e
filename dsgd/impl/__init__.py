"""Registry of step implementations: add one by writing a module and one line below."""
from __future__ import annotations

from dsgd.impl.base import Implementation
from dsgd.impl.dtensor_ops import FusedDTensor, OpsDTensor
from dsgd.impl.per_shard import PerShard

REGISTRY: dict[str, type[Implementation]] = {
    OpsDTensor.name: OpsDTensor,
    FusedDTensor.name: FusedDTensor,
    PerShard.name: PerShard,
}


def _register_optional() -> None:
    # Implementations whose modules need extra machinery register themselves if importable.
    for modname in ("dsgd.impl.multi_tensor", "dsgd.impl.xla", "dsgd.impl.sharded_state"):
        try:
            mod = __import__(modname, fromlist=["IMPLEMENTATION"])
        except ImportError:
            continue
        cls = getattr(mod, "IMPLEMENTATION", None)
        if cls is not None:
            REGISTRY[cls.name] = cls


_register_optional()

CHOICES = ("auto", *REGISTRY)


def choose(group, options, eager: bool) -> str:
    """``implementation="auto"``'s rule, in order:

    1. inside ``tf.function`` (graph mode, e.g. ``model.fit``): ``fused``;
    2. ``jit_compile=True``: ``xla``;
    3. ``grouped`` when its multi-tensor kernel is built and handles the group;
    4. ``per_shard`` when it handles the group (same dtype for variable and momentum);
    5. else ``ops``.
    """
    candidates = ["fused"] if not eager else (["xla"] if options.jit_compile else []) + ["grouped", "per_shard"]
    for name in candidates:
        cls = REGISTRY.get(name)
        if cls is not None and cls.unavailable_reason() is None and cls.supports(group, options) is None:
            return name
    return "ops"


def get(name: str) -> type[Implementation]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"`implementation` must be one of {list(CHOICES)}, got {name!r}") from None
