"""The Python side of ``dispatch.cc``'s ``run_all``: one call with named parameters.

``_dsgd_dispatch.run_all`` takes its eleven arguments by position (a C extension's tuple
parse); every caller in dsgd goes through :func:`run_all` here, which names them.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import tensorflow as tf
from tensorflow.python.eager import context as _context


def run_all(mod, comps, *, op: str, device: str, select: Optional[Sequence[Sequence[int]]] = None,
            before: Sequence[tf.Tensor] = (), after: Sequence[tf.Tensor] = (),
            ints: Optional[Mapping[str, int]] = None, bools: Optional[Mapping[str, bool]] = None,
            types: Optional[Mapping[str, int]] = None, outputs: int = 0) -> Optional[tf.Tensor]:
    """Run one ``op`` (``DsgdMultiSgdAll``, ``DsgdMultiSumSqAt``) on ``device`` for the components
    ``comps`` (``mod.components(tensors, devices)``) on every local device, and wait for it.

    The op's inputs are ``before``, then one int64 tensor of the selected components' addresses
    and element counts (device-major; ``select[k]``: the tensors taken from device ``k``, all when
    None), then ``after``.  Its attribute ``T`` is the components' dtype; ``ints``, ``bools`` and
    ``types`` (``DataType`` enums) set the others by name.  Returns the op's first output, or None
    when ``outputs`` is 0 or nothing is selected.
    """
    return mod.run_all(_context.context()._handle, comps, select, op, device, before, after, ints, bools, types,
                       outputs)
