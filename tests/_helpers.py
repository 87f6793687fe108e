"""Shared helpers of the dsgd.SGD test suite (numerics, API, checkpoints, sparse, bad input).

* ``IMPLS`` / ``impl_params()``: every implementation in :data:`dsgd.impl.REGISTRY`, read at
  collection time, so a new implementation is covered by every parametrized test at once.
* ``require_impl`` / ``supported_subset``: skip cleanly where an implementation says it is
  unavailable (``unavailable_reason()``) or does not handle a group (``supports()``).
* ``dvar`` / ``dgrad`` / ``value``: put NumPy values on a mesh with a layout and read any
  variable or tensor back whole, whatever its layout.
* ``run_subprocess``: run a snippet in a fresh Python with 8 logical CPU devices — for cases
  where an eager DTensor error would poison the test process, or a fresh TensorFlow is needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Optional, Sequence

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import dsgd
from dsgd import impl as impl_registry
from dsgd import meshspec
from dsgd import reference64 as r64
from dsgd.plan import variable_layout
from dsgd.state import to_layout, to_numpy

U = meshspec.UNSHARDED
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- implementations ------------------------------------------------------------------------
IMPLS: list[str] = list(impl_registry.REGISTRY)
DTENSOR_IMPLS: list[str] = [n for n, c in impl_registry.REGISTRY.items() if c.domain == "dtensor"]


def impl_params(names: Optional[Sequence[str]] = None) -> list:
    """One pytest param per implementation, id'd by name."""
    return [pytest.param(n, id=n) for n in (IMPLS if names is None else names)]


def require_impl(name: str) -> type:
    """The implementation class, or skip the test when it is unavailable in this process."""
    cls = impl_registry.get(name)
    reason = cls.unavailable_reason()
    if reason:
        pytest.skip(f"implementation {name!r} unavailable: {reason}")
    return cls


def unsupported(name: str, opt) -> dict[tuple[str, str], str]:
    """``{(layout spec, dtype): reason}`` for the groups of ``opt``'s (built) plan that ``name`` cannot run."""
    cls = impl_registry.get(name)
    out = {}
    for g in opt.plan:
        why = cls.supports(g, opt)
        if why:
            out[(g.layout_spec, g.dtype.name)] = why
    return out


def allowed_slot_layouts(name: str, var) -> list:
    """The layouts a slot of ``var`` may have under implementation ``name`` ("auto": the variable's).

    Slots have exactly their variable's layout, unless the implementation declares its own
    ``slot_layout`` (``sharded_state``: ZeRO-1 shards the state further, by design).
    """
    lay = variable_layout(var)
    out = [lay]
    cls = impl_registry.REGISTRY.get(name)
    if cls is not None and hasattr(cls, "slot_layout"):
        out.append(cls.slot_layout(lay, list(var.shape)))
    return out


def runs_in_graph(name: str) -> bool:
    """Whether ``name`` runs inside tf.function itself (DTensor-domain ones, and local ones with an
    in-graph form such as ``grouped``); the others fall back to ``fused`` there."""
    return impl_registry.for_mode(name, eager=False) is not None


# -- values on meshes -----------------------------------------------------------------------
def layout(mesh, spec: Sequence[str] | str, rank: int):
    return meshspec.parse_layout_spec(spec, mesh, rank)


def dvar(value, mesh=None, spec=None, dtype=None, name=None, trainable=True) -> tf.Variable:
    """A DVariable (or, with ``mesh=None``, a plain tf.Variable) holding ``value`` (float32 by default)."""
    value = np.asarray(value)
    if dtype is None:
        dtype = tf.float32 if value.dtype.kind == "f" else value.dtype
    dtype = tf.as_dtype(dtype)
    if mesh is None:
        return tf.Variable(tf.cast(value, dtype), name=name, trainable=trainable)
    lay = layout(mesh, spec if spec is not None else [U] * value.ndim, value.ndim)
    return dtensor.DVariable(to_layout(tf.cast(value, dtype), lay), name=name, trainable=trainable)


def dgrad(value, like: tf.Variable) -> tf.Tensor:
    """``value`` as a tensor with ``like``'s dtype and (on a mesh) layout."""
    return to_layout(tf.cast(np.asarray(value), like.dtype), variable_layout(like))


def value(x) -> np.ndarray:
    """The full value of a variable or tensor (any layout) as float64 NumPy."""
    return np.asarray(to_numpy(x)).astype(np.float64)


def rounded(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float64 (what a variable of that dtype can hold)."""
    return tf.cast(tf.cast(np.asarray(x, np.float64), tf.as_dtype(dtype)), tf.float64).numpy()


def randn(rng: np.random.Generator, shape, dtype="float32", scale=1.0) -> np.ndarray:
    """Fresh random values, never zero, rounded to ``dtype`` (as float64)."""
    x = rng.standard_normal(shape) * scale
    x = np.where(np.abs(x) < 1e-3, 1e-3, x)
    return rounded(x, dtype)


def assert_close(actual, expected, dtype, what: str, factor: float = 1.0) -> None:
    err = r64.max_rel_error(np.asarray(actual, np.float64), np.asarray(expected, np.float64))
    tol = r64.TOLERANCE[tf.as_dtype(dtype).name] * factor
    assert err <= tol, f"{what}: max relative error {err:.3g} > tolerance {tol:.3g} ({tf.as_dtype(dtype).name})"


def layout_of(x):
    return variable_layout(x)


# -- subprocesses ---------------------------------------------------------------------------
PRELUDE = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from dsgd.devices import configure_devices
configure_devices({devices})
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor
import dsgd
from dsgd import meshspec
from dsgd.state import to_layout, to_numpy
"""


def run_subprocess(code: str, *, devices: int = 8, timeout: float = 300, env: Optional[dict] = None,
                   argv: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run ``code`` (after :data:`PRELUDE`) in a fresh interpreter with ``argv`` as its
    ``sys.argv[1:]``; returns the completed process."""
    src = PRELUDE.format(root=ROOT, tests=os.path.join(ROOT, "tests"), devices=devices) + textwrap.dedent(code)
    e = dict(os.environ)
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-c", src, *argv], capture_output=True, text=True, timeout=timeout, env=e)


def check_subprocess(proc: subprocess.CompletedProcess) -> str:
    """Assert a subprocess succeeded; return its stdout."""
    assert proc.returncode == 0, f"subprocess failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


__all__ = [
    "IMPLS", "DTENSOR_IMPLS", "impl_params", "allowed_slot_layouts", "require_impl", "unsupported", "runs_in_graph", "layout", "dvar",
    "dgrad", "value", "rounded", "randn", "assert_close", "layout_of", "run_subprocess", "check_subprocess",
    "U", "dsgd", "r64",
]


def require_direct(mesh):
    """dsgd's C++ dispatch extension; skips only where this machine cannot build a CPython
    extension (no Python.h), fails for any other reason it is unavailable."""
    from dsgd import eager_dtensor

    mod = eager_dtensor.direct(mesh)
    if mod is None:
        reason = eager_dtensor.direct_unavailable_reason() or ""
        if "Python.h" in reason:
            pytest.skip(f"no Python headers to build the dispatch extension: {reason[-200:]}")
        raise AssertionError(f"dispatch unavailable: {reason}")
    return mod
