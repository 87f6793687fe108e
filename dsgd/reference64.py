"""A float64 NumPy model of one SGD step: the yardstick every implementation is tested against.

It follows :mod:`dsgd.rules` line by line, with NumPy and float64, on whole (unsharded)
arrays.  ``sparse`` gradients are given as ``(values, indices)`` pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np


@dataclass
class Options64:
    learning_rate: float | Callable[[int], float] = 0.01  # a callable gets the iteration
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: Optional[float] = None
    decay_mask: Optional[Sequence[bool]] = None  # True: decayed (None: all)
    clipnorm: Optional[float] = None
    clipvalue: Optional[float] = None
    global_clipnorm: Optional[float] = None
    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: Optional[int] = None


@dataclass
class State64:
    weights: list[np.ndarray]
    momenta: list[np.ndarray] = field(default_factory=list)
    averages: list[np.ndarray] = field(default_factory=list)
    iterations: int = 0


def init_state(weights: Sequence[np.ndarray], opts: Options64) -> State64:
    ws = [np.array(w, dtype=np.float64) for w in weights]
    return State64(
        weights=ws,
        momenta=[np.zeros_like(w) for w in ws],
        averages=[w.copy() for w in ws] if opts.use_ema else [],
    )


def _densify(g, shape):
    if isinstance(g, tuple):
        values, indices = g
        dense = np.zeros(shape, np.float64)
        np.add.at(dense, np.asarray(indices), np.asarray(values, np.float64))
        return dense
    return np.asarray(g, np.float64)


def step(state: State64, grads: Sequence, opts: Options64) -> State64:
    """One optimizer step in float64, in place; returns ``state``."""
    lr = opts.learning_rate(state.iterations) if callable(opts.learning_rate) else opts.learning_rate
    lr = float(lr)
    gs = []
    for g in grads:
        if isinstance(g, tuple):  # clipping sees the (possibly duplicated) slice values
            gs.append((np.asarray(g[0], np.float64), np.asarray(g[1])))
        else:
            gs.append(np.asarray(g, np.float64))
    vals = lambda g: g[0] if isinstance(g, tuple) else g  # noqa: E731
    rebuild = lambda g, v: (v, g[1]) if isinstance(g, tuple) else v  # noqa: E731
    if opts.clipnorm:
        out = []
        for g in gs:
            n = np.sqrt(np.sum(vals(g) ** 2))
            out.append(rebuild(g, vals(g) * opts.clipnorm / max(n, opts.clipnorm)))
        gs = out
    elif opts.global_clipnorm:
        n = np.sqrt(sum(np.sum(vals(g) ** 2) for g in gs))
        s = opts.global_clipnorm * min(1.0 / n, 1.0 / opts.global_clipnorm)
        gs = [rebuild(g, vals(g) * s) for g in gs]
    elif opts.clipvalue:
        gs = [rebuild(g, np.clip(vals(g), -opts.clipvalue, opts.clipvalue)) for g in gs]
    for i, w in enumerate(state.weights):
        g = _densify(gs[i], w.shape)
        if opts.weight_decay and (opts.decay_mask is None or opts.decay_mask[i]):
            w -= w * opts.weight_decay * lr
        if opts.momentum:
            m = state.momenta[i]
            m *= opts.momentum
            m -= lr * g
            if opts.nesterov:
                w += opts.momentum * m - lr * g
            else:
                w += m
        else:
            w -= lr * g
    if opts.use_ema:
        for a, w in zip(state.averages, state.weights):
            a *= opts.ema_momentum
            a += (1.0 - opts.ema_momentum) * w
        f = opts.ema_overwrite_frequency
        if f and (state.iterations + 1) % f == 0:
            for a, w in zip(state.averages, state.weights):
                w[...] = a
    state.iterations += 1
    return state


def finalize(state: State64, opts: Options64) -> list[np.ndarray]:
    """What ``finalize_variable_values`` leaves in the variables."""
    return [a.copy() for a in state.averages] if opts.use_ema else [w.copy() for w in state.weights]


def max_rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |a - e| / max(|e|_inf, tiny); NaN or Inf in ``actual`` gives +inf (never passes)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-30)
    return float(np.max(np.abs(actual - expected))) / scale if actual.size else 0.0


# Tolerances on max_rel_error after a few steps, per dtype of the variables.
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}
