"""Microbenchmarks of the parts of a step on a mesh, for the step model (:mod:`dsgd.advisor.step_model`).

Run inside a measuring worker, on the mesh being measured (so all its devices take part, as in a step):

* ``call_ms`` -- a trivial DTensor ``tf.function`` on the mesh: the fixed cost of running a program;
* ``op_us`` -- each more op of one device's program (a chain of small adds, every device running it);
* ``flops_per_s`` -- the host's matmul rate with every device multiplying at once (a 256x512 by 512x512
  matmul per device);
* ``bytes_per_s`` -- the host's rate for elementwise ops (every device writing 4 MiB tensors);
* ``axes`` -- per mesh axis of size > 1, an all-reduce over that axis (every group at once) of 4 KiB,
  64 KiB, 1 MiB and 8 MiB per device: ``alpha_us`` + ``beta_s_per_byte`` x bytes, fitted to relative
  error (a step issues dozens of 2-20 KiB all-reduces next to a few large ones, so ``alpha`` must come
  from the small sizes, not from the large ones' noise); and the same for 1 and 8 MiB in 8 tensors
  (``merged_*``), which DTensor concatenates into one buffer before it reduces them, as it does a step's
  gradients: on 8 devices that cost 2-3x a single tensor's all-reduce (32 MiB over batch=8: 51 ms as one
  tensor, 134-158 ms as 8 or 32).

Every call is timed, synchronised (:func:`dsgd.harness.measure.sync`); :func:`combine` pools the calls of
every round.  The compute figures are the pooled medians, as the steps' are: a step's compute is one
block, which a slow spell of the machine hits whole.  The collectives' are trimmed means (:data:`TRIM` cut
from each tail): a step issues dozens of them, and the sum of many draws is their count times their mean,
not their median.  A small all-reduce's time on this shared VM is not one figure but two or three (0.6 or
1.3 ms for 64 KiB over 2x4's ``model``, round by round), and the median of a few rounds' medians landed on
one or the other: the transformer's predicted model-axis collectives moved from 40 to 63 ms between two
processes that measured its step at 143 and 144 ms.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

COLLECTIVE_SIZES = (4 << 10, 64 << 10, 1 << 20, 8 << 20)  # bytes per device
SMALL = 64 << 10  # sizes up to this, and the trivial call, are timed SMALL_REPS x as often (~1 ms a call)
SMALL_REPS = 3
MERGED_SIZES = (1 << 20, 8 << 20)  # bytes per device, in MERGED_PIECES tensors that DTensor merges into one
MERGED_PIECES = 8
TRIM = 0.1  # of the pooled calls, cut from each tail before the mean (a stall; a lucky call)


def _samples_s(fn: Callable, reps: int, warmup: int = 1) -> list:
    from dsgd.harness import measure

    for _ in range(warmup):
        fn()
    measure.sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        measure.sync()
        ts.append(time.perf_counter() - t0)
    return ts


def trimmed_mean(xs, trim: float = TRIM) -> float:
    """The mean of ``xs`` without the ``trim`` fraction of each tail (nan when empty)."""
    s = np.sort(np.asarray(xs, float))
    if not len(s):
        return float("nan")
    k = int(len(s) * trim)
    return float(s[k:len(s) - k].mean())


def fit_alpha_beta(sizes, secs) -> tuple[float, float]:
    """``secs ~ alpha + beta x sizes``, least squares on relative error (each size weighted by 1 / its
    time), both clipped at 0."""
    t = np.maximum(np.asarray(secs, float), 1e-9)
    A = np.stack([np.ones(len(t)), np.asarray(sizes, float)], 1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(A, np.ones(len(t)), rcond=None)
    return max(float(alpha), 0.0), max(float(beta), 0.0)


class Calibrator:
    """The microbenchmarks of one mesh, built once (functions traced, tensors made) and run as often as asked."""

    CHAIN = 64

    def __init__(self, mesh):
        import tensorflow as tf
        from tensorflow.experimental import dtensor

        self.mesh = mesh
        names = list(mesh.dim_names)
        self.sizes = {a: mesh.dim_size(a) for a in names}
        self.devices = int(np.prod(list(self.sizes.values())))
        U = dtensor.UNSHARDED
        first, last = names[0], (names[-1] if len(names) > 1 else None)

        def const(shape, specs):
            return dtensor.call_with_layout(tf.ones, dtensor.Layout(specs, mesh), shape)

        def split(*rest):  # one block per device: the first axis on dim 0, the last on dim 1
            return ([self.sizes[first], self.sizes[last] if last else 1, *rest], [first, last or U] + [U] * len(rest))

        self.tiny = const([8], [U])
        self.call = tf.function(lambda x: x + 1.0)

        @tf.function
        def chain(x):
            for _ in range(self.CHAIN):
                x = x * 1.0001 + 1.0
            return x

        self.chain = chain
        self.xs = const(*split(256, 512))
        self.w = const([512, 512], [U, U])
        self.mm = tf.function(lambda x, w: tf.einsum("abmk,kn->abmn", x, w))
        self.big = const(*split(1 << 20))
        self.ew = tf.function(lambda x: x * 1.5)
        self.reds = {}
        self.merged = {}
        for a in names:
            if self.sizes[a] < 2:
                continue
            self.reds[a] = [(nbytes, const([self.sizes[a], nbytes // 4], [a, U]),
                             tf.function(lambda x: tf.reduce_sum(x, axis=0))) for nbytes in COLLECTIVE_SIZES]
            # gradients: several independent all-reduces of one group, which DTensor concatenates into one
            # buffer first (a chain of TensorStridedSliceUpdate) and slices apart after
            self.merged[a] = [(nbytes, [const([self.sizes[a], nbytes // 4 // MERGED_PIECES], [a, U])
                                        for _ in range(MERGED_PIECES)],
                               tf.function(lambda *xs: [tf.reduce_sum(x, axis=0) for x in xs]))
                              for nbytes in MERGED_SIZES]

    def run(self, reps: int = 3) -> dict:
        """One round: every figure's calls (seconds), ``reps`` each (:data:`SMALL_REPS` x that for the small
        all-reduces), as ``{"devices", "samples": {...}}``; :func:`combine` turns rounds into figures."""
        smp: dict = {"call": _samples_s(lambda: self.call(self.tiny), reps * SMALL_REPS),
                     "chain": _samples_s(lambda: self.chain(self.tiny), reps * SMALL_REPS),
                     "mm": _samples_s(lambda: self.mm(self.xs, self.w), reps),
                     "ew": _samples_s(lambda: self.ew(self.big), reps), "axes": {}}
        for a, cases in self.reds.items():
            smp["axes"][a] = {
                "group": self.sizes[a],
                "single": [_samples_s(lambda f=f, x=x: f(x), reps * (SMALL_REPS if n <= SMALL else 1))
                           for n, x, f in cases],
                "merged": [_samples_s(lambda f=f, xs=xs: f(*xs), reps) for _, xs, f in self.merged[a]]}
        return {"devices": self.devices, "samples": smp}


def _collective_figures(good: list, axis: str, kind: str, sizes: int, call: float) -> tuple[list, list, list]:
    """Per size of one axis's ``kind`` (``single``, ``merged``) all-reduces, over the rounds' pooled calls:
    their trimmed mean less the trivial call's (seconds), how many calls, their IQR / median."""
    secs, n, spread = [], [], []
    for i in range(sizes):
        xs = [x for r in good if axis in r["samples"]["axes"] for x in r["samples"]["axes"][axis][kind][i]]
        secs.append(max(0.0, trimmed_mean(xs) - call))
        q1, q2, q3 = np.percentile(xs, (25, 50, 75))
        n.append(len(xs))
        spread.append(float((q3 - q1) / q2) if q2 > 0 else float("nan"))
    return secs, n, spread


def combine(runs: list) -> dict:
    """The figures of several rounds of :meth:`Calibrator.run` (failed rounds left out), every call of
    every round pooled: the compute figures their medians, each collective size's their trimmed mean less
    the trivial call's, alpha and beta fitted to those; ``runs`` counts the rounds, ``calls`` the calls per
    size, ``spread`` each size's interquartile range / median."""
    good = [r for r in runs if r and "error" not in r and "samples" in r]
    if not good:
        return runs[-1] if runs else {}

    def pool(get) -> list:
        return [x for r in good for x in get(r["samples"])]

    # compute: one block of a step, which a slow spell of the machine hits whole, as it does the step's
    # median: medians here too; collectives: many small draws a step, summed: means
    call_med = float(np.median(pool(lambda s: s["call"])))
    call = trimmed_mean(pool(lambda s: s["call"]))
    chain = float(np.median(pool(lambda s: s["chain"])))
    mm = max(1e-9, float(np.median(pool(lambda s: s["mm"]))) - call_med)
    ew = max(1e-9, float(np.median(pool(lambda s: s["ew"]))) - call_med)
    devices = good[0]["devices"]
    out = {"devices": devices, "runs": len(good), "call_ms": call_med * 1e3,
           "op_us": max(0.0, chain - call_med) / (2 * Calibrator.CHAIN) * 1e6,
           "flops_per_s": 2.0 * 256 * 512 * 512 * devices / mm,
           "bytes_per_s": 2.0 * (4 << 20) * devices / ew, "axes": {}}
    for a, v in good[0]["samples"]["axes"].items():
        secs, n, spread = _collective_figures(good, a, "single", len(COLLECTIVE_SIZES), call)
        msecs, mn, mspread = _collective_figures(good, a, "merged", len(MERGED_SIZES), call)
        alpha, beta = fit_alpha_beta(COLLECTIVE_SIZES, secs)
        malpha, mbeta = fit_alpha_beta(MERGED_SIZES, msecs)
        out["axes"][a] = {"group": v["group"], "alpha_us": alpha * 1e6, "beta_s_per_byte": beta,
                          "sizes": list(COLLECTIVE_SIZES), "ms": [x * 1e3 for x in secs], "calls": n,
                          "spread": spread, "merged_alpha_us": malpha * 1e6, "merged_beta_s_per_byte": mbeta,
                          "merged_sizes": list(MERGED_SIZES), "merged_ms": [x * 1e3 for x in msecs],
                          "merged_calls": mn, "merged_spread": mspread}
    return out


__all__ = ["combine", "fit_alpha_beta", "trimmed_mean", "Calibrator", "COLLECTIVE_SIZES",
           "MERGED_SIZES", "TRIM"]
