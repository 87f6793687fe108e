"""``grouped`` inside ``tf.function``: the whole step as one kernel call per device, in the graph.

Eagerly, ``grouped`` feeds its kernel each device's shards from outside DTensor
(:mod:`dsgd.impl.grouped`).  Inside a ``tf.function`` (a custom train step,
``model.fit``) there is no outside: every op goes through DTensor's SPMD expansion, and a
custom op has no expander (DTensor refuses it, or all-gathers its resource inputs).  So the
step is an ``Assert`` node whose ``_kernel`` attribute is ``"dsgd_sgd"``:

* DTensor expands ``Assert`` with a no-op expander that keeps every input's layout, so each
  device's copy of the node gets that device's shards of the gradients and its own handles
  of the variables and slots;
* TensorFlow picks a node's kernel by its ``_kernel`` label, so that copy runs dsgd's
  ``GraphSgdOp`` (``dsgd/kernels/multi_momentum.cc``: the same update code as ``grouped``'s
  eager calls, in place, one pass over each variable's memory) instead of TensorFlow's Assert;
* ``Assert`` is stateful, so the function always runs it, and it takes a list of any types.

Two things make the node cheap where DTensor is not.  Its copies (one per local device, run
by DTensor as separate executions of one program that share the call's step id) gather into
one kernel call for all devices, as ``grouped``'s eager call does: eight small calls on two
cores lost ~40% of the memory bandwidth.  And the variables and their slots reach the kernel
packed (``DsgdPackVars``, once per device when the step is traced, held by this object) and
found by address: DTensor pays ~10 us per function input on every call, and the slots,
private to the optimizer, were a third of the inputs.  The variables' handles stay inputs, so
TensorFlow orders the node after the reads that made the gradients and before later reads; a
slot read *inside the same function* (not something Keras or dsgd do) is not ordered with it.

Nothing is silently dropped: without dsgd's kernel library loaded TensorFlow finds no
kernel for the label and fails, and TensorFlow's own Assert would fail on the false
condition.  XLA would compile ``Assert`` to nothing, so the node is marked
``_XlaCompile=False`` (auto-clustering leaves it out) and an XLA-compiled function
(``jit_compile=True``) never gets this implementation (``fused`` runs there).

Norm clipping's sums of squares go through DTensor ops (one reduction per gradient, as
``fused``); sparse gradients are densified with the variable's layout first, as ``fused``
does.  Momentum dtypes, decay masks, EMA and its overwrite are the kernel's, as eagerly.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.python.ops import control_flow_util

from dsgd import kernels
from dsgd.impl.base import Items
from dsgd.impl.gradients import densify, update_gradient
from dsgd.impl.grouped import Grouped, momentum_dtype, pack_varsets
from dsgd.impl.local import local_entry, replica_sources
from dsgd.impl.ops import OpsDTensor
from dsgd.kernels import abi
from dsgd.plan import Group, StepArgs

KERNEL_LABEL = "dsgd_sgd"  # GraphSgdOp's label in multi_momentum.cc
# each traced node's token: its copies on the local devices gather by it (with the call's step
# id, frame and iteration); two nodes never share one, even in separate function bodies
_TOKENS = itertools.count(1)


def in_xla_context() -> bool:
    """True while tracing a function that XLA compiles (``jit_compile=True`` or an XLA context)."""
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


class GroupedInGraph(OpsDTensor):
    """``grouped`` inside ``tf.function``: one labelled ``Assert`` per dtype runs the step in place."""

    name = "grouped_graph"
    domain = "dtensor"
    description = "one multi-tensor kernel call per device inside tf.function (an Assert node with dsgd's kernel label)"
    vector_scales = True
    counts_step = True  # the node increments the optimizer's iterations after the update (see multi_momentum.cc)

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        return kernels.unavailable_reason()

    @classmethod
    def supports(cls, group: Group, options) -> Optional[str]:
        reason = Grouped.supports(group, options)
        if reason is None and not tf.executing_eagerly() and in_xla_context():
            return "inside an XLA-compiled function (XLA compiles Assert to nothing)"
        return reason

    def combine_key(self) -> tuple:
        return (type(self), self.group.dtype, self._tmomentum, str(self.group.mesh))

    @classmethod
    def combine(cls, impls: Sequence["GroupedInGraph"], options) -> Optional["GroupedInGraph"]:
        """One node for several layout groups that share a dtype (the kernel ignores layouts)."""
        if len(impls) < 2 or any(type(i) is not cls for i in impls):
            return None
        first = impls[0]
        if any(i.group.dtype != first.group.dtype or i._tmomentum != first._tmomentum
               or i.group.mesh != first.group.mesh for i in impls):
            return None
        entries = [e for i in impls for e in i.group.entries]
        group = Group("+".join(i.group.layout_spec for i in impls), first.group.dtype, first.group.mesh, entries)
        return cls(group, options)

    def __init__(self, group: Group, options) -> None:
        super().__init__(group, options)
        self._ops = kernels.load()  # also registers the labelled kernel in this process
        self._tmomentum = momentum_dtype(group)
        # never evicted: a traced function keeps using its sets for as long as it lives
        self._packed: dict[tuple, tuple[tuple, list, list[int]]] = {}

    def _sets(self, entries, use_momentum: bool, use_ema: bool) -> tuple[list[int], list[int]]:
        """(device index, set address) for each local device: the variables and slots packed
        per device (``DsgdPackVars``, eagerly, once per set of variables), kept alive here; and the
        replica map over those devices (:func:`dsgd.impl.local.replica_sources`; empty: none)."""
        key = (tuple(id(e) for e in entries), use_momentum, use_ema)
        packed = self._packed.get(key)
        if packed is None:
            with tf.init_scope():
                les = [local_entry(e) for e in entries]
                devices = les[0].devices
                handles = pack_varsets(self._ops, devices, les, use_momentum, use_ema)
                pairs = []
                for dev, h in zip(devices, handles):
                    with tf.device(dev):
                        address = int(self._ops.dsgd_var_set_address(h).numpy())
                    pairs += [tf.DeviceSpec.from_string(dev).device_index, address]
                n = len(les)
                sources = replica_sources(les) or []
                replicas = [s // n for s in sources]  # item k * n + i -> the position of the computing device
            # the entries are kept too, so their ids (the key) are never reused for others
            packed = self._packed[key] = (tuple(entries), handles, pairs, replicas)
        return packed[2], packed[3]

    def apply(self, items: Items, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        if not items:
            return
        entries = [e for e, _ in items]
        n = len(items)
        use_momentum = entries[0].momentum is not None
        use_ema = args.ema_momentum is not None
        clipvalue = args.clipvalue
        if any(isinstance(g, tf.IndexedSlices) for _, g in items):
            # as fused: scale and clip the slices before duplicated rows are summed, so the
            # kernel's own scaling and clipping are off for this step
            grads = [update_gradient(g, scales, i, clipvalue, e.var.dtype, e.var.shape, e.layout)
                     for i, (e, g) in enumerate(items)]
            scales, clipvalue = None, None
        else:
            grads = [densify(g, e.var.shape, e.layout) for e, g in items]
        if scales is None:
            scale_t = tf.zeros([0], tf.float32)
        elif tf.is_tensor(scales):
            scale_t = tf.cast(scales, tf.float32)
        else:
            scale_t = tf.reshape(tf.cast(scales[0], tf.float32), [1])  # global_clipnorm: one for all
        mask = [e.decay for e in entries]
        decay = tf.zeros([0], tf.bool) if all(mask) else tf.constant(mask, tf.bool)
        hyper = tf.constant(abi.hyper(momentum=args.momentum or 0.0, weight_decay=args.weight_decay or 0.0,
                                      clipvalue=clipvalue or 0.0, ema_momentum=args.ema_momentum if use_ema else 0.0),
                            tf.float64)
        overwrite = args.ema_overwrite if tf.is_tensor(args.ema_overwrite) else tf.constant(bool(args.ema_overwrite))
        sets, replicas = self._sets(entries, use_momentum, use_ema)
        meta = tf.constant(abi.meta(n=n, use_momentum=use_momentum, nesterov=bool(args.nesterov), use_ema=use_ema,
                                    dtype=self.group.dtype.as_datatype_enum,
                                    momentum_dtype=self._tmomentum.as_datatype_enum, local_devices=len(sets) // 2,
                                    token=next(_TOKENS), counter=args.counter is not None), tf.int64)
        data = [meta, tf.cast(args.lr, tf.float32), scale_t, decay, hyper, tf.cast(overwrite, tf.bool), *grads]
        # the variables' handles order the node after the reads that made the gradients (and
        # before later reads); the kernel finds the variables and slots in the packed sets
        data += [e.var.handle for e in entries]
        if args.counter is not None:  # the kernel counts the step on every device, after the update
            data.append(args.counter.handle)
        data.append(tf.constant(sets, tf.int64))
        data.append(tf.constant(replicas, tf.int32))
        graph = tf.compat.v1.get_default_graph()
        no_xla = {"_XlaCompile": attr_value_pb2.AttrValue(b=False)}
        with graph._kernel_label_map({"Assert": KERNEL_LABEL}), graph._attr_scope(no_xla):
            # the condition is ignored by dsgd's kernel; TensorFlow's own Assert would fail on it
            tf.raw_ops.Assert(condition=tf.constant(False), data=data, summarize=0, name="dsgd_sgd_step")
