"""Microbenchmarks of the parts of a step on a mesh, for the step model (:mod:`dsgd.advisor.step_model`).

Run inside a measuring worker, on the mesh being measured (so all its devices take part, as in a step):

* ``call_ms`` -- a trivial DTensor ``tf.function`` on the mesh: the fixed cost of running a program;
* ``op_us`` -- each more op of one device's program (a chain of small adds, every device running it);
* ``flops_per_s`` -- the host's matmul rate with every device multiplying at once (a 256x512 by 512x512
  matmul per device);
* ``bytes_per_s`` -- the host's rate for elementwise ops (every device writing 4 MiB tensors);
* ``axes`` -- per mesh axis of size > 1, an all-reduce over that axis (every group at once) of 64 KiB,
  1 MiB and 8 MiB per device: ``alpha_us`` + ``beta_s_per_byte`` x bytes, fitted by least squares; and the
  same for 1 and 8 MiB in 8 tensors (``merged_*``), which DTensor concatenates into one buffer before it
  reduces them, as it does a step's gradients: on 8 devices that cost 2-3x a single tensor's all-reduce
  (32 MiB over batch=8: 51 ms as one tensor, 134-158 ms as 8 or 32).

Each figure is the median of a few calls, synchronised (:func:`dsgd.harness.measure.sync`).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

COLLECTIVE_SIZES = (64 << 10, 1 << 20, 8 << 20)  # bytes per device
MERGED_SIZES = (1 << 20, 8 << 20)  # bytes per device, in MERGED_PIECES tensors that DTensor merges into one
MERGED_PIECES = 8


def _median_s(fn: Callable, reps: int, warmup: int = 1) -> float:
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
    return float(np.median(ts))


def _fit_alpha_beta(sizes, secs) -> tuple[float, float]:
    A = np.stack([np.ones(len(sizes)), np.asarray(sizes, float)], 1)
    (alpha, beta), *_ = np.linalg.lstsq(A, np.asarray(secs, float), rcond=None)
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
        """One measurement of every figure (medians of ``reps`` calls each)."""
        call_s = _median_s(lambda: self.call(self.tiny), reps)
        op_s = max(0.0, _median_s(lambda: self.chain(self.tiny), reps) - call_s) / (2 * self.CHAIN)
        mm_s = max(1e-9, _median_s(lambda: self.mm(self.xs, self.w), reps) - call_s)
        ew_s = max(1e-9, _median_s(lambda: self.ew(self.big), reps) - call_s)
        axes = {}
        for a, cases in self.reds.items():
            secs = [max(0.0, _median_s(lambda f=f, x=x: f(x), reps) - call_s) for _, x, f in cases]
            alpha, beta = _fit_alpha_beta(COLLECTIVE_SIZES, secs)
            msecs = [max(0.0, _median_s(lambda f=f, xs=xs: f(*xs), reps) - call_s) for _, xs, f in self.merged[a]]
            malpha, mbeta = _fit_alpha_beta(MERGED_SIZES, msecs)
            axes[a] = {"group": self.sizes[a], "alpha_us": alpha * 1e6, "beta_s_per_byte": beta,
                       "sizes": list(COLLECTIVE_SIZES), "ms": [x * 1e3 for x in secs],
                       "merged_alpha_us": malpha * 1e6, "merged_beta_s_per_byte": mbeta,
                       "merged_sizes": list(MERGED_SIZES), "merged_ms": [x * 1e3 for x in msecs]}
        return {"devices": self.devices, "call_ms": call_s * 1e3, "op_us": op_s * 1e6,
                "flops_per_s": 2.0 * 256 * 512 * 512 * self.devices / mm_s,
                "bytes_per_s": 2.0 * (4 << 20) * self.devices / ew_s, "axes": axes}


def calibrate(mesh, quick: bool = False) -> dict:
    """The figures above for ``mesh`` (a ``dtensor.Mesh``), once, as a JSON-able dict."""
    return Calibrator(mesh).run(3 if quick else 5)


def combine(runs: list) -> dict:
    """The median of each figure over several runs of :func:`calibrate` (failed runs left out), the axes'
    alpha and beta refitted to the median times; ``runs`` counts them."""
    good = [r for r in runs if r and "error" not in r]
    if not good:
        return runs[-1] if runs else {}
    out = {k: float(np.median([r[k] for r in good])) for k in ("call_ms", "op_us", "flops_per_s", "bytes_per_s")}
    out["devices"] = good[0]["devices"]
    out["runs"] = len(good)
    axes = {}
    for a, v in good[0]["axes"].items():
        ms = [float(np.median([r["axes"][a]["ms"][i] for r in good if a in r["axes"]])) for i in range(len(v["ms"]))]
        alpha, beta = _fit_alpha_beta(v["sizes"], [m * 1e-3 for m in ms])
        axes[a] = dict(v, ms=ms, alpha_us=alpha * 1e6, beta_s_per_byte=beta)
        if "merged_ms" in v:
            mms = [float(np.median([r["axes"][a]["merged_ms"][i] for r in good if a in r["axes"]]))
                   for i in range(len(v["merged_ms"]))]
            malpha, mbeta = _fit_alpha_beta(v["merged_sizes"], [m * 1e-3 for m in mms])
            axes[a].update(merged_ms=mms, merged_alpha_us=malpha * 1e6, merged_beta_s_per_byte=mbeta)
    out["axes"] = axes
    return out


__all__ = ["calibrate", "combine", "COLLECTIVE_SIZES"]
