"""One layout-map rule (tf_keras' ``LayoutMap``: exact key, then the first ``re.match``) for every
reader: ``dsgd bench``, the asv suite, ``dsgd profile`` and a tf_keras model built under the map."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dsgd import layoutmap, meshspec
from dsgd.workloads import VarSpec, WorkloadError

U = "unsharded"
ROOT = Path(__file__).resolve().parents[1]
MESH = "batch=2,model=4"
# tf_keras' variable keys of the model below, with their shapes
VARIABLES = [("proj.kernel", (16, 32)), ("proj.bias", (32,)), ("out_proj.kernel", (32, 8)), ("out_proj.bias", (8,))]
# unanchored: re.search would also shard out_proj.kernel; tf_keras' re.match does not
UNANCHORED = {"proj.kernel": "unsharded,model"}
EXPECTED = {"proj.kernel": (U, "model"), "proj.bias": (U,), "out_proj.kernel": (U, U), "out_proj.bias": (U,)}


def test_lookup_is_tf_keras_layout_map_getitem(meshes):
    import tf_keras
    from tensorflow.experimental import dtensor

    mesh = meshes(MESH)
    m = {"a.*": "model,unsharded", "b": "unsharded,model", "ab": "batch,model", "x.b": "model,batch"}
    lm = tf_keras.dtensor.experimental.LayoutMap(mesh=mesh)
    for k, v in m.items():
        lm[k] = dtensor.Layout(v.split(","), mesh)
    for name in ("ab", "abc", "b1", "cb", "x.b", "xxb", "zzz"):
        want = lm[name]
        got = layoutmap.lookup(m, name)
        assert (got is None and want is None) or got == ",".join(want.sharding_specs), name
    assert layoutmap.lookup(m, "ab") == "batch,model"  # the exact key before the first regex ('a.*')
    assert layoutmap.lookup(m, "cb") is None  # re.search would find 'b'


def test_replicated_entry_shadows_later_keys_in_the_keras_map_too(meshes):
    mesh = meshes(MESH)
    m = {"d1": "replicated", "d.*kernel": "unsharded,model"}
    assert layoutmap.entries_for(m, VarSpec("d1.kernel", (4, 8))) == [U, U]
    lm = layoutmap.to_keras(m, mesh)
    assert lm["d1.kernel"] is None and lm["d2.kernel"].sharding_specs == [U, "model"]


def test_rank_mismatch_and_unknown_axis_are_named(tmp_path, meshes):
    with pytest.raises(WorkloadError, match="does not match rank 1"):
        layoutmap.entries_for({"w": "unsharded,model"}, VarSpec("w", (4,)))
    with pytest.raises(meshspec.SpecError, match="tensor"):
        layoutmap.to_keras({"w": "tensor"}, meshes(MESH))


@pytest.fixture
def files(tmp_path):
    lm = tmp_path / "unanchored.json"
    lm.write_text(json.dumps(UNANCHORED))
    wl = tmp_path / "vars.json"
    wl.write_text(json.dumps([{"name": n, "shape": list(s), "dtype": "float32"} for n, s in VARIABLES]))
    return str(wl), str(lm)


def _got(built) -> dict:
    return {s.name: tuple(lay.sharding_specs) for s, lay in zip(built.specs, built.layouts)}


def test_bench_asv_profile_and_tf_keras_give_the_same_layouts(files, meshes, monkeypatch):
    import tf_keras
    from tensorflow.experimental import dtensor

    from dsgd.harness import measure, profile
    from dsgd.harness.grid import make_cases

    workload, lmap_path = files
    mesh = meshes(MESH)
    # dsgd bench: its case grid, then the layouts measure builds the case with
    (bench_case,) = make_cases([workload], [MESH], [lmap_path], ["float32"], ["fused"], [False], ["momentum"])
    specs = [VarSpec(n, s) for n, s in VARIABLES]
    bench = {s.name: tuple(lay.sharding_specs) for s, lay in zip(specs, measure.case_layouts(specs, mesh, bench_case.layout))}
    assert bench == EXPECTED
    # asv: benchmarks/common.case with the map as a layout parameter
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import common
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setattr(common, "WORKLOAD", workload)
    monkeypatch.setitem(common.LAYOUTS, "unanchored", lmap_path)
    asv = _got(measure.build_case(common.case(MESH, "unanchored", "float32", "CPU", "off", "fused", "momentum")))
    assert asv == EXPECTED
    # dsgd profile: its precheck accepts the case, and its worker builds it with measure.build_case
    assert profile.precheck(bench_case, 8) is None
    prof = _got(measure.build_case(measure.Case(**bench_case.__dict__)))
    assert prof == EXPECTED
    # a tf_keras model built under the map
    with layoutmap.load_layout_map(lmap_path, mesh).scope():
        inputs = tf_keras.Input((16,), batch_size=8)
        x = tf_keras.layers.Dense(32, name="proj")(inputs)
        out = tf_keras.layers.Dense(8, name="out_proj")(x)
        model = tf_keras.Model(inputs, out)
    keras = {v.name.split(":")[0].replace("/", "."): tuple(dtensor.fetch_layout(v).sharding_specs)
             for v in model.trainable_variables}
    assert keras == EXPECTED


def test_force_items_parse_in_one_place():
    """``--force REGEX=LAYOUT``: split at the last ``=`` (a regex may hold one, a layout never does), the
    regex compiled; a bad item names itself -- the same parse for the checks and both advisors."""
    import re

    import pytest

    from dsgd.advisor import plans
    from dsgd.advisor.layouts_args import check_force
    from dsgd.argcheck import UsageError
    from dsgd.layoutmap import parse_force

    rx, lay = parse_force("a=b.*kernel= unsharded,model")
    assert rx.pattern == "a=b.*kernel" and lay == "unsharded,model"
    assert plans.parse_force(["embed=model"]) == [(re.compile("embed"), "model")]
    for bad, needle in (("no-equals", "expected REGEX=LAYOUT"), ("=model", "expected REGEX=LAYOUT"),
                        ("dense(=model", "bad regex")):
        with pytest.raises(ValueError, match=needle):
            parse_force(bad)
        with pytest.raises(UsageError, match=re.escape(repr(bad))):
            check_force(bad)
        with pytest.raises(plans.PlanError):
            plans.parse_force([bad])
