"""``grouped``: one multi-tensor C++ kernel call does the whole step.

One ``DsgdMultiSgd`` call (:mod:`dsgd.kernels`) clips, decays, updates (momentum /
Nesterov / plain) and averages (EMA) every variable in place, in one pass over each
variable's memory, spread over the CPU thread pool across all the variables' elements.
Many small variables stop paying TensorFlow's per-op overhead (one call instead of one to
four ops per variable per device), and large ones run at memory speed.  The kernel does
not care about layouts, so the plan's groups (one per layout) that share a dtype are
combined into one call (:meth:`Grouped.combine`).

Clipping by norm adds one ``DsgdMultiSumSq`` call, over the gradients of which each
device holds the first replica only (``LocalEntry.primary``): each element is read once
per shard, not once per device copy (a batch-replicated model reads 1/8 of it on 8
devices), and the sums need no rescaling by the replication factor.

How the calls are fed.  The default is dsgd's C++ dispatch (``dsgd/kernels/dispatch.cc``,
:func:`dsgd.eager_dtensor.direct`): the per-device components DTensor already holds are
borrowed and their buffers' addresses handed to the kernels' by-address variants — one
``DsgdMultiSgdAll`` call for every local device (the logical CPU devices share host memory
and one thread pool, so one pass beats eight calls in a row) and one ``DsgdMultiSumSqAt``
call for all devices' primary shards.  No ``dtensor.unpack``, no Python object and no op
input per component (400 gradients on 8 devices: ~15 ms of unpacking and op inputs become
well under 1 ms).  Where the extension is unavailable or a gradient is not a plain dense
DTensor, ``dtensor.unpack`` feeds one call per device instead (same arithmetic).

Everything constant is built once, when the step first meets a set of gradients: each
device's variables, momentum and EMA slots, looked up once into a ref-counting variable
set (``DsgdPackVars``, and its address for ``DsgdMultiSgdAll``), the weight-decay mask and
the hyperparameters.

Sparse gradients (``tf.IndexedSlices``) keep ``per_shard``'s semantics: their values are
scaled and clipped first, then densified on each device, and updated by a second kernel
call (without clipping) — only for steps that have sparse gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tensorflow.python.framework.ops import EagerTensor

from dsgd import eager_dtensor, kernels
from dsgd.impl.gradients import update_gradient
from dsgd.impl.local import LocalEntry, LocalImplementation, replica_sources
from dsgd.kernels import abi, dispatch
from dsgd.plan import Group, StepArgs

DTYPES = ("float32", "float64", "bfloat16", "float16")
_HALF = ("bfloat16", "float16")


@dataclass
class _Call:
    """One kernel call per device: a subset of the step's items and its constant inputs."""

    index: list[int]  # positions in the step's items
    entries: list[LocalEntry]
    sparse: bool  # gradients are IndexedSlices (scaled and clipped before the call)
    varsets: list[tf.Tensor]  # per device: DsgdPackVars of the variables and their slots
    decay: tf.Tensor  # host bool [n], or [0]: every variable decays
    addresses: Optional[tf.Tensor] = None  # host int64 [devices]: the varsets, for DsgdMultiSgdAll (dense)
    sources: Optional[tf.Tensor] = None  # host int32 [devices * n] or [0]: replica map (local.replica_sources)


@dataclass
class _Direct:
    """A step's dense DTensor gradients, their components held in C++ (``_dsgd_dispatch``)."""

    les: list[LocalEntry]
    comps: object  # capsule of borrowed per-device handles; keeps the gradients alive
    mod: object  # the _dsgd_dispatch module that holds them

    def __len__(self) -> int:
        return len(self.les)


@dataclass
class _SumSq:
    """Per device: which of the step's items it sums (those it holds the first replica of)."""

    index: list[list[int]]  # per device: positions in the step's items
    slots: list[tf.Tensor]  # per device: host int32 copy of ``index`` (the kernel's input)
    zeros: list[tf.Tensor]  # per device: float32 [n] zeros, for a device that sums nothing
    all_slots: Optional[tf.Tensor] = None  # ``index`` of every device concatenated (one call for all)


class Grouped(LocalImplementation):
    name = "grouped"
    description = "one multi-tensor C++ kernel call per device on the local shards, all layouts together (eager)"
    vector_scales = True  # apply() takes per-variable clip coefficients as one vector

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

    def __init__(self, group: Group, options, locals_: Optional[dict] = None) -> None:
        super().__init__(group, options, locals_)
        self._ops = kernels.load()
        self._tmomentum = momentum_dtype(group)
        self._plans: dict[tuple, list[_Call]] = {}
        self._sumsq_plans: dict[tuple, _SumSq] = {}
        self._hypers: dict[tuple, tf.Tensor] = {}
        with tf.init_scope():
            self._no_mask = tf.zeros([0], tf.bool)
            self._no_scales = tf.zeros([0], tf.float32)
        # the variable sets are packed at the first step that needs them: an instance that is
        # combined with others (combine) never packs its own

    def combine_key(self) -> tuple:
        return (type(self), self.group.dtype, self._tmomentum, tuple(self.devices), str(self.group.mesh))

    @classmethod
    def combine(cls, impls: Sequence["Grouped"], options) -> Optional["Grouped"]:
        """One instance for several groups' variables (one kernel call per device for all of
        them), or None when they cannot share a call (dtype, momentum dtype or devices differ)."""
        if len(impls) < 2 or any(type(i) is not cls for i in impls):
            return None
        first = impls[0]
        if any(i.group.dtype != first.group.dtype or i._tmomentum != first._tmomentum
               or i.devices != first.devices or i.group.mesh != first.group.mesh for i in impls):
            return None
        entries = [e for i in impls for e in i.group.entries]
        group = Group("+".join(i.group.layout_spec for i in impls), first.group.dtype, first.group.mesh, entries)
        return cls(group, options, locals_={k: v for i in impls for k, v in i.locals.items()})

    def prepare(self, items):
        """Dense DTensor gradients as a :class:`_Direct` (components read in C++) when the
        dispatch extension is usable; otherwise each split by ``dtensor.unpack``."""
        mod = eager_dtensor.direct(self.group.mesh) if self.group.mesh is not None else None
        if mod is not None and all(type(g) is EagerTensor for _, g in items):
            try:
                comps = mod.components([g for _, g in items], self.devices)
            except ValueError:  # not all plain dense DTensors (NotDense): the general path
                comps = None
            if comps is not None:
                locs = self.locals
                return _Direct([locs[id(e)] for e, _ in items], comps, mod)
        return super().prepare(items)

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
        varsets = pack_varsets(self._ops, self.devices, les, les[0].momentum is not None,
                               les[0].average is not None)
        mask = [le.entry.decay for le in les]
        decay = self._no_mask if all(mask) else tf.constant(mask, tf.bool)
        addresses = None if sparse else _set_addresses(self._ops, self.devices, varsets)
        sources = None
        if not sparse:  # one call for every device: each replicated block computed once, copied to the others
            with tf.device(self.devices[0]):
                sources = tf.constant(replica_sources(les) or [], tf.int32)
        return _Call(index=index, entries=les, sparse=sparse, varsets=varsets, decay=decay, addresses=addresses,
                     sources=sources)

    def _hyper(self, args: StepArgs, clip: bool) -> tf.Tensor:
        key = tuple(abi.hyper(momentum=args.momentum or 0.0, weight_decay=args.weight_decay or 0.0,
                              clipvalue=(args.clipvalue or 0.0) if clip else 0.0,
                              ema_momentum=args.ema_momentum if args.ema_momentum is not None else 0.0))
        t = self._hypers.get(key)
        if t is None:
            with tf.init_scope():
                t = self._hypers[key] = tf.constant(key, tf.float64)
        return t

    # -- clipping support -------------------------------------------------------------------
    def _sumsq_plan(self, les: list[LocalEntry]) -> _SumSq:
        key = tuple(id(le) for le in les)
        plan = self._sumsq_plans.get(key)
        if plan is None:
            if len(self._sumsq_plans) > 32:
                self._sumsq_plans.clear()
            index = [[i for i, le in enumerate(les) if le.primary[k]] for k in range(len(self.devices))]
            with tf.init_scope():
                slots, zeros = [], []
                for k, dev in enumerate(self.devices):
                    with tf.device(dev):
                        slots.append(tf.constant(index[k], tf.int32))
                        zeros.append(tf.zeros([len(les)], tf.float32))
                with tf.device(self.devices[0]):
                    all_slots = tf.constant([i for ix in index for i in ix], tf.int32)
            plan = self._sumsq_plans[key] = _SumSq(index, slots, zeros, all_slots)
        return plan

    def partial_sumsq(self, split) -> list[tf.Tensor]:
        """Per device, the sums of squares of the gradients it holds the first replica of
        (zeros elsewhere): summed over every device of the mesh, each variable's exact sum."""
        sumsq = self._ops.dsgd_multi_sum_sq
        if isinstance(split, _Direct):  # one call sums every device's primaries: the totals on device 0
            plan = self._sumsq_plan(split.les)
            total = dispatch.run_all(split.mod, split.comps, op="DsgdMultiSumSqAt", device=self.devices[0],
                                     select=plan.index, after=[plan.all_slots], ints={"size": len(split)}, outputs=1)
            return [plan.zeros[0] if total is None else total]  # no zeros to add for the other devices
        plan = self._sumsq_plan([le for le, _ in split])
        out = []
        for k, dev in enumerate(self.devices):
            index = plan.index[k]
            if not index:
                out.append(plan.zeros[k])
                continue
            with tf.device(dev):
                gs = [split[i][1][k] for i in index]
                gs = [_masked_values(g) if isinstance(g, tf.IndexedSlices) else g for g in gs]
                out.append(sumsq(gs, plan.slots[k], size=len(split)))
        return out

    def global_clip_scale(self, sumsq: tf.Tensor, clipnorm: float) -> tf.Tensor:
        """The base's coefficient in one op (``DsgdGlobalClipScale``) instead of five."""
        inv = float(np.float32(1.0 / clipnorm))  # as tf.constant(1 / clipnorm) rounds it
        with tf.device(sumsq.device):
            return self._ops.dsgd_global_clip_scale(sumsq, clipnorm=clipnorm, inv_clipnorm=inv)

    # -- the step ------------------------------------------------------------------------------
    def apply(self, split, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        if isinstance(split, _Direct):
            return self._apply_direct(split, args, scales)
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
                call_scales = _scale_vector(scales, call.index, len(split), self._no_scales)
                hyper = self._hyper(args, True)
            for k, dev in enumerate(self.devices):
                with tf.device(dev):
                    if call.sparse:  # scaled and clipped slice by slice, then summed (the kernel's clipping off)
                        grads = [update_gradient(split[i][1][k], scales, i, args.clipvalue, self.group.dtype,
                                                 le.local_shape)
                                 for i, le in zip(call.index, call.entries)]
                    else:
                        grads = [split[i][1][k] for i in call.index] if sparse else list(per_device[k])
                    run(varset=call.varsets[k], grads=grads, lr=args.lr, scales=call_scales, decay=call.decay,
                        hyper=hyper, Tmomentum=self._tmomentum, use_momentum=use_momentum,
                        nesterov=bool(args.nesterov), use_ema=use_ema, ema_overwrite=overwrite)

    def _apply_direct(self, split: _Direct, args: StepArgs, scales) -> None:
        """:meth:`apply` for dense gradients whose components are held in C++: one
        ``DsgdMultiSgdAll`` call for every device, given the components' addresses."""
        calls = self._plan(tuple(id(le.entry) for le in split.les), (), [le.entry for le in split.les])
        (call,) = calls  # all dense: one call
        use_momentum = call.entries[0].momentum is not None
        use_ema = args.ema_momentum is not None
        call_scales = _scale_vector(scales, call.index, len(split), self._no_scales)
        after = [args.lr, call_scales, call.decay, self._hyper(args, True), call.sources]
        bools = {"use_momentum": use_momentum, "nesterov": bool(args.nesterov), "use_ema": use_ema,
                 "ema_overwrite": bool(args.ema_overwrite) and use_ema}
        dispatch.run_all(split.mod, split.comps, op="DsgdMultiSgdAll", device=self.devices[0],
                         before=[call.addresses], after=after, bools=bools,
                         types={"Tmomentum": self._tmomentum.as_datatype_enum})


class Counter:
    """Adds 1 to every local copy of a replicated int64 variable in one op (``DsgdIncrementAll``):
    the optimizer's iterations, once per step, instead of one ``AssignAddVariableOp`` per device."""

    def __init__(self, handles: Sequence[tf.Tensor]) -> None:
        ops = kernels.load()
        devices = [h.device for h in handles]
        with tf.init_scope():
            self._sets = []  # keeps the sets alive while their addresses are used
            for h in handles:
                with tf.device(h.device):
                    self._sets.append(ops.dsgd_pack_vars(vars=[h], accums=[], averages=[]))
            self._addresses = _set_addresses(ops, devices, self._sets)
        self._device = handles[0].device
        self._op = ops.dsgd_increment_all

    def __call__(self) -> None:
        with tf.device(self._device):
            self._op(varsets=self._addresses)


def pack_varsets(ops, devices: Sequence[str], les: Sequence[LocalEntry], momentum: bool,
                 average: bool) -> list[tf.Tensor]:
    """Per device: ``DsgdPackVars`` of the variables of ``les`` (and their momentum and EMA
    slots, if asked), eagerly; the kernels find them through these handles or their address."""
    pack = ops.dsgd_pack_vars
    varsets = []
    for k, dev in enumerate(devices):
        with tf.device(dev):
            varsets.append(pack(vars=[le.var[k] for le in les],
                                accums=[le.momentum[k] for le in les] if momentum else [],
                                averages=[le.average[k] for le in les] if average else []))
    return varsets


def _set_addresses(ops, devices: Sequence[str], varsets: Sequence[tf.Tensor]) -> tf.Tensor:
    """Host int64 [devices]: each device's variable set by address (``DsgdVarSetAddress``), on
    the first device, for the by-address ops; the caller keeps the sets' handles alive."""
    parts = []
    for dev, vs in zip(devices, varsets):
        with tf.device(dev):
            parts.append(ops.dsgd_var_set_address(vs))
    with tf.device(devices[0]):
        return tf.stack(parts)


def momentum_dtype(group: Group) -> tf.DType:
    """The dtype the group's momentum slots are kept in (the kernel's ``Tmomentum``)."""
    first = group.entries[0]
    return first.momentum.dtype if first.momentum is not None else group.dtype


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
