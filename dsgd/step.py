"""The step engine: how one optimizer step runs over the plan's groups.

:class:`StepEngine` is built once from the plan's entries (at :meth:`dsgd.SGD.build`) and
owns everything between the optimizer's argument handling and the implementations' ops:

* the per-entry lookups of the pair checks (:meth:`StepEngine.items`: the eager common case
  in one tight loop, any other pair through :func:`dsgd.pairs.check_pair`);
* which implementation runs each group (``auto``'s choice, the in-graph fallback to
  ``fused``), each instance created once per group and cached, and the groups whose
  instances can share a call combined per key (:meth:`StepEngine.resolve`);
* the clip reduction: one cross-device reduction of every group's sums of squares
  (:meth:`StepEngine.run`, :func:`reduce_partials`);
* in the local domain, the per-device handles of optimizer variables and the iteration
  counter (:meth:`StepEngine.increment`).

:class:`dsgd.SGD` keeps the Keras surface and holds one engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf
from tensorflow.python.framework.ops import EagerTensor

from dsgd import eager_dtensor, pairs, rules
from dsgd import impl as impl_registry
from dsgd.impl.base import Implementation
from dsgd.plan import Entry, Group, StepArgs, group_entries

log = logging.getLogger("dsgd")


class Resolved(NamedTuple):
    """One step's groups (combined where they share a call), their items and implementations."""

    order: list[Group]
    by_group: dict[int, list]  # id(group) -> its (entry, gradient) items
    impls: list[Implementation]
    domain: str  # every group's; one domain per step, so the norm reduction is done once


class StepEngine:
    """Runs steps for one optimizer's variables; built once from their entries.

    ``options`` is the optimizer: implementations read its hyperparameters, and its
    ``implementation`` is read at every step.  ``var_key`` maps a variable to its entry's key.
    """

    def __init__(self, entries: list[Entry], options, mesh, var_key: Callable[[Any], Any]) -> None:
        self.options = options
        self.mesh = mesh
        self.var_key = var_key
        self.groups: list[Group] = group_entries(entries)
        self.entries: dict[Any, Entry] = {e.key: e for e in entries}
        self._entry_by_id = {id(e.var): e for e in entries}
        self._group_of = {id(e): g for g in self.groups for e in g.entries}
        self._impls: dict[int, dict[str, Implementation]] = {id(g): {} for g in self.groups}  # by name
        self._combined: dict[tuple, tuple] = {}
        self._handles: dict[int, tuple] = {}
        self._counter: Optional[tuple] = None  # (iterations variable, its counter)
        self._warned_graph_fallback = False

    def entry(self, variable) -> Optional[Entry]:
        """The entry of ``variable``, or None when it is not one the engine was built with."""
        return self.entries.get(self.var_key(variable))

    # ------------------------------------------------------------------ pairs
    def items(self, kept: list, eager: bool) -> list[tuple[Entry, Any]]:
        """``(entry, gradient)`` for each ``(gradient, variable)`` pair, every pair checked."""
        items = self._fast_items(kept) if eager else None
        if items is None:
            items = [pairs.check_pair(g, v, self.entry(v), self.mesh, eager) for g, v in kept]
        return items

    def _fast_items(self, kept) -> Optional[list]:
        """The eager common case, checked in one tight loop (~1 µs a pair): every gradient an
        eager tensor with its variable's dtype, shape and layout.  None when any pair is not
        (a sparse gradient, a mismatch): :func:`dsgd.pairs.check_pair` then checks each and
        names the fault.
        """
        by_id = self._entry_by_id
        layouts = eager_dtensor.layout_strings([g for g, _ in kept])
        items = []
        for (g, v), lay in zip(kept, layouts):
            e = by_id.get(id(v))
            if (e is None or e.var is not v or type(g) is not EagerTensor or lay != e.layout_str
                    or g._datatype_enum() != e.dtype_enum or g._shape_tuple() != e.shape):
                return None
            items.append((e, g))
        return items

    # ------------------------------------------------------------------ implementations
    def resolve(self, items, eager: bool) -> Resolved:
        """Items by plan group, each group's implementation, and the step's one domain."""
        by_group: dict[int, list] = {}
        order: list[Group] = []
        group_of = self._group_of
        for e, g in items:
            grp = group_of[id(e)]
            lst = by_group.get(id(grp))
            if lst is None:
                lst = by_group[id(grp)] = []
                order.append(grp)
            lst.append((e, g))
        impls = [self._implementation_for(grp, eager) for grp in order]
        domains = {i.domain for i in impls}
        if len(domains) > 1:  # keep one domain per step so the norm reduction is done once
            impls = [self._cached_impl(grp, "fused") for grp in order]
        if len(impls) > 1:  # groups whose implementations can share a call run as one (per dtype)
            parts: dict = {}
            for grp, imp in zip(order, impls):
                key = imp.combine_key()
                parts.setdefault(("alone", id(grp)) if key is None else key, []).append((grp, imp))
            if len(parts) < len(order):
                order_c, by_group_c, impls_c = [], {}, []
                for members in parts.values():
                    grps, ims = [g for g, _ in members], [i for _, i in members]
                    combined = self._combined_impl(grps, ims) if len(members) > 1 else None
                    if combined is None:
                        order_c += grps
                        impls_c += ims
                        by_group_c.update((id(g), by_group[id(g)]) for g in grps)
                    else:
                        order_c.append(combined.group)
                        impls_c.append(combined)
                        by_group_c[id(combined.group)] = [it for g in grps for it in by_group[id(g)]]
                order, by_group, impls = order_c, by_group_c, impls_c
        return Resolved(order, by_group, impls, impls[0].domain)

    def _implementation_for(self, group: Group, eager: bool) -> Implementation:
        """The implementation instance that runs ``group`` now (created once, cached)."""
        options = self.options
        name = options.implementation
        if name == "auto":
            name = impl_registry.choose(group, options, eager)
        cls = impl_registry.for_mode(name, eager)
        if not eager and impl_registry.get(name).domain == "local" and not impl_registry.usable(cls, group, options):
            # an eager-only implementation, or its in-graph form cannot run this group here
            if not self._warned_graph_fallback:
                why = "it runs eagerly only" if cls is None else (cls.unavailable_reason() or cls.supports(group, options))
                log.warning("implementation %r inside tf.function: %s; using 'fused' there", name, why)
                self._warned_graph_fallback = True
            cls = impl_registry.get("fused")
        reason = cls.unavailable_reason() or cls.supports(group, options)
        if reason:
            raise ValueError(f"implementation {cls.name!r} cannot run variables {[e.var.name for e in group.entries][:3]}...: {reason}")
        return self._cached_impl(group, cls.name)

    def _cached_impl(self, group: Group, name: str) -> Implementation:
        """The plan group's instance of implementation ``name``, created once (it unpacks handles)."""
        cache = self._impls[id(group)]
        if name not in cache:
            with tf.init_scope():
                cache[name] = impl_registry.get(name)(group, self.options)
        return cache[name]

    def _combined_impl(self, order: list[Group], impls: list) -> Optional[Implementation]:
        """One instance of the groups' implementation for all of them, if it can combine
        them (``Implementation.combine``); cached per sequence of groups."""
        cache = self._combined
        key = tuple(id(g) for g in order) + tuple(id(i) for i in impls)
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 32:
                cache.clear()
            with tf.init_scope():
                # the value keeps the groups and instances alive, so no id in the key is reused
                hit = cache[key] = (tuple(order), tuple(impls), type(impls[0]).combine(impls, self.options))
        return hit[2]

    def implementations(self) -> list[Implementation]:
        """Every implementation instance a step has used, group by group in plan order."""
        return [imp for g in self.groups for imp in self._impls[id(g)].values()]

    # ------------------------------------------------------------------ the step
    def run(self, step: Resolved, args: StepArgs) -> bool:
        """Clip (one reduction of the sums of squares for every group), decay, update and EMA.

        With ``args.counter``, one implementation that counts steps (``counts_step``: the in-graph
        node) counts this one as part of its update; returns whether one did (else the caller counts).
        """
        order, by_group, impls, domain = step
        counting = None
        if args.counter is not None:
            counting = next((i for i in reversed(impls) if i.counts_step), None)
        scales_per_group: list = [None] * len(order)
        prepared = [imp.prepare(by_group[id(grp)]) for imp, grp in zip(impls, order)]
        if args.clipnorm or args.global_clipnorm:
            partials = [imp.partial_sumsq(p) for imp, p in zip(impls, prepared)]
            sizes = [len(p) for p in prepared]
            sumsq = reduce_partials(partials, domain)  # one reduction for every variable
            if args.clipnorm:
                coeff = rules.clip_norm_scale(sumsq, args.clipnorm)  # one per variable
                parts = tf.split(coeff, sizes) if len(sizes) > 1 else [coeff]
                scales_per_group = [p if getattr(imp, "vector_scales", False) else tf.unstack(p)
                                    for imp, p in zip(impls, parts)]
            else:
                scale = impls[0].global_clip_scale(sumsq, args.global_clipnorm)  # grouped: one op
                scales_per_group = [[scale] * n for n in sizes]
        plain = args if args.counter is None else dataclasses.replace(args, counter=None)
        for imp, p, sc in zip(impls, prepared, scales_per_group):
            imp.apply(p, args if imp is counting else plain, sc)
        return counting is not None

    # ------------------------------------------------------------------ local domain
    def local_handles(self, v) -> list:
        """Per-device resource handles of a replicated optimizer DVariable (cached)."""
        hs = self._handles.get(id(v))
        if hs is None or hs[0] is not v:
            with tf.init_scope():
                hs = self._handles[id(v)] = (v, list(eager_dtensor.components(v.handle)))
        return hs[1]

    def increment(self, iterations: tf.Variable) -> None:
        """Add 1 to each local copy of the iterations DVariable, in place
        (:func:`dsgd.impl.counter`: one op when the grouped kernels are loaded)."""
        hit = self._counter
        if hit is None or hit[0] is not iterations:
            hit = self._counter = (iterations, impl_registry.counter(self.local_handles(iterations), iterations.dtype))
        hit[1]()

    @property
    def counter(self) -> Optional[Callable[[], None]]:
        """The iteration counter made by the first local-domain step (None before one)."""
        return self._counter[1] if self._counter is not None else None


def reduce_partials(partials: list[list[tf.Tensor]], domain: str) -> tf.Tensor:
    """Per-variable sums of squares for all groups, with one cross-device reduction.

    ``partials[g]`` is group ``g``'s list of per-device vectors (local domain; the first
    ``len(partials[g])`` devices, zeros on the rest) or its one DTensor vector (dtensor
    domain).  Local: concatenate each device's vectors over the groups, then sum the
    devices' vectors once over every device of the run
    (:func:`dsgd.collectives.sum_over_devices`: ``add_n`` in one process, a DTensor
    all-reduce across clients in a multi-client run).
    """
    if domain == "dtensor":
        return tf.concat([p[0] for p in partials], 0) if len(partials) > 1 else partials[0][0]
    from dsgd.collectives import sum_over_devices

    # A group may give fewer vectors than there are devices (the grouped kernels' one call
    # sums every device's shards into device 0's): the others hold zeros for it.
    n_dev = max(len(p) for p in partials)
    per_device = []
    for k in range(n_dev):
        device = next(p[k].device for p in partials if len(p) > k)
        with tf.device(device):
            vecs = [p[k] if len(p) > k else tf.zeros_like(p[0]) for p in partials]
            per_device.append(tf.concat(vecs, 0) if len(vecs) > 1 else vecs[0])
    return sum_over_devices(per_device)


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for one eager step, then back as it was.

    An eager step on N gradients and D devices makes ~N*D short-lived tensor objects (the
    unpacked components), freed again by the end of the step; their allocation alone trips
    the collector, and a full collection over TensorFlow's ~0.5M live objects takes ~0.3 s
    (many-small on 8 devices: one per ~40 steps, mean step 24.8 -> 16.9 ms with it paused,
    measured).  Nothing the step makes is cyclic, so pausing defers no work.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
