"""The asv suite in benchmarks/: ``asv check`` passes, the grid is pruned as documented, and a
real parameter set runs through asv's runner into a results file that dsgd regress reads.

asv runs here against a copy of asv.conf.json whose results, html and env directories are
in tmp (and HOME too, for asv's machine file), so the developer's .asv/ is never touched.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("asv")

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "dsgd-test"
# One real, cheap parameter set: the reference on one device.
ONE_CASE = ("1", "replicated", "float32", "CPU", "off", "reference", "momentum")
PRUNED = ("1", "sharded", "float32", "CPU", "off", "reference", "momentum")


def _regex(cls_method: str, params) -> str:
    return re.escape(f"{cls_method}(" + ", ".join(repr(p) for p in params) + ")")


@pytest.fixture(scope="module")
def asv_env(tmp_path_factory):
    """A config copy pointing results/html/env into tmp, and an env with HOME in tmp."""
    tmp = tmp_path_factory.mktemp("asv_suite")
    from asv import util

    conf = util.load_json(str(ROOT / "asv.conf.json"), js_comments=True)
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"), results_dir=str(tmp / "results"),
                html_dir=str(tmp / "html"), env_dir=str(tmp / "env"))
    config = tmp / "asv.conf.json"
    config.write_text(json.dumps(conf, indent=1))
    (tmp / "home").mkdir()
    env = dict(os.environ, HOME=str(tmp / "home"), TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, "-m", "asv", "machine", "--yes", "--machine", MACHINE, "--config", str(config)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return config, env, tmp


def _asv(asv_env, *args, timeout=400):
    config, env, _ = asv_env
    return subprocess.run([sys.executable, "-m", "asv", *args, "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_asv_check_passes(asv_env):
    p = _asv(asv_env, "check", "--python=same")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "No problems found" in p.stdout + p.stderr


def test_one_parameter_set_runs_through_asv(asv_env):
    """asv's runner (forkserver, setup + timing loop) on one real set and one pruned set, saved
    with --set-commit-hash and read back by dsgd regress."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    name = "bench_step.TimeStepMeshLayout.time_step"
    p = _asv(asv_env, "run", "--python=same", "--quick", f"--set-commit-hash={head}", "--machine", MACHINE,
             "--show-stderr", "--bench", _regex(name, ONE_CASE), "--bench", _regex(name, PRUNED))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    files = list((asv_env[2] / "results" / MACHINE).glob(f"{head[:8]}-*.json"))
    assert len(files) == 1, files

    from dsgd.harness import asv_results

    df = asv_results.read_results_file(files[0])
    rows = df[df["benchmark"] == name].set_index("params")
    ran = rows.loc[asv_results.PARAM_SEP.join(ONE_CASE)]
    assert not ran["failed"] and 0 < ran["value"] < 10, ran  # seconds per step
    skipped = rows.loc[asv_results.PARAM_SEP.join(PRUNED)]
    assert not skipped["failed"] and math.isnan(skipped["value"])  # NotImplementedError: skipped, not failed


# ----------------------------------------------------------------------------- the grid, in process
@pytest.fixture(scope="module")
def suite():
    """The benchmark modules, imported as asv imports them (conftest already configured 8 CPUs)."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import bench_correctness, bench_memory, bench_metrics, bench_step, common
    finally:
        sys.path.remove(str(ROOT))
    return common, [bench_step, bench_memory, bench_metrics, bench_correctness]


def _classes(modules):
    for mod in modules:
        for name, cls in vars(mod).items():
            if isinstance(cls, type) and not name.startswith("_") and hasattr(cls, "params"):
                yield cls


def test_grid_is_pruned_as_documented(suite):
    common, modules = suite
    from dsgd.impl import REGISTRY

    assert common.IMPLEMENTATIONS[0] == "reference"
    assert set(REGISTRY) <= set(common.IMPLEMENTATIONS)  # every registered one, read at import
    total = kept = 0
    for cls in _classes(modules):
        moded = cls.param_names == common.PARAM_NAMES + ["mode"]  # TimeStepModes: a trailing mode
        assert moded or cls.param_names == common.PARAM_NAMES
        assert len(cls.params) == len(cls.param_names)
        combos = list(itertools.product(*cls.params))
        ok = [c for c in combos if not (common.mode_skip_reason if moded else common.skip_reason)(*c)]
        total += len(combos)
        kept += len(ok)
        for c in ok:  # the star: at most one of dtype/device/xla/options off the baseline
            p = dict(zip(cls.param_names, c))
            assert sum(p[a] != common.BASE[a] for a in ("dtype", "xla", "options")) <= 1, c
    assert 0 < kept < total / 2
    r = common.skip_reason
    assert "1-D mesh" in r("batch=8", "sharded", "float32", "CPU", "off", "reference", "momentum")
    assert "needs 16 devices" in r("batch=16", "replicated", "float32", "CPU", "off", "reference", "momentum")
    assert "not registered" in r("1", "replicated", "float32", "CPU", "off", "no-such-impl", "momentum")
    assert "baseline" in r("batch=2,model=4", "sharded", "float16", "CPU", "on", "reference", "momentum")
    assert r(*ONE_CASE) is None
    if not common.gpu_count():
        assert r("1", "replicated", "float32", "GPU", "off", "reference", "momentum") == "no GPU visible"
    with pytest.raises(NotImplementedError):
        common.check(*PRUNED)
    m = common.mode_skip_reason
    assert "not a floor" in m(*ONE_CASE[:5], "no-update", "momentum", "eager")
    assert m(*ONE_CASE[:5], "no-update", "momentum", "graph") is None  # since graph got its floor
    assert m(*ONE_CASE[:5], "no-update", "momentum", "fit") is None
    assert m(*ONE_CASE[:5], "auto", "momentum", "train_step") is None
    assert "not in this commit" in m(*ONE_CASE, "no-such-mode")


def test_modes_class_steps_in_graph(suite):
    """TimeStepModes as asv calls it: apply_gradients inside a tf.function runs the in-graph path."""
    common, (bench_step, *_) = suite
    params = ("batch=2,model=4", "sharded", "float32", "CPU", "off", "auto", "momentum", "graph")
    b = bench_step.TimeStepModes()
    b.setup(*params)
    assert b.built.case.mode == "graph" and b.built.first_step_s > 0
    b.time_step(*params)
    assert set(b.built.optimizer.implementations_used()) == {"grouped_graph"}


def test_step_and_state_bytes_in_process(suite):
    """One set's setup/time_step as asv calls them, and the tracked numbers of the same set."""
    common, (bench_step, _, bench_metrics, _) = suite
    params = ("batch=2,model=4", "sharded", "float32", "CPU", "off", "per_shard", "momentum")
    b = bench_step.TimeStepMeshLayout()
    b.setup(*params)
    assert b.built.first_step_s > 0
    b.setup(*params)  # asv re-runs setup before each sample: the built case is reused
    b.time_step(*params)
    row = common.metrics_case({"params": list(params), "steps": 3})
    assert row["status"] == "ok" and row["median_s"] > 0 and 0 < row["roofline_fraction"] < 2
    # momentum, float32, sharded on 'model' (4): a quarter of each sharded variable per device
    from dsgd.layoutmap import layout_entries
    from dsgd.workloads import get_workload

    specs = get_workload(common.WORKLOAD, "float32")
    dims = [("batch", 2), ("model", 4)]
    ideal = common.measure.count_bytes(specs, [layout_entries(s, dims, "sharded") for s in specs], dims,
                                       common.measure.OPTION_PRESETS["momentum"])
    assert row["state_bytes_per_device"] == ideal.momentum_per_device
    with pytest.raises(NotImplementedError):
        bench_metrics.StepMetrics().setup({}, *params)  # not in the cache: not measured


def test_a_users_model_and_layout_map_in_the_whole_step_modes():
    """``DSGD_ASV_MODEL=module:function DSGD_ASV_MODEL_LAYOUT=FILE``: the suite's whole-step modes time a
    user's model laid out by a layout-map file; the optimizer-step modes keep their workload and layout."""
    import subprocess
    import sys

    data = ROOT / "tests" / "data"
    env = dict(os.environ, DSGD_ASV_MODEL=f"{data}/tiny_user_model.py:build",
               DSGD_ASV_MODEL_LAYOUT=str(data / "tiny_user_layout.json"), PYTHONPATH=str(ROOT))
    code = ("from benchmarks import common\n"
            "fit = common.case('batch=2,model=4', 'sharded', 'float32', 'CPU', 'off', 'auto', 'momentum', 'fit')\n"
            "eager = common.case('batch=2,model=4', 'sharded', 'float32', 'CPU', 'off', 'auto', 'momentum')\n"
            "print(fit.workload, fit.layout, eager.workload, eager.layout)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    fit_w, fit_l, eager_w, eager_l = out.stdout.split()
    assert fit_w.endswith("tiny_user_model.py:build") and fit_l.endswith("tiny_user_layout.json")
    assert eager_w != fit_w and eager_l == "sharded"
