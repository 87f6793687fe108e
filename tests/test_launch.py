"""``dsgd launch``: DTensor multi-client runs on localhost (2 clients x 4 logical CPU devices).

* the optimizer across two clients equals the same mesh in one process;
* a benchmark table produced through the launcher;
* faults: a client that dies, or never joins, stops the run in bounded time with an error
  naming it; ports in use are refused before anything starts;
* the launcher's pieces (command parsing, host/port plans, the watchdog) without TensorFlow.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsgd.harness import launch, launch_placement
from dsgd import multiclient as mc

ROOT = Path(__file__).resolve().parents[1]
CLIENT_PROGRAM = ROOT / "tests" / "test_multiclient.py"
FAULT_BOUND_S = 120  # a failed run must end within this (start-up of the clients included)


def _cli_env(**extra) -> dict:
    from dsgd.harness.isolate import child_env

    return child_env({"TF_CPP_MIN_LOG_LEVEL": "3", **extra})


# ----------------------------------------------------------------------------- end to end (slow)


def _two_clients(tmp_path, *flags: str) -> tuple[dict, object]:
    """``tests/test_multiclient.py`` run as 2 clients x 4 devices with ``flags``: client 0's arrays, and the
    program's module (to run the same in this process)."""
    sys.path.insert(0, str(CLIENT_PROGRAM.parent))
    import test_multiclient as prog

    out = tmp_path / "clients.npz"
    plan = launch_placement.build_plan(2, 4, ports=launch_placement.pick_ports(2))
    res = launch.run_clients(plan, launch.client_command(["python", str(CLIENT_PROGRAM), str(out), *flags]),
                             start_timeout=240, timeout=400)
    assert res.ok, res.error
    assert res.exit_code == 0 and "wrote" in res.report
    return dict(np.load(out)), prog


@pytest.mark.slow
def test_two_clients_match_one_process(tmp_path):
    """2 clients x 4 devices vs one process with 8 devices, same mesh (batch=2,model=4), 3 steps."""
    got, prog = _two_clients(tmp_path)
    want = prog.train()
    assert sorted(got) == sorted(want)
    # Bit for bit wherever the reduction order is the same in both runs.  The local-domain
    # norm across clients ("clients" sum: add_n per client, then DTensor across clients)
    # adds in another order than add_n over 8 devices: last-bit differences allowed there.
    reordered = {"clip-auto", "clipnorm-auto", "full-auto"}
    for key in sorted(want):
        label = key.split("/")[0]
        if key.endswith("/impl"):
            assert list(got[key]) == list(want[key]), key
        elif label in reordered:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-6, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # the default runs in the local domain (per-device shards: per_shard, or grouped with its kernel)
    assert set(want["momentum-auto/impl"]) <= {"per_shard", "grouped"} and list(want["clip-fused/impl"]) == ["fused"]
    assert int(got["clip-auto/iterations"]) == prog.STEPS


@pytest.mark.slow
def test_fully_sharded_weights_train_the_same_across_clients(tmp_path):
    """A custom train step whose weight gradients reach their fully sharded variables through
    all-to-alls (tests/test_multiclient.py's ``train_fsdp``): 2 clients x 4 devices equal one
    process.  With one guard op for all gradients, DTensor ordered those all-to-alls differently
    in each client: where the paired tensors' shapes differed the step failed ("Shape mismatch in the
    collective instance"), where they agreed the clients silently exchanged the wrong gradients (this
    test's weights: 96% of the elements wrong after 3 steps)."""
    got, prog = _two_clients(tmp_path, "--fsdp")
    want = prog.train_fsdp()
    assert sorted(got) == sorted(want) and len(want) == 24  # 4 weights, 4 momentums, 3 implementations
    for key in sorted(want):
        assert np.isfinite(want[key]).all() and np.abs(want[key]).sum() > 0, key
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    for impl in ("fused", "ops"):  # every implementation takes the same step
        for i in range(4):
            np.testing.assert_allclose(want[f"fsdp-{impl}/w{i}"], want[f"fsdp-auto/w{i}"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_each_client_reads_its_own_part_of_the_global_batch(tmp_path):
    """``model_data.dtensor_dataset`` across 2 clients x 4 devices gives the global batches one process gets
    (examples 0-15, then 16-31), on batch=8 and on batch=2,model=4.  Before, every client read the same
    first examples: the global batch was examples 0-7 twice."""
    got, prog = _two_clients(tmp_path, "--data")
    want = prog.global_batches()
    assert sorted(got) == sorted(want) and len(want) == 8
    for key in sorted(want):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_bench_table_through_the_launcher(tmp_path):
    """A bench table from 2 clients, where client 1 is slow (it waits DELAY ms before each step
    ends): the step time reported is the whole mesh's -- at least DELAY -- not client 0's own."""
    delay_ms = 150
    workload = tmp_path / "small.json"
    workload.write_text(json.dumps([{"name": "a/kernel", "shape": [64, 32]}, {"name": "a/bias", "shape": [32]},
                                    {"name": "b/kernel", "shape": [32, 16]}]))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dsgd", "launch", "--clients", "2", "--devices-per-client", "4", "--timeout", "400",
         "--log-dir", str(tmp_path / "logs"),
         "--", "dsgd", "bench", "--workload", str(workload), "--mesh", "batch=2,model=4",
         "--implementation", "auto", "--implementation", "reference", "--options", "full", "--steps", "2",
         "--mode", "eager", "--format", "csv", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=500,
        env=_cli_env(**{mc.ENV_FAULT_CLIENT: "1", mc.ENV_FAULT_STEP_DELAY_MS: str(delay_ms)}))
    # the launcher shows the failing client's stderr; client 0's too, for a failure in the exit handshake
    client0 = (tmp_path / "logs" / "client0.err")
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n--- client 0:\n" + (
        client0.read_text()[-2000:] if client0.exists() else "(no log)")
    import pandas as pd

    df = pd.read_csv(io.StringIO(proc.stdout))
    assert len(df) == 2 and (df["status"] == "ok").all(), proc.stdout
    assert set(df["implementation"]) == {"auto", "reference"}
    assert (df["mesh"] == "batch=2,model=4").all()
    # client 0's own step takes ~1-3 ms; the mesh's step waits for client 1.  Client 0 starts its
    # clock when it leaves the previous step's barrier, which under load can be a few tens of ms
    # after client 1 left it (and started sleeping): hence the margin.
    times = df[["implementation", "min_ms", "median_ms"]]
    assert (df["median_ms"] >= 0.8 * delay_ms).all() and (df["min_ms"] >= 0.5 * delay_ms).all(), times
    assert (df["clients"] == 2).all() and (df["barrier_ms"] < delay_ms).all()
    print(f"bench through the launcher: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_client_dying_mid_run_stops_all_in_bounded_time(monkeypatch, capsys):
    """Client 1 exits (code 17) after joining the cluster; client 0 is left in it and must be stopped."""
    from dsgd.cli import main as cli_main

    monkeypatch.setenv(mc.ENV_FAULT_CLIENT, "1")
    monkeypatch.setenv(mc.ENV_FAULT_AT, "ready")
    t0 = time.monotonic()
    rc = cli_main(["launch", "--clients", "2", "--devices-per-client", "4",
                   "--", "bench", "--workload", "one-big", "--mesh", "batch=2,model=4", "--steps", "2", "--quiet"])
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert rc == launch.EXIT_FAILED, err[-2000:]
    assert "client 1 exited with code 17 before finishing" in err
    assert "injected fault" in err  # the client's own last stderr lines are shown
    assert "no result" in err and out.strip() == ""  # nothing reported as a result
    assert took < FAULT_BOUND_S


@pytest.mark.slow
def test_client_that_never_joins_stops_the_others():
    plan = launch_placement.build_plan(2, 4, ports=launch_placement.pick_ports(2))
    t0 = time.monotonic()
    res = launch.run_clients(plan, launch.client_command(["bench", "--workload", "one-big"]),
                             env={mc.ENV_FAULT_CLIENT: "1", mc.ENV_FAULT_AT: "start"}, start_timeout=240)
    assert not res.ok and res.exit_code == launch.EXIT_FAILED and res.report == ""
    assert "client 1 exited with code 17 before joining the cluster" in res.error
    assert all(c.proc.returncode is not None for c in res.clients)  # nobody left running
    assert time.monotonic() - t0 < FAULT_BOUND_S


# ----------------------------------------------------------------------------- ports


def test_port_in_use_is_refused_before_start(capsys):
    from dsgd.cli import main as cli_main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert not launch_placement.port_free(busy)
        plan = launch_placement.build_plan(2, 4, port_base=busy)
        with pytest.raises(launch.LaunchError, match=rf"{busy} \(client 0\)"):
            launch.run_clients(plan, ["bench"])
        rc = cli_main(["launch", "--clients", "2", "--port-base", str(busy), "--", "bench"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "already in use" in err and str(busy) in err


def test_pick_ports_gives_distinct_free_ports_below_the_ephemeral_range():
    ports = launch_placement.pick_ports(4)
    assert len(set(ports)) == 4
    assert all(launch_placement.port_free(p) and 15000 <= p < max(launch_placement._ephemeral_low(), 20004) for p in ports)


# ----------------------------------------------------------------------------- command and plan


@pytest.mark.parametrize("given, want", [
    (["--", "dsgd", "bench", "--mesh", "batch=2,model=4"], ["bench", "--mesh", "batch=2,model=4"]),
    (["bench", "--steps", "2"], ["bench", "--steps", "2"]),
    (["dsgd", "layouts", "x"], ["layouts", "x"]),
    (["python", "train.py", "--lr", "1"], ["--script", "train.py", "--lr", "1"]),
    (["python3", "-m", "pkg.train", "-v"], ["--module", "pkg.train", "-v"]),
    (["train.py"], ["--script", "train.py"]),
])
def test_client_command_accepts_dsgd_commands_and_scripts(given, want):
    assert launch.client_command(given) == want


@pytest.mark.parametrize("given, match", [
    ([], "no command"), (["--"], "no command"), (["dsgd"], "subcommand"), (["launch"], "itself"),
    (["nonsense"], "unknown command"), (["python"], "SCRIPT"),
])
def test_client_command_errors(given, match):
    with pytest.raises(launch.LaunchError, match=match):
        launch.client_command(given)


def test_plan_on_localhost():
    plan = launch_placement.build_plan(2, 4, ports=[23001, 23007])
    assert plan.jobs == ("localhost:23001", "localhost:23007") and plan.local == [0, 1]
    env = mc.client_env(plan.configs[1])
    assert env[mc.ENV_CLIENT_ID] == "1" and env[mc.ENV_NUM_CLIENTS] == "2" and env[mc.ENV_LOCAL_DEVICES] == "4"
    assert env[mc.ENV_JOBS] == "localhost:23001,localhost:23007" and env[mc.ENV_JOB_NAME] == "worker"
    assert mc.config_from_env(env).global_devices == 8


def test_plan_across_hosts():
    plan = launch_placement.build_plan(4, 8, hosts=["h1", "h2"], port_base=9000, host_index=1)
    assert plan.jobs == ("h1:9000", "h1:9001", "h2:9000", "h2:9001")
    assert plan.local == [2, 3]  # host h2 starts clients 2 and 3
    for kwargs, match in [
        (dict(clients=3, hosts=["h1", "h2"], port_base=9000, host_index=0), "divide"),
        (dict(clients=2, hosts=["h1", "h2"], host_index=0), "--port-base"),
        (dict(clients=2, hosts=["h1", "h1"], port_base=9000), "twice"),
        (dict(clients=2, hosts=["h1", "h2"], port_base=9000, host_index=5), "--host-index"),
        (dict(clients=2, hosts=["nohost-a", "nohost-b"], port_base=9000), "--host-index"),
        (dict(clients=0), "--clients"),
    ]:
        with pytest.raises(launch.LaunchError, match=match):
            launch_placement.build_plan(devices_per_client=4, **kwargs)


def test_hosts_with_their_own_port_bases():
    assert launch_placement.parse_hosts("h1, h2:9100") == [("h1", None), ("h2", 9100)]
    plan = launch_placement.build_plan(2, 4, hosts=launch_placement.parse_hosts("localhost:25100,127.0.0.1:25200"), host_index=1)
    assert plan.jobs == ("localhost:25100", "127.0.0.1:25200") and plan.local == [1]
    with pytest.raises(launch.LaunchError, match="HOST:PORT_BASE"):
        launch_placement.parse_hosts("h1:x")


def test_dry_run_prints_each_clients_environment(capsys):
    from dsgd.cli import main as cli_main

    rc = cli_main(["launch", "--clients", "2", "--devices-per-client", "4", "--port-base", "24000", "--dry-run",
                   "--", "dsgd", "bench", "--mesh", "batch=2,model=4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2
    assert "DTENSOR_CLIENT_ID=1" in lines[1] and "DTENSOR_JOBS=localhost:24000,localhost:24001" in lines[1]
    assert lines[0].endswith("-m dsgd.multiclient bench --mesh batch=2,model=4")


# ----------------------------------------------------------------------------- the watchdog (no TensorFlow)


def _fake(cid: int, argv: list[str], *, ready=False, done=False) -> launch.Client:
    cfg = mc.ClientConfig(cid, ("localhost:1", "localhost:2"), "worker", 1, "CPU")
    c = launch.Client(cfg, subprocess.Popen(argv, start_new_session=True))
    c.ready, c.done = ready, done
    return c


def test_watchdog_stops_clients_that_never_join():
    clients = [_fake(0, ["sleep", "60"]), _fake(1, ["sleep", "60"], ready=True)]
    t0 = time.monotonic()
    err = launch._watch(clients, t0, start_timeout=0.5, grace=60, timeout=None, poll_s=0.05)
    launch._stop(clients)
    assert "client(s) [0] did not join the cluster" in err
    assert time.monotonic() - t0 < 10 and all(c.proc.returncode is not None for c in clients)


def test_watchdog_bounds_clients_outliving_the_others():
    clients = [_fake(0, ["true"], ready=True, done=True), _fake(1, ["sleep", "60"], ready=True)]
    err = launch._watch(clients, time.monotonic(), start_timeout=60, grace=0.5, timeout=None, poll_s=0.05)
    launch._stop(clients)
    assert "client(s) [1] still running" in err


def test_watchdog_reports_a_client_killed_by_a_signal():
    clients = [_fake(0, ["sleep", "60"], ready=True), _fake(1, ["sleep", "60"], ready=True)]
    os.kill(clients[1].proc.pid, 9)
    err = launch._watch(clients, time.monotonic(), start_timeout=60, grace=60, timeout=None, poll_s=0.05)
    launch._stop(clients)
    assert "client 1 was killed by signal SIGKILL before finishing" in err
    assert clients[0].proc.returncode is not None


def test_watchdog_overall_timeout():
    clients = [_fake(0, ["sleep", "60"], ready=True), _fake(1, ["sleep", "60"], ready=True)]
    err = launch._watch(clients, time.monotonic(), start_timeout=60, grace=60, timeout=0.3, poll_s=0.05)
    launch._stop(clients)
    assert "--timeout" in err
