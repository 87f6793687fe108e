"""``per_shard``: fused training ops on each device's local shards, eagerly.

For every variable and every local device: one ``ResourceApplyKerasMomentum`` (or
``ResourceApplyGradientDescent``) on the unpacked handles, in place; these execute steps 2
and 3 of :mod:`dsgd.rules` (its docstring lists them as checked equivalents).  Weight decay
and EMA are one extra op each.  No DTensor expansion, no tracing: the first step costs what
every step costs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from dsgd import rules
from dsgd.impl.gradients import update_gradient
from dsgd.impl.local import LocalImplementation
from dsgd.plan import Group, StepArgs


class PerShard(LocalImplementation):
    name = "per_shard"
    description = "one fused training op per variable per device on the unpacked local shards (eager)"

    @classmethod
    def supports(cls, group: Group, options) -> Optional[str]:
        """The fused training ops keep momentum in the variables' dtype."""
        md = getattr(options, "momentum_dtype", None)
        if md is not None and md != group.dtype.name and getattr(options, "momentum", 0):
            return f"momentum_dtype={md} differs from the variables' dtype {group.dtype.name}"
        return None

    def apply(self, split, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        dtype = self.group.dtype
        for k, dev in enumerate(self.devices):
            with tf.device(dev):
                lr = tf.cast(args.lr, dtype)  # args.lr is a plain host scalar in the local domain
                mu = tf.constant(args.momentum, dtype)
                wd = tf.constant(args.weight_decay or 0.0, dtype) * lr
                for i, (le, parts) in enumerate(split):
                    g = update_gradient(parts[k], scales, i, args.clipvalue, dtype, le.local_shape)
                    h = le.var[k]
                    if args.weight_decay and le.entry.decay:
                        w = tf.raw_ops.ReadVariableOp(resource=h, dtype=dtype)
                        tf.raw_ops.ResourceApplyGradientDescent(var=h, alpha=wd, delta=w)
                    if le.momentum is not None:
                        tf.raw_ops.ResourceApplyKerasMomentum(
                            var=h, accum=le.momentum[k], lr=lr, grad=g, momentum=mu,
                            use_nesterov=args.nesterov)
                    else:
                        tf.raw_ops.ResourceApplyGradientDescent(var=h, alpha=lr, delta=g)
                if args.ema_momentum is not None:
                    self._ema(split, k, args, dtype)

    @staticmethod
    def _ema(split, k: int, args: StepArgs, dtype: tf.DType) -> None:
        overwrite = bool(args.ema_overwrite)
        for le, _ in split:
            a = le.average[k]
            w = tf.raw_ops.ReadVariableOp(resource=le.var[k], dtype=dtype)
            avg = tf.raw_ops.ReadVariableOp(resource=a, dtype=dtype)
            new = rules.ema(avg, w, tf.cast(args.ema_momentum, dtype))
            tf.raw_ops.AssignVariableOp(resource=a, value=new)
            if overwrite:
                tf.raw_ops.AssignVariableOp(resource=le.var[k], value=new)
