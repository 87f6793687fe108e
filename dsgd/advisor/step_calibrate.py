"""Microbenchmarks of the parts of a step on a mesh, for the step model (:mod:`dsgd.advisor.step_model`).

Run inside a measuring worker, on the mesh being measured (so all its devices take part, as in a step):

* ``call_ms`` -- a trivial DTensor ``tf.function`` on the mesh: the fixed cost of running a program;
* ``op_us`` -- each more op of one device's program (a chain of small adds, every device running it);
* ``flops_per_s`` -- the host's matmul rate with every device multiplying at once (a 256x512 by 512x512
  matmul per device);
* ``bytes_per_s`` -- the host's rate for elementwise ops (every device writing 4 MiB tensors);
* ``axes`` -- per mesh axis of size > 1, an all-reduce over that axis (every group at once, as DTensor
  reduces a gradient) of 64 KiB, 1 MiB and 8 MiB per device: ``alpha_us`` + ``beta_s_per_byte`` x bytes,
  fitted by least squares.

Each figure is the median of a few calls, synchronised (:func:`dsgd.harness.measure.sync`).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

COLLECTIVE_SIZES = (64 << 10, 1 << 20, 8 << 20)  # bytes per device


def _median_s(fn: Callable, reps: int, warmup: int = 2) -> float:
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


def calibrate(mesh, quick: bool = False) -> dict:
    """The figures above for ``mesh`` (a ``dtensor.Mesh``), as a JSON-able dict."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    reps = 3 if quick else 5
    names = list(mesh.dim_names)
    n_dev = int(np.prod([mesh.dim_size(a) for a in names]))
    U = dtensor.UNSHARDED

    def const(shape, layout_specs):
        layout = dtensor.Layout(layout_specs, mesh)
        return dtensor.call_with_layout(tf.ones, layout, shape)

    tiny = const([8], [U])
    call = tf.function(lambda x: x + 1.0)
    call_s = _median_s(lambda: call(tiny), reps)

    chain_n = 64

    @tf.function
    def chain(x):
        for _ in range(chain_n):
            x = x * 1.0001 + 1.0
        return x

    op_s = max(0.0, _median_s(lambda: chain(tiny), reps) - call_s) / (2 * chain_n)

    sizes = {a: mesh.dim_size(a) for a in names}
    xs = const([sizes[names[0]], sizes[names[-1]] if len(names) > 1 else 1, 256, 512],
               [names[0], names[-1] if len(names) > 1 else U, U, U])
    w = const([512, 512], [U, U])
    mm = tf.function(lambda x, w: tf.einsum("abmk,kn->abmn", x, w))
    mm_s = max(1e-9, _median_s(lambda: mm(xs, w), reps) - call_s)
    flops = 2.0 * 256 * 512 * 512 * n_dev / mm_s

    big = const([sizes[names[0]], sizes[names[-1]] if len(names) > 1 else 1, 1 << 20],
                [names[0], names[-1] if len(names) > 1 else U, U])
    ew = tf.function(lambda x: x * 1.5)
    ew_s = max(1e-9, _median_s(lambda: ew(big), reps) - call_s)
    bytes_per_s = 2.0 * (4 << 20) * n_dev / ew_s  # read + write

    axes = {}
    for a in names:
        if sizes[a] < 2:
            continue
        secs = []
        for nbytes in COLLECTIVE_SIZES:
            n = nbytes // 4
            x = const([sizes[a], n], [a, U])
            red = tf.function(lambda x: tf.reduce_sum(x, axis=0))
            secs.append(max(0.0, _median_s(lambda: red(x), reps) - call_s))
        alpha, beta = _fit_alpha_beta(COLLECTIVE_SIZES, secs)
        axes[a] = {"group": sizes[a], "alpha_us": alpha * 1e6, "beta_s_per_byte": beta,
                   "sizes": list(COLLECTIVE_SIZES), "ms": [s * 1e3 for s in secs]}
    return {"devices": n_dev, "call_ms": call_s * 1e3, "op_us": op_s * 1e6, "flops_per_s": flops,
            "bytes_per_s": bytes_per_s, "axes": axes}


__all__ = ["calibrate", "COLLECTIVE_SIZES"]
