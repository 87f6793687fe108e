"""Per-tensor DTensor queries at C++ speed, for the eager hot path.

``dtensor.fetch_layout`` parses the layout string into a ``Layout`` object and
``dtensor.unpack`` also asks whether the tensor is sparse; each costs 10–40 µs in Python,
which for 400 gradients is most of a step.  The same pywrap calls without the wrapping
cost ~0.5 µs (layout string) and ~2.5–8 µs (components).  The public API stays the
fallback whenever the private entry points are missing (another TensorFlow version).
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
from tensorflow.experimental import dtensor

try:  # private, but stable across TF 2.1x; checked at import
    from tensorflow.dtensor.python import api as _api
    from tensorflow.python import _pywrap_dtensor_device as _pd
    from tensorflow.python.eager import context as _context

    _RAW = hasattr(_pd, "FetchLayout") and hasattr(_pd, "Unpack") and hasattr(_api, "_dtensor_device")
except ImportError:  # pragma: no cover - other TF versions
    _RAW = False


def _device_info():
    return _api._dtensor_device()._device_info


def _layout_string(t) -> Optional[str]:
    try:
        layout = dtensor.fetch_layout(t)
    except Exception:  # not a DTensor (or not a tensor)
        return None
    return layout.to_string() if layout is not None else None


def layout_strings(ts: Sequence) -> list[Optional[str]]:
    """The layout of each eager tensor of ``ts`` as DTensor's string (None: a plain tensor)."""
    if _RAW:
        h, info, fetch = _context.context()._handle, _device_info(), _pd.FetchLayout
        out = []
        for t in ts:
            try:
                out.append(fetch(h, t, info))
            except Exception:  # not a DTensor (or not a tensor)
                out.append(None)
        return out
    return [_layout_string(t) for t in ts]


def components(t) -> Sequence[tf.Tensor]:
    """The per-local-device components of dense eager DTensor ``t``."""
    if _RAW:
        return _pd.Unpack(_context.context()._handle, t, _device_info())
    return dtensor.unpack(t)


def components_many(ts: Sequence) -> list[Sequence[tf.Tensor]]:
    """:func:`components` of each tensor of ``ts`` (the lookups done once)."""
    if _RAW:
        h, info, unpack = _context.context()._handle, _device_info(), _pd.Unpack
        return [unpack(h, t, info) for t in ts]
    return [dtensor.unpack(t) for t in ts]


# -- components handed to ops from C++ (dsgd/kernels/dispatch.cc) ---------------------------
_direct_state: dict = {}


def direct(mesh) -> Optional[object]:
    """The ``_dsgd_dispatch`` extension, ready to read dense DTensors' components, or None.

    On first use it is built, told the dense DTensor class (from a tensor made here on
    ``mesh``) and checked against ``dtensor.unpack`` on a sharded tensor (same devices,
    same values); any failure makes it None for the rest of the process, with the reason
    in :func:`direct_unavailable_reason`.
    """
    if "mod" in _direct_state:
        return _direct_state["mod"]
    from dsgd import kernels

    mod = kernels.load_dispatch()
    reason = kernels.dispatch_unavailable_reason()
    if mod is not None:
        try:
            with tf.init_scope():
                _self_check(mod, mesh)
        except Exception as e:  # noqa: BLE001 - any disagreement disables the path
            mod, reason = None, f"self-check failed: {type(e).__name__}: {e}"
    _direct_state["mod"], _direct_state["reason"] = mod, reason
    return mod


def direct_unavailable_reason() -> Optional[str]:
    return _direct_state.get("reason")


def _self_check(mod, mesh) -> None:
    """The extension must feed each device exactly the component ``dtensor.unpack`` gives."""
    import numpy as np

    from dsgd import kernels
    from dsgd.kernels import dispatch

    kernels.load()  # registers DsgdMultiSumSqAt, the op the check runs
    mod.init(dtensor.copy_to_mesh(tf.zeros([1]), dtensor.Layout.replicated(mesh, 1)))
    dim = mesh.dim_names[0]
    rows = mesh.dim_size(dim) * 3
    x = dtensor.call_with_layout(
        tf.function(lambda: tf.reshape(tf.range(rows * 2, dtype=tf.float32), [rows, 2])),
        dtensor.Layout([dim, dtensor.UNSHARDED], mesh))
    want = dtensor.unpack(x)
    devices = [w.device for w in want]
    comps = mod.components([x], devices)
    # one call over every device's component, each summed into its own slot k
    slots = tf.constant(list(range(len(devices))), tf.int32)
    got = dispatch.run_all(mod, comps, op="DsgdMultiSumSqAt", device=devices[0], select=[[0]] * len(devices),
                           after=[slots], ints={"size": len(devices)}, outputs=1).numpy()
    for k, w in enumerate(want):
        expect = float(np.sum(np.square(w.numpy(), dtype=np.float64)))
        if abs(float(got[k]) - expect) > 1e-3 * max(expect, 1.0):
            raise RuntimeError(f"device {k}: the component fed differs from dtensor.unpack's")
    try:
        mod.components([tf.zeros([1])], devices[:1])
    except ValueError:
        pass
    else:
        raise RuntimeError("a plain tensor was accepted as a DTensor")
