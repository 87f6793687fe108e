"""``xla``: one XLA program per device that runs the whole step for all its shards.

Why not ``tf.function(jit_compile=True)`` over DTensor ops?  Because on CPU that is not XLA:
DTensor's SPMD expansion replaces the function by per-device ``StatefulPartitionedCall``s
of ordinary TensorFlow kernels (``Mul``, ``AssignVariableOp``, ``CollectiveReduceV2``, …);
TensorFlow's ``mark_for_compilation_pass`` then reports "No compilable candidates", the
XLA service is never even initialised, ``XLA_FLAGS=--xla_dump_to`` writes nothing and
``experimental_get_compiler_ir`` refuses the DTensor inputs ("Invalid Tensor call on a
REMOTE handle").  (``use_xla_spmd`` is refused for CPU meshes.)

So this implementation works in the local domain (:mod:`dsgd.impl.local`): for every
local device it builds one plain ``tf.function(jit_compile=True)`` whose inputs are that
device's variable, momentum and average *resource handles* (``dtensor.unpack`` of the
DVariables' handles — the DVariables' own buffers, updated in place) and its local
gradients, and whose body is :mod:`dsgd.rules` for every variable of the group: clip
scale, ``clipvalue``, decay, momentum/Nesterov, EMA, and the EMA overwrite as a boolean
tensor input.  All variables of the group on that device are one executable, in place (the
handles' buffers are donated: no fresh allocation per step).  XLA:CPU makes two loop fusions
per variable with momentum (``m_new``, then ``w + m_new``: XLA's CPU pipeline has no
multi-output loop fusion), so a step moves 6 instead of the ideal 5 elements per parameter.

Handles are passed as *arguments* (not captured), so devices with the same shard shapes
share one traced function; XLA still compiles per device (its compilation cache is
per device), which :func:`capture_hlo` and ``XLA_FLAGS=--xla_dump_to`` show.

:func:`capture_hlo` writes each device program's HLO before and after XLA's optimisation
passes; it raises if a path that claims XLA yields no HLO.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import tensorflow as tf

from dsgd import rules
from dsgd.impl.gradients import update_gradient
from dsgd.impl.local import LocalEntry, LocalImplementation
from dsgd.plan import Group, StepArgs


class NoHLOError(RuntimeError):
    """A path that claims to be XLA produced no HLO module."""


def _program(n: int, *, decay_mask: tuple, has_momentum: bool, has_ema: bool, momentum: float,
             nesterov: bool, weight_decay: Optional[float], clipvalue: Optional[float],
             ema_momentum: Optional[float], var_dtype: tf.DType, slot_dtype: tf.DType,
             scaled: bool, name: str, clip_mask: Optional[tuple] = None):
    """The jit-compiled step of ``n`` variables on one device (handles and gradients as inputs).

    Hyperparameters that are Python constants are baked in (they key the program cache);
    the learning rate, the clip scales and the EMA overwrite flag are tensor inputs.
    ``clip_mask[i]`` False: gradient ``i`` arrives already scaled and clipped (a sparse one,
    clipped slice by slice before its duplicates were summed, as tf_keras does).
    """

    def step(var_h, mom_h, avg_h, grads, lr, scales, overwrite):
        for i in range(n):
            g = grads[i]
            if clip_mask is None or clip_mask[i]:
                g = rules.gradient(g, scales[i] if scaled else None, clipvalue, var_dtype)
            w = tf.raw_ops.ReadVariableOp(resource=var_h[i], dtype=var_dtype)
            # compute in the slot dtype (float32 momentum for bfloat16 weights), store in each own dtype
            cd = slot_dtype if has_momentum else var_dtype
            wc, gc = tf.cast(w, cd), tf.cast(g, cd)
            lr_c = tf.cast(lr, cd)
            if weight_decay and decay_mask[i]:
                wc = rules.weight_decay(wc, lr_c, tf.constant(weight_decay, cd))  # exact in float64
            if has_momentum:
                m = tf.raw_ops.ReadVariableOp(resource=mom_h[i], dtype=slot_dtype)
                wc, m_new = rules.momentum(wc, m, gc, lr_c, tf.constant(momentum, cd), nesterov)
                tf.raw_ops.AssignVariableOp(resource=mom_h[i], value=m_new)
            else:
                wc = rules.sgd(wc, gc, lr_c)
            w_new = tf.cast(wc, var_dtype)
            if has_ema:
                a = tf.raw_ops.ReadVariableOp(resource=avg_h[i], dtype=var_dtype)
                a_new = rules.ema(a, w_new, tf.constant(ema_momentum, var_dtype))
                tf.raw_ops.AssignVariableOp(resource=avg_h[i], value=a_new)
                w_new = tf.where(overwrite, a_new, w_new)
            tf.raw_ops.AssignVariableOp(resource=var_h[i], value=w_new)
        return tf.constant(0, tf.int32)  # a (tiny) output keeps the call a single XlaLaunch

    step.__name__ = name
    return tf.function(step, jit_compile=True, reduce_retracing=False, autograph=False)


def _sumsq_program(n: int, inv_rep: tuple, name: str):
    """Per-variable sums of squares of one device's gradients (divided by replication), one program."""

    def sumsq(grads):
        out = []
        for i in range(n):
            out.append(rules.sum_of_squares(grads[i]) * inv_rep[i])
        return tf.stack(out)

    sumsq.__name__ = name
    return tf.function(sumsq, jit_compile=True, autograph=False)


def _local_shape_sig(le: LocalEntry) -> tuple:
    return tuple(le.local_shape)


class XLA(LocalImplementation):
    """One jit-compiled program per device and variable group, over the local shards."""

    name = "xla"
    description = "one XLA program per device over all its local shards (handles in place; HLO capturable)"

    def __init__(self, group: Group, options) -> None:
        super().__init__(group, options)
        self._programs: dict[tuple, object] = {}
        self._sumsq_programs: dict[tuple, object] = {}
        # device index -> (program, input signature) of the last call, for capture_hlo: resource
        # handles as they are, other tensors as TensorSpecs (no gradient is kept alive)
        self.last_inputs: dict[int, tuple] = {}
        self.last_sumsq_inputs: dict[int, tuple] = {}
        self._concrete: dict = {}  # (program id, device index) -> concrete function
        self._signatures: dict = {}  # (program id, device index) -> input signature

    @classmethod
    def supports(cls, group: Group, options) -> Optional[str]:
        md = getattr(options, "momentum_dtype", None)
        if md is not None and getattr(options, "momentum", 0) and tf.as_dtype(md) != group.dtype:
            if not (tf.as_dtype(md).is_floating and group.dtype.is_floating):
                return f"momentum_dtype={md} with variables of dtype {group.dtype.name}"
        return None

    # -------------------------------------------------------------------- programs
    def _key(self, split, args: StepArgs, scaled: bool) -> tuple:
        return (
            tuple(_local_shape_sig(le) for le, _ in split),
            tuple(bool(args.weight_decay and le.entry.decay) for le, _ in split),
            split[0][0].momentum is not None, args.ema_momentum is not None,
            float(args.momentum), bool(args.nesterov), args.weight_decay or None,
            args.clipvalue or None, args.ema_momentum, scaled,
            tuple(not isinstance(parts[0], tf.IndexedSlices) for _, parts in split),
        )

    def _program_for(self, split, args: StepArgs, scaled: bool):
        key = self._key(split, args, scaled)
        prog = self._programs.get(key)
        if prog is None:
            e0 = split[0][0].entry
            slot_dtype = e0.momentum.dtype if e0.momentum is not None else self.group.dtype
            prog = _program(
                len(split), decay_mask=key[1], has_momentum=key[2], has_ema=key[3], momentum=key[4],
                nesterov=key[5], weight_decay=key[6], clipvalue=key[7], ema_momentum=key[8],
                var_dtype=self.group.dtype, slot_dtype=tf.as_dtype(slot_dtype), scaled=scaled, clip_mask=key[10],
                name=f"dsgd_xla_step_{_sanitize(self.group.layout_spec)}_{self.group.dtype.name}_{len(self._programs)}",
            )
            self._programs[key] = prog
        return prog

    # -------------------------------------------------------------------- clipping
    def partial_sumsq(self, split) -> list[tf.Tensor]:
        if any(isinstance(parts[0], tf.IndexedSlices) for _, parts in split):
            return super().partial_sumsq(split)
        key = (tuple(_local_shape_sig(le) for le, _ in split), tuple(le.inv_replication for le, _ in split))
        prog = self._sumsq_programs.get(key)
        if prog is None:
            prog = _sumsq_program(len(split), key[1], f"dsgd_xla_sumsq_{len(self._sumsq_programs)}")
            self._sumsq_programs[key] = prog
        out = []
        for k, dev in enumerate(self.devices):
            grads = [parts[k] for _, parts in split]
            with tf.device(dev):
                out.append(_call(prog, (grads,), self._concrete, (id(prog), k)))
            sig = self._signatures.get((id(prog), k))
            if sig is None:
                sig = self._signatures[(id(prog), k)] = _signature((grads,))
            self.last_sumsq_inputs[k] = (prog, sig)
        return out

    # -------------------------------------------------------------------- the step
    def apply(self, split, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        if not split:
            return
        scaled = scales is not None
        prog = self._program_for(split, args, scaled)
        if scaled:
            # one vector of coefficients (the global-norm case repeats the same scalar)
            same = all(s is scales[0] for s in scales)
            scale_vec = tf.fill([len(scales)], tf.cast(scales[0], tf.float32)) if same else \
                tf.cast(tf.stack(scales), tf.float32)
        else:
            scale_vec = tf.zeros([0], tf.float32)
        lr = tf.cast(args.lr, tf.float32)
        overwrite = tf.constant(bool(args.ema_overwrite)) if isinstance(args.ema_overwrite, bool) \
            else tf.cast(args.ema_overwrite, tf.bool)
        has_m = split[0][0].momentum is not None
        has_a = args.ema_momentum is not None
        per_device = []
        for k, dev in enumerate(self.devices):
            var_h = [le.var[k] for le, _ in split]
            mom_h = [le.momentum[k] for le, _ in split] if has_m else []
            avg_h = [le.average[k] for le, _ in split] if has_a else []
            grads = []
            for i, (le, parts) in enumerate(split):
                g = parts[k]
                if isinstance(g, tf.IndexedSlices):
                    with tf.device(dev):  # scaled and clipped per slice, then summed (clip_mask)
                        g = update_gradient(g, scales, i, args.clipvalue, self.group.dtype, le.local_shape)
                grads.append(g)
            per_device.append((var_h, mom_h, avg_h, grads))
        for k, dev in enumerate(self.devices):  # serially: threads and one graph over all devices were slower
            with tf.device(dev):
                _call(prog, (*per_device[k], lr, scale_vec, overwrite), self._concrete, (id(prog), k))
        for k in range(len(self.devices)):
            sig = self._signatures.get((id(prog), k))
            if sig is None:  # the same for every call of this program on this device
                sig = self._signatures[(id(prog), k)] = _signature((*per_device[k], lr, scale_vec, overwrite))
            self.last_inputs[k] = (prog, sig)

    # -------------------------------------------------------------------- HLO
    def programs(self, per_device: bool = False) -> list[tuple[str, object, tuple, list[int]]]:
        """The device programs of the last step: ``(label, program, (device index, input signature),
        device indices)``.

        Devices whose program and input signature are the same run the same HLO (XLA compiles it
        once per device); unless ``per_device``, they are listed once, with all their indices.
        """
        if not self.last_inputs:
            raise NoHLOError(f"xla implementation for group {self.group.key} has not run a step yet")
        out: list = []
        seen: dict = {}
        for kind, table in (("step", self.last_inputs), ("sumsq", self.last_sumsq_inputs)):
            for k, (prog, call_args) in sorted(table.items()):
                sig = (kind, id(prog), tuple((tuple(t.shape), t.dtype.name) for t in tf.nest.flatten(call_args)))
                call_args = (k, call_args)
                if not per_device and sig in seen:
                    seen[sig][3].append(k)
                    continue
                entry = (f"{kind}.dev{k}", prog, call_args, [k])
                seen[sig] = entry
                out.append(entry)
        return out

    def compiler_ir(self, stage: str = "hlo", per_device: bool = False) -> dict[str, tuple[str, list[int]]]:
        """``{program label: (HLO text, device indices)}`` of the last step's programs.

        ``stage``: ``"hlo"`` (before XLA's optimisation passes) or ``"optimized_hlo"``.
        """
        out = {}
        for label, prog, (k, sig), devs in self.programs(per_device):
            with tf.device(self.devices[k]):
                args = _materialize(sig)
                out[label] = (prog.experimental_get_compiler_ir(*args)(stage=stage), devs)
        return out


def _signature(call_args):
    """``call_args`` with every non-resource tensor replaced by its TensorSpec."""
    return tf.nest.map_structure(
        lambda t: t if t.dtype == tf.resource else tf.TensorSpec(t.shape, t.dtype), call_args)


def _materialize(sig):
    """Example inputs (zeros) for a signature from :func:`_signature`, on the current device."""
    return tf.nest.map_structure(
        lambda t: tf.zeros(t.shape, t.dtype) if isinstance(t, tf.TensorSpec) else t, sig)


def _call(prog, call_args: tuple, cache: dict, key):
    """Call ``prog`` on ``call_args`` through its concrete function's flat entry point.

    ``tf.function.__call__`` re-derives the trace type of every argument on each call, which
    costs ~30 µs per tensor (tens of ms for hundreds of variables); the concrete function is
    looked up once per program and device, then called with the flat list of tensors.
    """
    cf = cache.get(key)
    if cf is None:
        cf = prog.get_concrete_function(*call_args)
        cache[key] = cf
    flat = tf.nest.flatten(call_args)
    call_flat = getattr(cf, "_call_flat", None)
    if call_flat is None:  # pragma: no cover - a TensorFlow without the private entry point
        return prog(*call_args)
    return call_flat(flat, cf.captured_inputs)


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_") or "x"


def xla_impls(obj) -> list[XLA]:
    """The :class:`XLA` instances behind an optimizer (its plan's groups), or ``[obj]`` for one."""
    if isinstance(obj, XLA):
        return [obj]
    instances = getattr(obj, "implementation_instances", None)
    if instances is None:
        raise TypeError(f"expected a dsgd.SGD or an XLA implementation, got {type(obj).__name__}")
    return [imp for imp in instances() if isinstance(imp, XLA)]


FUSION_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[^=]*?\bfusion\(", re.M)


def count_fusions(hlo_text: str) -> int:
    """Number of ``fusion`` instructions in an HLO module's text."""
    return len(FUSION_RE.findall(hlo_text))


def capture_hlo(obj, out_dir: str, per_device: bool = False) -> list[str]:
    """Write the HLO of every device program of ``obj`` (a ``dsgd.SGD`` or an ``XLA``) to ``out_dir``.

    For each program two files, ``<group>.<program>.dev<K>.before_optimizations.hlo.txt`` and
    ``... .after_optimizations.hlo.txt``, and ``hlo_programs.json`` mapping each file to its group,
    stage and the devices that run it (devices with the same program and shapes share one file
    unless ``per_device``).  Returns the HLO paths.  Raises :class:`NoHLOError` if ``obj``
    claims XLA but no HLO module is found (no step ran through XLA, or XLA returned no module).
    """
    impls = xla_impls(obj)
    if not impls:
        raise NoHLOError(
            "no group of this optimizer ran through the xla implementation (did a step run? "
            f"implementation={getattr(obj, 'implementation', '?')!r}, jit_compile={getattr(obj, 'jit_compile', '?')})")
    os.makedirs(out_dir, exist_ok=True)
    paths, manifest = [], {}
    for gi, imp in enumerate(impls):
        label = f"group{gi}_{_sanitize(imp.group.layout_spec)}_{imp.group.dtype.name}"
        for stage, suffix in (("hlo", "before_optimizations"), ("optimized_hlo", "after_optimizations")):
            for prog_label, (text, devs) in imp.compiler_ir(stage, per_device).items():
                if not text or "HloModule" not in text:
                    raise NoHLOError(f"{label}.{prog_label}: XLA returned no HLO module for stage {stage!r}")
                name = f"{label}.{prog_label}.{suffix}.hlo.txt"
                with open(os.path.join(out_dir, name), "w") as f:
                    f.write(text)
                paths.append(os.path.join(out_dir, name))
                mesh = imp.group.mesh
                manifest[name] = {"mesh": ",".join(f"{n}={mesh.dim_size(n)}" for n in mesh.dim_names) if mesh else None,
                                  "layout": imp.group.layout_spec, "dtype": imp.group.dtype.name, "stage": suffix,
                                  "program": prog_label.split(".")[0],
                                  "devices": [imp.devices[k] for k in devs], "variables": len(imp.group.entries),
                                  "fusions": count_fusions(text) if stage == "optimized_hlo" else None}
    if not paths:
        raise NoHLOError("the xla implementation ran no device program")
    with open(os.path.join(out_dir, "hlo_programs.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return paths
