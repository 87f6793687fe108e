"""The one small interface every implementation of the step shares.

An implementation runs :mod:`dsgd.rules` for one :class:`~dsgd.plan.Group` of variables.
It lives in one of two *domains*:

* ``"dtensor"`` — it dispatches DTensor ops on the global tensors (works eagerly and
  inside ``tf.function``, including ``model.fit``; DTensor inserts the collectives);
* ``"local"`` — it works on each device's local shards (``dtensor.unpack`` of the
  handles and gradients), outside DTensor's per-op overhead; eager only.

All groups of one step share a domain, so the global-norm reduction is done once.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import tensorflow as tf

from dsgd import rules
from dsgd.plan import Entry, Group, StepArgs

Items = Sequence[tuple[Entry, object]]  # (entry, gradient) pairs; gradient dense or IndexedSlices


class Implementation:
    name: ClassVar[str] = "base"
    domain: ClassVar[str] = "dtensor"
    description: ClassVar[str] = ""
    vector_scales: ClassVar[bool] = False  # apply() takes clipnorm's coefficients as one vector
    # apply() can count the step (``args.counter``) as part of the update, all or nothing: a step
    # that fails before it changes neither the variables nor the counter
    counts_step: ClassVar[bool] = False

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None when usable in this process, else why not (e.g. a kernel failed to build)."""
        return None

    @classmethod
    def supports(cls, group: Group, options) -> Optional[str]:
        """None when this implementation can run ``group`` with ``options``, else why not."""
        return None

    def __init__(self, group: Group, options) -> None:
        self.group = group
        self.options = options

    def combine_key(self) -> Optional[tuple]:
        """Instances with the same key (not None) can run their groups in one instance
        (:meth:`combine`); None (the default): this one runs alone."""
        return None

    @classmethod
    def combine(cls, impls: Sequence["Implementation"], options) -> Optional["Implementation"]:
        """One instance running all of ``impls``' groups together (their items concatenated in
        order), or None (the default): each group then runs on its own instance."""
        return None

    def prepare(self, items: Items):
        """The step's items in the form :meth:`partial_sumsq` and :meth:`apply` take.

        ``dtensor`` domain: the items themselves.  ``local`` domain: each gradient split into
        its per-device pieces, once per step.
        """
        return items

    # -- clipping support -------------------------------------------------------------
    def partial_sumsq(self, prepared) -> list[tf.Tensor]:
        """Sum of squares of each gradient of ``prepared`` (from :meth:`prepare`), counted once per element.

        ``dtensor`` domain: one replicated DTensor vector ``[len(items)]``.
        ``local`` domain: one vector per local device such that summing the vectors over
        every device of the mesh gives the true per-variable sums (``per_shard`` divides each
        device's sums by the replication factor; ``grouped`` sums on each shard's first
        replica only); a list shorter than the devices means zeros for the rest (``grouped``
        fed by address gives one vector, every device's sums, on the first device).
        """
        raise NotImplementedError

    def global_clip_scale(self, sumsq: tf.Tensor, clipnorm: float) -> tf.Tensor:
        """``global_clipnorm``'s one coefficient from the per-variable sums of squares (summed
        over the devices), by :func:`dsgd.rules.global_clip_scale`."""
        return rules.global_clip_scale(tf.reduce_sum(sumsq), clipnorm)

    # -- the step -----------------------------------------------------------------------
    def apply(self, prepared, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        """Clip (by ``scales``: one coefficient per item, or None; a vector of them when the class
        sets ``vector_scales``), decay, update, EMA, for the items of ``prepared`` (from :meth:`prepare`)."""
        raise NotImplementedError
