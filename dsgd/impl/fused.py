"""``fused``: each variable's update as one fused TensorFlow training op, through DTensor.

``ResourceApplyKerasMomentum`` (or ``ResourceApplyGradientDescent``) per variable, plus one
``ResourceApplyGradientDescent`` for weight decay, so DTensor expands one or two ops per
variable instead of five or six.  These ops execute steps 2 and 3 of :mod:`dsgd.rules` (its
docstring lists them as checked equivalents); step 1 and the EMA are the rules' own.  Works
eagerly and inside ``tf.function`` (so under ``model.fit``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from dsgd.impl.base import Items
from dsgd.impl.gradients import update_gradient
from dsgd.impl.ops import OpsDTensor, ema_one
from dsgd.plan import StepArgs


class FusedDTensor(OpsDTensor):
    """One fused training op per variable (plus one for decay), dispatched through DTensor."""

    name = "fused"
    description = "one ResourceApplyKerasMomentum per variable through DTensor (graph-safe)"

    def apply(self, items: Items, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        if args.ema_momentum is not None and not tf.executing_eagerly():
            # The EMA must read each variable after its in-place update; inside tf.function
            # on a mesh DTensor dropped that ordering (4 layouts + clipnorm: the averages
            # used the weights from before the step; TF 2.21), so use the data-flow path.
            return OpsDTensor.apply(self, items, args, scales)
        for i, (e, g) in enumerate(items):
            dtype = e.var.dtype
            lr = tf.cast(args.lr, dtype)
            g = update_gradient(g, scales, i, args.clipvalue, dtype, e.var.shape, e.layout)
            if args.weight_decay and e.decay:
                tf.raw_ops.ResourceApplyGradientDescent(
                    var=e.var.handle, alpha=lr * tf.cast(args.weight_decay, dtype), delta=e.var.read_value())
            if e.momentum is not None:
                tf.raw_ops.ResourceApplyKerasMomentum(
                    var=e.var.handle, accum=e.momentum.handle, lr=lr, grad=g,
                    momentum=tf.cast(args.momentum, dtype), use_nesterov=args.nesterov)
            else:
                tf.raw_ops.ResourceApplyGradientDescent(var=e.var.handle, alpha=lr, delta=g)
        _ema_in_place(items, args)


def _ema_in_place(items: Items, args: StepArgs) -> None:
    """EMA after in-place updates (eagerly, where ops run in order): reads each variable after
    its update.  Inside ``tf.function`` ``fused`` uses the data-flow path."""
    if args.ema_momentum is None:
        return
    for e, _ in items:
        w = e.var.read_value()
        e.var.assign(ema_one(e, w, args))
