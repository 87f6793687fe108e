"""``grouped``: one multi-tensor C++ kernel call per device and group does the whole step.

For each local device, one ``DsgdMultiSgd`` call (:mod:`dsgd.kernels`) clips, decays,
updates (momentum / Nesterov / plain) and averages (EMA) every variable of the group in
place, in one pass over each variable's memory, spread over the CPU thread pool across
all the variables' elements.  Many small variables stop paying TensorFlow's per-op
overhead (one op per device instead of one to four per variable), and large ones run at
memory speed.  Clipping by norm adds one ``DsgdMultiSumSq`` call per device.

Everything constant is built once, when the plan first meets a set of gradients: each
device's variable, momentum and EMA handles packed into one resource vector each
(``DsgdPackHandles``), the weight-decay mask and the hyperparameters.  A step then is,
per device, one gradient list and one op call.

Sparse gradients (``tf.IndexedSlices``) keep ``per_shard``'s semantics: their values are
scaled and clipped first, then densified on each device, and updated by a second kernel
call (without clipping) — only for steps that have sparse gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import tensorflow as tf

from dsgd import kernels
from dsgd.impl.local import LocalEntry, densify_local
from dsgd.impl.per_shard import LocalImplementation, PerShard
from dsgd.plan import Group, StepArgs

DTYPES = ("float32", "float64", "bfloat16", "float16")
_HALF = ("bfloat16", "float16")


@dataclass
class _Call:
    """One kernel call per device: a subset of the step's items and its constant inputs."""

    index: list[int]  # positions in the step's items
    entries: list[LocalEntry]
    sparse: bool  # gradients are IndexedSlices (scaled and clipped before the call)
    vars: list[tf.Tensor]  # per device: packed handles
    accums: list[tf.Tensor]  # per device (the vars' when there is no momentum)
    averages: list[tf.Tensor]  # per device (the vars' when there is no EMA)
    decay: tf.Tensor  # host bool [n], or [0]: every variable decays


class Grouped(LocalImplementation):
    name = "grouped"
    description = "one multi-tensor C++ kernel call per device and group on the local shards (eager)"

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        return kernels.unavailable_reason()

    @classmethod
    def supports(cls, group: Group, options) -> Optional[str]:
        dtype = group.dtype.name
        if dtype not in DTYPES:
            return f"the grouped kernel handles {', '.join(DTYPES)} variables, not {dtype}"
        if group.mesh is not None:
            if group.mesh.device_type().upper() != "CPU":
                return f"the grouped kernel runs on CPU devices, not {group.mesh.device_type()}"
        elif any("GPU" in (e.var.device or "").upper() for e in group.entries):
            return "the grouped kernel runs on CPU devices only"
        md = getattr(options, "momentum_dtype", None)
        if md is not None and md != dtype and getattr(options, "momentum", 0):
            if not (md == "float32" and dtype in _HALF):
                return (f"momentum_dtype={md} with {dtype} variables: the grouped kernel keeps momentum in the "
                        "variables' dtype, or in float32 for bfloat16/float16 variables")
        return None

    def __init__(self, group: Group, options) -> None:
        super().__init__(group, options)
        self._ops = kernels.load()
        first = group.entries[0]
        self._tmomentum = first.momentum.dtype if first.momentum is not None else group.dtype
        inv = {le.inv_replication for le in self.locals.values()}
        if len(inv) != 1:  # groups share a layout, hence a replication factor
            raise ValueError(f"grouped: variables of one group have different replication factors {sorted(inv)}")
        self._inv_replication = inv.pop()
        self._plans: dict[tuple, list[_Call]] = {}
        self._hypers: dict[tuple, tf.Tensor] = {}
        with tf.init_scope():
            self._no_mask = tf.zeros([0], tf.bool)
            self._no_scales = tf.zeros([0], tf.float32)
        self._plan(tuple(id(e) for e in group.entries), (), group.entries)

    # -- constant inputs, built once per set of variables --------------------------------
    def _plan(self, key: tuple, sparse: tuple, entries) -> list[_Call]:
        calls = self._plans.get((key, sparse))
        if calls is not None:
            return calls
        if len(self._plans) > 32:  # gradients for ever-changing subsets: keep the cache bounded
            self._plans.clear()
        les = [self.locals[id(e)] for e in entries]
        dense_idx = [i for i in range(len(les)) if i not in sparse]
        calls = []
        with tf.init_scope():
            for index, is_sparse in ((dense_idx, False), (list(sparse), True)):
                if index:
                    calls.append(self._make_call(index, [les[i] for i in index], is_sparse))
        self._plans[(key, sparse)] = calls
        return calls

    def _make_call(self, index: list[int], les: list[LocalEntry], sparse: bool) -> _Call:
        pack = self._ops.dsgd_pack_handles
        packed = {"var": [], "momentum": [], "average": []}
        for k, dev in enumerate(self.devices):
            with tf.device(dev):
                for slot, out in packed.items():
                    hs = [getattr(le, slot) for le in les]
                    out.append(pack([h[k] for h in hs]) if hs[0] is not None else None)
        mask = [le.entry.decay for le in les]
        decay = self._no_mask if all(mask) else tf.constant(mask, tf.bool)
        var = packed["var"]
        return _Call(index=index, entries=les, sparse=sparse, vars=var,
                     accums=packed["momentum"] if packed["momentum"][0] is not None else var,
                     averages=packed["average"] if packed["average"][0] is not None else var, decay=decay)

    def _hyper(self, args: StepArgs, clip: bool) -> tf.Tensor:
        key = (args.momentum or 0.0, args.weight_decay or 0.0, (args.clipvalue or 0.0) if clip else 0.0,
               args.ema_momentum if args.ema_momentum is not None else 0.0)
        t = self._hypers.get(key)
        if t is None:
            with tf.init_scope():
                t = self._hypers[key] = tf.constant(key, tf.float64)
        return t

    # -- clipping support -------------------------------------------------------------------
    def partial_sumsq(self, split) -> list[tf.Tensor]:
        sumsq = self._ops.dsgd_multi_sum_sq
        out = []
        for k, dev in enumerate(self.devices):
            gs = [parts[k] for _, parts in split]
            with tf.device(dev):
                gs = [_masked_values(g) if isinstance(g, tf.IndexedSlices) else g for g in gs]
                out.append(sumsq(gs, scale=self._inv_replication))
        return out

    # -- the step ------------------------------------------------------------------------------
    def apply(self, split, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        sparse = tuple(i for i, (_, parts) in enumerate(split) if isinstance(parts[0], tf.IndexedSlices))
        entries = [le.entry for le, _ in split]
        calls = self._plan(tuple(id(e) for e in entries), sparse, entries)
        use_momentum = calls[0].entries[0].momentum is not None
        use_ema = args.ema_momentum is not None
        overwrite = bool(args.ema_overwrite) and use_ema
        run = self._ops.dsgd_multi_sgd
        per_device = None if sparse else list(zip(*(p for _, p in split)))  # [device][item], transposed once
        for call in calls:
            if call.sparse:
                call_scales, hyper = self._no_scales, self._hyper(args, clip=False)
            else:
                call_scales, hyper = _scale_vector(scales, call.index, len(split), self._no_scales), self._hyper(args, True)
            for k, dev in enumerate(self.devices):
                with tf.device(dev):
                    if call.sparse:
                        grads = [self._sparse_dense(split[i][1][k], le, scales, i, args)
                                 for i, le in zip(call.index, call.entries)]
                    else:
                        grads = [split[i][1][k] for i in call.index] if sparse else list(per_device[k])
                    run(vars=call.vars[k], accums=call.accums[k], averages=call.averages[k], grads=grads,
                        lr=args.lr, scales=call_scales, decay=call.decay, hyper=hyper, Tmomentum=self._tmomentum,
                        use_momentum=use_momentum, nesterov=bool(args.nesterov), use_ema=use_ema,
                        ema_overwrite=overwrite)

    def _sparse_dense(self, g: tf.IndexedSlices, le: LocalEntry, scales, i: int, args: StepArgs) -> tf.Tensor:
        values = PerShard._clip(g.values, scales, i, args, self.group.dtype)
        return densify_local(tf.IndexedSlices(values, g.indices, g.dense_shape), le.local_shape[0])


def _masked_values(g: tf.IndexedSlices) -> tf.Tensor:
    """The values whose rows are on this device (others zeroed), as per_shard's local_sumsq counts."""
    keep = tf.reshape(g.indices >= 0, [-1] + [1] * (g.values.shape.rank - 1))
    return tf.where(keep, g.values, tf.zeros([], g.values.dtype))


def _scale_vector(scales, index: list[int], n_items: int, none: tf.Tensor) -> tf.Tensor:
    """The kernel's ``scales`` input: [0] none, a scalar shared by all, or one per variable."""
    if scales is None:
        return none
    if tf.is_tensor(scales):  # already a vector over the items
        return scales if len(index) == n_items else tf.gather(scales, index)
    first = scales[0]
    if all(s is first for s in scales):  # global_clipnorm: one coefficient for every variable
        return first
    return tf.stack([scales[i] for i in index] if len(index) < n_items else list(scales))


IMPLEMENTATION = Grouped
