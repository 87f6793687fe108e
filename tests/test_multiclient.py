"""The client side of multi-client runs (:mod:`dsgd.multiclient`, :mod:`dsgd.collectives`).

In-process tests (the pytest session's 8 devices, one client): environment parsing, the
DTensor reduction against ``add_n``.  The module is also the *program the clients run*
in :mod:`tests.test_launch`'s equality test::

    dsgd launch --clients 2 --devices-per-client 4 -- python tests/test_multiclient.py OUT.npz [--graph | --fsdp | --data]

:func:`train` runs the same few optimizer steps there (across two processes) and in the
pytest process (one process, same mesh), and the results are compared.
"""
from __future__ import annotations

import os
import sys

import numpy as np

MESH = "batch=2,model=4"
# (name, shape, layout): sharded over the model axis (within a client), over the batch axis
# (across clients), over both, and replicated (counted once per replica in the norm).
VARIABLES = [
    ("w_model", (16, 8), "model,unsharded"),
    ("w_batch", (8, 6), "batch,unsharded"),
    ("w_both", (8, 12), "batch,model"),
    ("w_cols", (5, 8), "unsharded,model"),
    ("bias", (7,), "replicated"),
]
# (label, dsgd.SGD keyword arguments, how to run): clipping small enough to be active; "sum"
# picks dsgd.collectives' cross-device sum for the norm; "graph" runs the step in tf.function.
CONFIGS = [
    ("momentum-auto", dict(learning_rate=0.05, momentum=0.9), {}),
    ("momentum-fused", dict(learning_rate=0.05, momentum=0.9, implementation="fused"), {}),
    ("clip-auto", dict(learning_rate=0.05, momentum=0.9, global_clipnorm=0.5), {}),
    ("clip-auto-dtensor-sum", dict(learning_rate=0.05, momentum=0.9, global_clipnorm=0.5), {"sum": "dtensor"}),
    ("clip-fused", dict(learning_rate=0.05, momentum=0.9, global_clipnorm=0.5, implementation="fused"), {}),
    ("clipnorm-auto", dict(learning_rate=0.05, momentum=0.9, clipnorm=0.3), {}),
    ("full-auto", dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, global_clipnorm=0.5,
                       use_ema=True, ema_overwrite_frequency=2), {}),
]
# Inside tf.function (as model.fit runs it): bit-equal too, but tracing costs ~15 s per
# process, so CI leaves it out; run by hand with `... test_multiclient.py OUT.npz --graph`.
GRAPH_CONFIGS = [
    ("clip-graph", dict(learning_rate=0.05, momentum=0.9, global_clipnorm=0.5), {"graph": True}),
]
STEPS = 3


def train(steps: int = STEPS, configs=CONFIGS) -> dict[str, np.ndarray]:
    """Run ``steps`` steps of dsgd.SGD per config on :data:`MESH`; the final weights and slots.

    Works the same in one process (8 devices) and as one client of a multi-client run.
    Initial values and gradients come from NumPy with fixed seeds, so every run sees the
    same numbers.
    """
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    import dsgd
    from dsgd import collectives, meshspec
    from dsgd.state import to_layout, to_numpy

    mesh = meshspec.make_mesh(MESH)
    rng = np.random.default_rng(7)
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s, _ in VARIABLES}
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s, _ in VARIABLES} for _ in range(steps)]
    layouts = {n: meshspec.parse_layout_spec(l, mesh, len(s), s) for n, s, l in VARIABLES}
    out: dict[str, np.ndarray] = {}
    default_sum = collectives.DEFAULT_METHOD
    for label, kwargs, how in configs:
        variables = {n: dtensor.DVariable(to_layout(init[n], layouts[n]), name=f"{label}_{n}") for n in init}
        opt = dsgd.SGD(mesh=mesh, **kwargs)
        apply = tf.function(opt.apply_gradients) if how.get("graph") else opt.apply_gradients
        collectives.DEFAULT_METHOD = how.get("sum", default_sum)
        try:
            for k in range(steps):
                apply([(to_layout(grads[k][n], layouts[n]), variables[n]) for n in variables])
        finally:
            collectives.DEFAULT_METHOD = default_sum
        for n, v in variables.items():
            out[f"{label}/{n}"] = to_numpy(v)
        for i, m in enumerate(opt.momentums):
            out[f"{label}/m{i}"] = to_numpy(m)
        for i, a in enumerate(opt._model_variables_moving_average):
            out[f"{label}/ema{i}"] = to_numpy(a)
        out[f"{label}/iterations"] = np.asarray(to_numpy(opt.iterations))
        out[f"{label}/impl"] = np.asarray(opt.implementations_used())
    return out


# ----------------------------------------------------------------------------- in-process tests


def test_config_from_env_reads_and_checks():
    from dsgd import multiclient as mc

    env = {mc.ENV_JOBS: "localhost:1000,localhost:1001", mc.ENV_CLIENT_ID: "1", mc.ENV_NUM_CLIENTS: "2",
           mc.ENV_LOCAL_DEVICES: "4"}
    cfg = mc.config_from_env(env)
    assert (cfg.client_id, cfg.num_clients, cfg.local_devices, cfg.global_devices) == (1, 2, 4, 8)
    assert cfg.job_name == "worker" and cfg.device_type == "CPU"
    assert mc.config_from_env(mc.client_env(cfg)) == cfg
    assert mc.is_client(env) and not mc.is_client({})


def test_config_from_env_errors_name_the_variable():
    import pytest

    from dsgd import multiclient as mc

    base = {mc.ENV_JOBS: "localhost:1000,localhost:1001", mc.ENV_CLIENT_ID: "0", mc.ENV_LOCAL_DEVICES: "4"}
    bad = [
        ({mc.ENV_CLIENT_ID: "2"}, mc.ENV_CLIENT_ID),
        ({mc.ENV_NUM_CLIENTS: "3"}, mc.ENV_NUM_CLIENTS),
        ({mc.ENV_LOCAL_DEVICES: "0"}, mc.ENV_LOCAL_DEVICES),
        ({mc.ENV_LOCAL_DEVICES: "x"}, mc.ENV_LOCAL_DEVICES),
        ({mc.ENV_JOBS: "localhost"}, mc.ENV_JOBS),
        ({mc.ENV_JOBS: "a:1,a:1"}, mc.ENV_JOBS),
        ({mc.ENV_DEVICE_TYPE: "TPU"}, mc.ENV_DEVICE_TYPE),
    ]
    for change, name in bad:
        with pytest.raises(mc.ClientConfigError, match=name):
            mc.config_from_env({**base, **change})
    with pytest.raises(mc.ClientConfigError, match=mc.ENV_JOBS):
        mc.config_from_env({})


def test_dtensor_sum_matches_add_n():
    import tensorflow as tf

    from dsgd import collectives

    rng = np.random.default_rng(3)
    values = [rng.standard_normal(9).astype(np.float32) for _ in range(8)]
    parts = []
    for k, v in enumerate(values):
        with tf.device(f"CPU:{k}"):
            parts.append(tf.constant(v))
    want = np.sum(np.asarray(values, np.float64), axis=0)
    by_dtensor = collectives.sum_over_devices(parts, "dtensor").numpy()
    by_add_n = collectives.sum_over_devices(parts).numpy()  # one process: add_n
    np.testing.assert_allclose(by_dtensor, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(by_add_n, want, rtol=1e-6, atol=1e-6)
    # a subset of the devices gets its own mesh; one device is returned as it is
    np.testing.assert_allclose(collectives.sum_over_devices(parts[:4], "dtensor").numpy(),
                               np.sum(np.asarray(values[:4], np.float64), axis=0), rtol=1e-6, atol=1e-6)
    assert collectives.sum_over_devices(parts[:1]) is parts[0]


def test_make_mesh_is_local_without_dtensor_jobs(monkeypatch):
    from dsgd import meshspec, multiclient

    monkeypatch.delenv(multiclient.ENV_JOBS, raising=False)
    mesh = meshspec.make_mesh(MESH)
    assert mesh.num_local_devices() == 8 and mesh.size == 8


FSDP_MESH = "batch=8"
FSDP_WIDTHS = (64, 256, 64, 256, 64)  # Dense kernels [in, out], each sharded over batch on its first dimension


def train_fsdp(steps: int = STEPS, implementations=("auto", "fused", "ops")) -> dict[str, np.ndarray]:
    """A custom ``tf.function`` train step of a Dense stack with fully sharded weights
    (``[batch, unsharded]``): DTensor makes the weight gradients ``[unsharded, batch]``, so they
    reach dsgd's update through all-to-alls.  Every client must issue those in the same order.
    The final weights and momentums per implementation, the same in one process and across clients."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    import dsgd
    from dsgd import meshspec
    from dsgd.state import to_layout, to_numpy

    mesh = meshspec.make_mesh(FSDP_MESH)
    shapes = list(zip(FSDP_WIDTHS[:-1], FSDP_WIDTHS[1:]))
    data = dtensor.Layout(["batch", dtensor.UNSHARDED], mesh)
    out: dict[str, np.ndarray] = {}
    for impl in implementations:
        rng = np.random.default_rng(11)
        ws = [dtensor.DVariable(to_layout((rng.standard_normal(sh) / np.sqrt(sh[0])).astype(np.float32),
                                          dtensor.Layout(["batch", dtensor.UNSHARDED], mesh)), name=f"fsdp_w{i}")
              for i, sh in enumerate(shapes)]
        xs = [to_layout(rng.standard_normal((16, FSDP_WIDTHS[0])).astype(np.float32), data) for _ in range(steps)]
        opt = dsgd.SGD(learning_rate=0.05, momentum=0.9, mesh=mesh, implementation=impl)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                h = x
                for w in ws:
                    h = tf.nn.relu(tf.matmul(h, w))
                loss = tf.reduce_mean(tf.square(h))
            opt.apply_gradients(zip(tape.gradient(loss, ws), ws))

        for x in xs:
            step(x)
        out.update({f"fsdp-{impl}/w{i}": to_numpy(w) for i, w in enumerate(ws)})
        out.update({f"fsdp-{impl}/m{i}": to_numpy(m) for i, m in enumerate(opt.momentums)})
    return out


DATA_MESHES = ("batch=8", "batch=2,model=4")


def global_batches(steps: int = 2) -> dict[str, np.ndarray]:
    """The global batches :func:`dsgd.harness.model_data.dtensor_dataset` makes (labels 0, 1, 2, ...; batch 16),
    gathered to every device: the same in one process and across clients."""
    from tensorflow.experimental import dtensor

    from dsgd import meshspec
    from dsgd.harness import model_data
    from dsgd.state import to_numpy

    out = {}
    for spec in DATA_MESHES:
        mesh = meshspec.make_mesh(spec)
        x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
        it = iter(model_data.dtensor_dataset(mesh, 16, examples=(x, np.arange(64, dtype=np.int32))))
        for k in range(steps):
            xb, yb = next(it)
            out[f"{spec}/y{k}"] = to_numpy(dtensor.relayout(yb, dtensor.Layout.replicated(mesh, 1)))
            out[f"{spec}/x{k}"] = to_numpy(dtensor.relayout(xb, dtensor.Layout.replicated(mesh, 2)))
    return out


def test_global_batches_are_consecutive_examples():
    got = global_batches()
    for spec in DATA_MESHES:
        assert list(got[f"{spec}/y0"]) == list(range(16)) and list(got[f"{spec}/y1"]) == list(range(16, 32))
        assert got[f"{spec}/x1"][0, 0] == 16 * 3


def test_train_runs_in_one_process():
    out = train(steps=1, configs=[c for c in CONFIGS if c[0] == "clip-auto"])
    assert out["clip-auto/iterations"] == 1
    assert all(np.isfinite(v).all() for k, v in out.items() if not k.endswith("impl"))


if __name__ == "__main__":  # as a client of `dsgd launch ... -- python tests/test_multiclient.py OUT.npz`
    from dsgd import multiclient

    if "--fsdp" in sys.argv[2:]:
        result = train_fsdp()
    elif "--data" in sys.argv[2:]:
        result = global_batches()
    else:
        result = train(configs=CONFIGS + (GRAPH_CONFIGS if "--graph" in sys.argv[2:] else []))
    if multiclient.config_from_env().client_id == 0:
        np.savez(sys.argv[1], **result)
        print(f"wrote {len(result)} arrays to {os.path.abspath(sys.argv[1])}")
