"""Mesh and layout specs (:mod:`dsgd.meshspec`, :mod:`dsgd.mesh`): parsing, round trips, and clear errors for specs
that are malformed or do not fit the devices or the tensor's shape."""
from __future__ import annotations

import pytest
from tensorflow.experimental import dtensor

from dsgd import mesh as mesh_mod, meshspec
from dsgd.meshspec import SpecError

U = meshspec.UNSHARDED


@pytest.mark.parametrize("spec, dims", [
    ("1", [("batch", 1)]),
    ("", [("batch", 1)]),
    ("batch=8", [("batch", 8)]),
    ("batch=2,model=4", [("batch", 2), ("model", 4)]),
    (" batch = 2 , model=4 ", [("batch", 2), ("model", 4)]),
    ("x=1,y_2=2,Z=4", [("x", 1), ("y_2", 2), ("Z", 4)]),
])
def test_parse_mesh_spec(spec, dims):
    assert meshspec.parse_mesh_spec(spec) == dims
    assert meshspec.mesh_size(dims) == __import__("math").prod(n for _, n in dims)
    if spec.strip() not in ("", "1"):
        assert meshspec.parse_mesh_spec(meshspec.format_mesh_spec(dims)) == dims


@pytest.mark.parametrize("spec, words", [
    ("batch", ["NAME=SIZE"]),
    ("batch=two", ["integer", "batch"]),
    ("batch=0", [">= 1"]),
    ("batch=-2", [">= 1"]),
    ("batch=2,batch=4", ["twice"]),
    ("2batch=2", ["NAME=SIZE"]),
    ("unsharded=2", ["reserved"]),
    ("batch=2,,model=4", ["NAME=SIZE"]),
])
def test_parse_mesh_spec_errors(spec, words):
    with pytest.raises(SpecError) as info:
        meshspec.parse_mesh_spec(spec)
    for w in words:
        assert w in str(info.value)
    assert spec.strip() in str(info.value) or repr(spec) in str(info.value)


def test_spec_error_is_value_error():
    assert issubclass(SpecError, ValueError)


def test_make_mesh(meshes):
    mesh = mesh_mod.make_mesh("batch=2,model=4")
    assert mesh.dim_names == ["batch", "model"] and mesh.dim_size("batch") == 2 and mesh.dim_size("model") == 4
    assert mesh.num_local_devices() == 8
    one = mesh_mod.make_mesh("1")  # fewer devices than configured is fine
    assert one.num_local_devices() == 1 and one.dim_names == ["batch"]
    assert mesh_mod.make_mesh([("a", 2), ("b", 2)]).num_local_devices() == 4
    with pytest.raises(SpecError, match="needs 16 CPU devices, but only 8 are configured"):
        mesh_mod.make_mesh("batch=4,model=4")
    with pytest.raises(SpecError, match="integer"):
        mesh_mod.make_mesh("batch=x")


@pytest.mark.parametrize("spec, rank, expected", [
    ("model,unsharded", 2, ["model", U]),
    ("unsharded,batch", 2, [U, "batch"]),
    ("batch,model", 2, ["batch", "model"]),
    ("replicated", 3, [U, U, U]),
    ("", 1, [U]),
    (["model", U], 2, ["model", U]),
    ("replicated", 0, []),
])
def test_parse_layout_spec(meshes, spec, rank, expected):
    mesh = meshes("batch=2,model=4")
    lay = mesh_mod.parse_layout_spec(spec, mesh, rank, shape=[8] * rank)
    assert isinstance(lay, dtensor.Layout) and list(lay.sharding_specs) == expected and lay.mesh == mesh
    again = mesh_mod.parse_layout_spec(meshspec.layout_to_spec(lay), mesh, rank)
    assert again == lay


@pytest.mark.parametrize("spec, rank, shape, words", [
    ("model", 2, None, ["1 entries", "rank 2"]),
    ("model,unsharded,unsharded", 2, None, ["3 entries", "rank 2"]),
    ("data,unsharded", 2, None, ["'data' is not an axis", "batch", "model"]),
    ("model,model", 2, None, ["'model' is used twice"]),
    ("model,unsharded", 2, [6, 8], ["dimension 0 of size 6", "does not divide", "'model' of size 4"]),
    ("unsharded,batch", 2, [8, 3], ["dimension 1 of size 3", "'batch' of size 2"]),
])
def test_parse_layout_spec_errors(meshes, spec, rank, shape, words):
    mesh = meshes("batch=2,model=4")
    with pytest.raises(SpecError) as info:
        mesh_mod.parse_layout_spec(spec, mesh, rank, shape=shape)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_layout_helpers(meshes):
    mesh = meshes("batch=2,model=4")
    cases = [([U, U], 8, [1, 1], [8, 12]), (["model", U], 2, [4, 1], [2, 12]), ([U, "batch"], 4, [1, 2], [8, 6]),
             (["batch", "model"], 1, [2, 4], [4, 3])]
    for specs, repl, per_dim, local in cases:
        lay = dtensor.Layout(specs, mesh)
        assert meshspec.replication_factor(lay) == repl
        assert meshspec.shards_per_dim(lay) == per_dim
        assert meshspec.local_shape(lay, [8, 12]) == local
    assert meshspec.layout_to_spec(dtensor.Layout([], mesh)) == "replicated"


def test_configure_devices_refuses_a_different_count_after_start():
    from dsgd.devices import configure_devices

    assert configure_devices(8, "CPU") == 8  # the same request again: a no-op
    with pytest.raises(RuntimeError, match="already started with 8 logical CPU devices; 4 were asked for"):
        configure_devices(4, "CPU")
    with pytest.raises(ValueError, match="num_devices must be >= 1"):
        configure_devices(0, "CPU")
    with pytest.raises(ValueError, match="device_type"):
        configure_devices(2, "TPU")


def test_mesh_spec_is_immutable_and_round_trips(meshes):
    import dataclasses

    spec = meshspec.MeshSpec.of("batch=2,model=4")
    assert list(spec) == [("batch", 2), ("model", 4)] and spec.size == 8 and spec.names == ("batch", "model")
    assert str(spec) == "batch=2,model=4" and meshspec.MeshSpec.of(str(spec)) == spec
    assert meshspec.MeshSpec.of(meshes("batch=2,model=4")) == spec == meshspec.MeshSpec.of(list(spec))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dims = ()
    assert meshspec.layout_str([U, U]) == "replicated"
    assert meshspec.layout_to_spec(dtensor.Layout([U, U], meshes("batch=8"))) == "unsharded,unsharded"  # a group key
    assert meshspec.parse_layout_str(meshspec.layout_str([U, "model"]), 2) == [U, "model"]
    assert meshspec.make_mesh is mesh_mod.make_mesh  # one function under both module names


def test_meshspec_imports_no_tensorflow_and_no_multiclient():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = ("import os, sys; before = dict(os.environ); import dsgd; assert dict(os.environ) == before; "
            "import dsgd.layoutmap, dsgd.advisor.plans; assert dict(os.environ) == before; "
            "assert 'tensorflow' not in sys.modules, 'layout maps and plans need no TensorFlow'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    code = ("import sys; import dsgd.meshspec; "
            "bad = [m for m in ('tensorflow', 'dsgd.multiclient', 'dsgd.mesh') if m in sys.modules]; "
            "assert not bad, bad; import dsgd.mesh")
    subprocess.run([sys.executable, "-c", code], check=True)
