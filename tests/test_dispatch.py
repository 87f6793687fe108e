"""dsgd's C++ dispatch (dsgd/kernels/dispatch.cc): what it accepts, what it refuses, and
that it feeds each device exactly the component dtensor.unpack gives.

Numerics through it are in test_grouped (it is grouped's default feed); here the module's
own contract.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor
from tensorflow.python.eager import context

from _helpers import require_direct
from dsgd import eager_dtensor, kernels, meshspec
from dsgd.state import to_layout

U = meshspec.UNSHARDED
_REASON = kernels.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"grouped kernel unavailable: {_REASON}")


def _direct(mesh):
    return require_direct(mesh)


def _sums(mod, tensors, devices, select=None, slots=None, size=None):
    """DsgdMultiSumSqAt in one call over every device's selected components (device-major),
    each component's sum in its slot (default: k * len(tensors) + i, so [device, tensor])."""
    comps = mod.components(tensors, devices)
    n = len(tensors)
    if slots is None:
        slots, size = list(range(len(devices) * n)), len(devices) * n
    return mod.run_all(context.context()._handle, comps, select, "DsgdMultiSumSqAt", devices[0], [],
                       [tf.constant(slots, tf.int32)], {"size": size}, None, None, 1)


@pytest.mark.parametrize("mesh_spec", ["1", "batch=8", "batch=2,model=4"])
def test_each_device_gets_its_own_component(meshes, mesh_spec, rng):
    """The sums of squares of the components fed, per device, equal those of dtensor.unpack's
    components, for tensors sharded on different axes; `select` picks per device."""
    mesh = meshes(mesh_spec)
    mod = _direct(mesh)
    axes = mesh.dim_names
    specs = [[axes[0], U], [U, axes[-1]], [U, U]]
    tensors = [to_layout(rng.normal(size=(8, 16)).astype(np.float32), dtensor.Layout(s, mesh)) for s in specs]
    parts = [dtensor.unpack(t) for t in tensors]
    devices = [p.device for p in parts[0]]
    got = _sums(mod, tensors, devices).numpy().reshape(len(devices), len(tensors))
    for k in range(len(devices)):
        want = [float(np.sum(np.square(p[k].numpy().astype(np.float64)))) for p in parts]
        np.testing.assert_allclose(got[k], want, rtol=1e-6)
    # `select` picks per device: here tensors 2 and 0 on the first device only, into slots 2 and 0
    select = [[2, 0]] + [[] for _ in devices[1:]]
    got = _sums(mod, tensors, devices, select, slots=[2, 0], size=3).numpy()
    want0 = [float(np.sum(np.square(parts[i][0].numpy().astype(np.float64)))) if i in (2, 0) else 0.0
             for i in range(3)]
    np.testing.assert_allclose(got, want0, rtol=1e-6)
    assert _sums(mod, tensors, devices, [[] for _ in devices], slots=[], size=1) is None  # nothing selected


def test_refuses_what_it_cannot_read(meshes):
    """Plain tensors, another mesh's DTensors and a wrong device order raise NotDense (a
    ValueError), so the step takes the dtensor.unpack path instead."""
    mesh = meshes("batch=8")
    mod = _direct(mesh)
    x = dtensor.copy_to_mesh(tf.ones([8]), dtensor.Layout.replicated(mesh, 1))
    devices = [p.device for p in dtensor.unpack(x)]
    with pytest.raises(ValueError, match="not on the DTensor device|not an eager tensor"):
        mod.components([tf.ones([8])], devices)
    with pytest.raises(ValueError, match="expected device"):
        mod.components([x], devices[::-1])
    with pytest.raises(ValueError, match="number of components"):
        mod.components([x], devices[:4])
    small = meshes("1")
    y = dtensor.copy_to_mesh(tf.ones([8]), dtensor.Layout.replicated(small, 1))
    with pytest.raises(ValueError):
        mod.components([y], devices)
    with pytest.raises(TypeError):  # a non-tensor where the kernels' inputs go
        mod.run_all(context.context()._handle, mod.components([x], devices), None, "DsgdMultiSumSqAt", devices[0],
                    [], [1.0], {"size": 8}, None, None, 1)


def test_disabled_by_environment():
    """DSGD_DISABLE_DISPATCH=1: no dispatch, the reason says so, and grouped still runs (unpack feed)."""
    code = (
        "from dsgd.devices import configure_devices; configure_devices(8)\n"
        "import numpy as np, dsgd\n"
        "from dsgd import eager_dtensor, meshspec\n"
        "from dsgd.state import named_dvariable, to_layout, to_numpy\n"
        "from tensorflow.experimental import dtensor\n"
        "mesh = meshspec.make_mesh('batch=8')\n"
        "lay = dtensor.Layout.replicated(mesh, 1)\n"
        "v = named_dvariable(to_layout(np.ones(4, np.float32), lay), 'v')\n"
        "opt = dsgd.SGD(mesh=mesh, implementation='grouped', learning_rate=0.5)\n"
        "opt.apply_gradients([(to_layout(np.ones(4, np.float32), lay), v)])\n"
        "assert eager_dtensor.direct(mesh) is None\n"
        "print(eager_dtensor.direct_unavailable_reason()); print(to_numpy(v).tolist())\n"
    )
    env = dict(os.environ, DSGD_DISABLE_DISPATCH="1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert "DSGD_DISABLE_DISPATCH" in out[-2] and out[-1] == "[0.5, 0.5, 0.5, 0.5]"


def test_all_devices_call_checks_its_inputs(meshes):
    """DsgdMultiSgdAll refuses gradients that do not match its variable sets, before any write."""
    import dsgd

    mesh = meshes("batch=8")
    mod = _direct(mesh)
    lay = dtensor.Layout.replicated(mesh, 1)
    from dsgd.state import named_dvariable, to_numpy

    v = named_dvariable(to_layout(np.ones(4, np.float32), lay), "all_devices_v")
    opt = dsgd.SGD(mesh=mesh, implementation="grouped", learning_rate=0.5, momentum=0.9)
    g = to_layout(np.ones(4, np.float32), lay)
    opt.apply_gradients([(g, v)])  # builds the plan: one DsgdMultiSgdAll call for 8 devices
    (impl,) = opt.implementation_instances()
    (call,) = [c for plan in impl._plans.values() for c in plan]
    assert call.addresses is not None and call.addresses.shape == [8]
    devices = impl.devices
    two = mod.components([g, g], devices)  # 16 gradients for 8 sets of 1 variable
    after = [tf.constant(0.5), tf.zeros([0]), tf.zeros([0], tf.bool), tf.constant([0.9, 0, 0, 0], tf.float64),
             tf.zeros([0], tf.int32)]
    before = to_numpy(v).copy()
    with pytest.raises(RuntimeError, match="variable sets"):
        mod.run_all(context.context()._handle, two, None, "DsgdMultiSgdAll", devices[0], [call.addresses], after,
                    None, {"use_momentum": True}, {"Tmomentum": tf.float32.as_datatype_enum}, 0)
    np.testing.assert_array_equal(to_numpy(v), before)
