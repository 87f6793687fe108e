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
