"""The client side of a multi-client DTensor run: read the environment, start DTensor's
own multi-client runtime, build meshes that span every client.

A *client* is one process of a DTensor cluster.  ``dsgd launch`` (:mod:`dsgd.harness.launch`)
starts them; on real hosts they can also be started by hand with these variables set
(the same on every client, except ``DTENSOR_CLIENT_ID``):

``DTENSOR_JOBS``            ``host:port`` of every client, in client-id order (comma-separated)
``DTENSOR_CLIENT_ID``       this client's index in ``DTENSOR_JOBS``
``DTENSOR_NUM_CLIENTS``     the number of clients (checked against ``DTENSOR_JOBS``)
``DTENSOR_JOB_NAME``        the TensorFlow job name shared by all clients (default ``worker``)
``DSGD_LOCAL_DEVICES``      logical devices on this client (CPU: the host CPU is split)
``DSGD_DEVICE_TYPE``        ``CPU`` (default) or ``GPU``

and run ``python -m dsgd.multiclient <dsgd command ...>`` (or ``--script FILE`` /
``--module MOD``) on each.  That entry point calls
``dtensor.initialize_accelerator_system`` before anything else touches TensorFlow, runs
the command, waits at a coordination-service barrier for every client, and then ends
the process with ``os._exit`` (DTensor refuses ``shutdown_accelerator_system`` in
multi-client mode; the process exit is the shutdown).
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional, Sequence

ENV_CLIENT_ID = "DTENSOR_CLIENT_ID"
ENV_NUM_CLIENTS = "DTENSOR_NUM_CLIENTS"
ENV_JOB_NAME = "DTENSOR_JOB_NAME"
ENV_JOBS = "DTENSOR_JOBS"
ENV_LOCAL_DEVICES = "DSGD_LOCAL_DEVICES"
ENV_DEVICE_TYPE = "DSGD_DEVICE_TYPE"
# Set by `dsgd launch` only: the client prints READY_MARKER on stderr once the cluster is up.
ENV_LAUNCHED = "DSGD_LAUNCHED"
# Fault injection for tests: client DSGD_FAULT_CLIENT exits with code FAULT_EXIT_CODE
# at DSGD_FAULT_AT = "start" (before joining the cluster) or "ready" (after it).
ENV_FAULT_CLIENT = "DSGD_FAULT_CLIENT"
ENV_FAULT_AT = "DSGD_FAULT_AT"
FAULT_EXIT_CODE = 17
# A slow client, for tests: client DSGD_FAULT_CLIENT sleeps this many ms before each step barrier.
ENV_FAULT_STEP_DELAY_MS = "DSGD_FAULT_STEP_DELAY_MS"
STEP_BARRIER_TIMEOUT_S = 300  # one step (a first step compiles: tens of seconds under load)
READY_MARKER = "@@dsgd-client-ready"  # on stderr, once the cluster is up (launched clients only)
DONE_MARKER = "@@dsgd-client-done"  # on stderr, after the exit barrier: this client's result is complete
DEFAULT_JOB_NAME = "worker"
EXIT_BARRIER_TIMEOUT_S = 300


class ClientConfigError(ValueError):
    """The DTENSOR_*/DSGD_* environment of a client is inconsistent."""


@dataclass(frozen=True)
class ClientConfig:
    client_id: int
    jobs: tuple[str, ...]
    job_name: str
    local_devices: int
    device_type: str

    @property
    def num_clients(self) -> int:
        return len(self.jobs)

    @property
    def global_devices(self) -> int:
        return self.num_clients * self.local_devices


def is_client(environ: Optional[dict] = None) -> bool:
    """True when this process is a DTensor multi-client client (``DTENSOR_JOBS`` is set)."""
    env = os.environ if environ is None else environ
    return bool(env.get(ENV_JOBS, "").strip())


def config_from_env(environ: Optional[dict] = None) -> ClientConfig:
    """This client's configuration, checked; raises :class:`ClientConfigError` naming the variable."""
    env = os.environ if environ is None else environ
    jobs = tuple(j.strip() for j in env.get(ENV_JOBS, "").split(",") if j.strip())
    if not jobs:
        raise ClientConfigError(f"{ENV_JOBS} is not set: this process is not a DTensor multi-client client")
    for j in jobs:
        host, sep, port = j.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ClientConfigError(f"{ENV_JOBS}={env[ENV_JOBS]!r}: each entry must be host:port, got {j!r}")
    if len(set(jobs)) != len(jobs):
        raise ClientConfigError(f"{ENV_JOBS}={env[ENV_JOBS]!r} lists an address twice")

    def as_int(name: str, default: Optional[str]) -> int:
        raw = env.get(name, default)
        if raw is None:
            raise ClientConfigError(f"{name} is not set")
        try:
            return int(raw)
        except ValueError:
            raise ClientConfigError(f"{name} must be an integer, got {raw!r}") from None

    cid = as_int(ENV_CLIENT_ID, None)
    if not 0 <= cid < len(jobs):
        raise ClientConfigError(f"{ENV_CLIENT_ID}={cid} is outside 0..{len(jobs) - 1} ({len(jobs)} jobs in {ENV_JOBS})")
    if env.get(ENV_NUM_CLIENTS) is not None and as_int(ENV_NUM_CLIENTS, None) != len(jobs):
        raise ClientConfigError(
            f"{ENV_NUM_CLIENTS}={env[ENV_NUM_CLIENTS]} but {ENV_JOBS} lists {len(jobs)} clients")
    device_type = env.get(ENV_DEVICE_TYPE, "CPU").upper()
    if device_type not in ("CPU", "GPU"):
        raise ClientConfigError(f"{ENV_DEVICE_TYPE} must be CPU or GPU, got {device_type!r}")
    k = as_int(ENV_LOCAL_DEVICES, "1")
    if k < 1:
        raise ClientConfigError(f"{ENV_LOCAL_DEVICES} must be >= 1, got {k}")
    return ClientConfig(cid, jobs, env.get(ENV_JOB_NAME) or DEFAULT_JOB_NAME, k, device_type)


def client_env(config: ClientConfig) -> dict[str, str]:
    """The environment variables that make a process ``config``'s client (inverse of :func:`config_from_env`)."""
    return {
        ENV_CLIENT_ID: str(config.client_id),
        ENV_NUM_CLIENTS: str(config.num_clients),
        ENV_JOB_NAME: config.job_name,
        ENV_JOBS: ",".join(config.jobs),
        ENV_LOCAL_DEVICES: str(config.local_devices),
        ENV_DEVICE_TYPE: config.device_type,
    }


def initialize() -> ClientConfig:
    """Join the cluster: configure the local devices, then ``dtensor.initialize_accelerator_system``.

    Must run before TensorFlow's context is initialized (before any op).  Idempotent.
    Blocks until every client has joined (DTensor's coordination service).
    """
    cfg = config_from_env()
    if is_initialized():
        return cfg
    os.environ.setdefault(ENV_JOB_NAME, cfg.job_name)  # DTensor reads the job name from the env
    from dsgd.devices import configure_devices

    from tensorflow.experimental import dtensor
    from tensorflow.python.eager import context

    if context.context()._initialized:  # noqa: SLF001 - the same check DTensor makes, with a clearer message
        raise RuntimeError(
            "TensorFlow's context was initialized before dsgd.multiclient.initialize(): a DTensor "
            "client must join the cluster before any TensorFlow op runs")
    configure_devices(cfg.local_devices, cfg.device_type)
    dtensor.initialize_accelerator_system(cfg.device_type)
    return cfg


def is_initialized() -> bool:
    """Whether DTensor's accelerator system is up in this process (by whoever started it)."""
    from tensorflow.dtensor.python import accelerator_util

    return accelerator_util.is_initialized()


def wait_for_all(name: str = "dsgd-exit", timeout_s: float = EXIT_BARRIER_TIMEOUT_S) -> None:
    """Block until every client reaches this point (DTensor's coordination-service barrier)."""
    from tensorflow.python.eager import context

    context.async_wait()
    context.context().wait_at_barrier(name, int(timeout_s * 1000))


_STEP_BARRIERS = 0


def step_barrier(timeout_s: float = STEP_BARRIER_TIMEOUT_S, *, fault: bool = True) -> None:
    """Wait until every client has finished its local work up to here (all clients call it
    in the same order; each call is its own barrier).  :func:`dsgd.harness.measure.sync` calls it, so
    a multi-client step time is the time of the slowest client's step, not client 0's own."""
    from tensorflow.python.eager import context

    global _STEP_BARRIERS
    _STEP_BARRIERS += 1
    delay = os.environ.get(ENV_FAULT_STEP_DELAY_MS)
    if fault and delay and os.environ.get(ENV_FAULT_CLIENT) == os.environ.get(ENV_CLIENT_ID):
        time.sleep(float(delay) / 1e3)
    try:
        context.context().wait_at_barrier(f"dsgd-step/{_STEP_BARRIERS}", int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001 - a client failed or fell out of step: fail the cluster fast
        msg = f"client {os.environ.get(ENV_CLIENT_ID)}: step barrier {_STEP_BARRIERS} failed: {type(e).__name__}: {e}"
        report_error(msg)
        raise RuntimeError(msg) from None


def barrier_ms(repeats: int = 5) -> float:
    """The median cost of :func:`step_barrier` alone, in ms (every client must call it together)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step_barrier(fault=False)
        out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)[len(out) // 2]


def leave_together(cfg: ClientConfig, timeout_s: float = EXIT_BARRIER_TIMEOUT_S) -> None:
    """Finish as a cluster: after this, the process may exit.

    Every client waits at a barrier (all work done everywhere); then each client but 0 posts
    a key in the coordination service, and client 0 -- which hosts the service -- waits for
    all those keys before it may exit.  Without the second step client 0 could leave the
    barrier and exit while another client's barrier reply is still on its way, failing that
    client with "Failed to send RPC to coordination service".
    """
    from tensorflow.python.eager import context

    import time

    from tensorflow.python.framework import errors

    wait_for_all("dsgd-exit", timeout_s)
    ctx = context.context()
    if cfg.client_id != 0:
        # Every client's work is done (the barrier passed).  The RPC that posts the key has
        # been seen to fail with a transient "Socket closed" (gRPC UNAVAILABLE), and once (a clean
        # CI-like run) to end in "Connection refused" after all retries -- most likely the key had
        # arrived, its reply was lost, and client 0 had already left.  So retry for ~6 s, and if
        # client 0 stays unreachable it has
        # left (or died, which the launcher reports from its own exit code); this client's result
        # is complete either way, so it leaves too.
        for attempt in range(8):
            try:
                ctx.set_config_key_value(f"dsgd-exit/{cfg.client_id}", "1")
                return
            except errors.AlreadyExistsError:  # an earlier attempt got there; its reply was lost
                return
            except errors.UnavailableError as e:
                if attempt == 7:
                    print(f"client {cfg.client_id}: client 0 unreachable after the exit barrier ({e.message[:120]}); "
                          "leaving", file=sys.stderr, flush=True)
                    return
                time.sleep(0.2 * (attempt + 1))
        return
    for i in range(1, cfg.num_clients):
        ctx.get_config_key_value(f"dsgd-exit/{i}", int(timeout_s * 1000))


_AGREE_CALLS = 0


def agree(tag: str, ok: bool, *, failed_wait_s: float = 120.0) -> list[bool]:
    """Every client's ``ok`` for step ``tag`` (all clients call it, in the same order).

    Each client posts its status in the coordination service and reads the others'.  A
    client that failed waits at most ``failed_wait_s`` for them: if another client is stuck
    in a collective that this one never joined, the wait ends, the error is reported to the
    cluster (which aborts the stuck collectives) and :class:`RuntimeError` is raised.
    """
    from tensorflow.python.eager import context

    global _AGREE_CALLS
    _AGREE_CALLS += 1  # keys unique per call: every client calls agree() in the same order
    tag = f"{_AGREE_CALLS}:{tag}"
    cfg = config_from_env()
    ctx = context.context()
    ctx.set_config_key_value(f"dsgd-agree/{tag}/{cfg.client_id}", "1" if ok else "0")
    wait_ms = 0 if ok else int(failed_wait_s * 1000)  # 0: no limit (crashes are caught by the launcher)
    out = []
    for i in range(cfg.num_clients):
        if i == cfg.client_id:
            out.append(ok)
            continue
        try:
            out.append(ctx.get_config_key_value(f"dsgd-agree/{tag}/{i}", wait_ms) == "1")
        except Exception as e:  # noqa: BLE001 - a timeout or an unhealthy cluster: stop everyone
            msg = f"client {cfg.client_id} failed at {tag!r}; client {i} did not report ({type(e).__name__})"
            report_error(msg)
            raise RuntimeError(msg) from None
    return out


def report_error(message: str) -> None:
    """Tell the other clients this one failed, so their pending collectives and barriers fail fast."""
    if not is_initialized():
        return
    try:
        from tensorflow.python.eager import context
        from tensorflow.python.framework import errors

        context.context().report_error_to_cluster(errors.INTERNAL, message[-2000:])
    except Exception:  # noqa: BLE001 - best effort: the launcher's watchdog is the backstop
        pass


def _maybe_fault(cfg: ClientConfig, at: str) -> None:
    if os.environ.get(ENV_FAULT_AT) == at and os.environ.get(ENV_FAULT_CLIENT) == str(cfg.client_id):
        print(f"dsgd client {cfg.client_id}: injected fault at {at!r} ({ENV_FAULT_CLIENT}), exiting "
              f"with code {FAULT_EXIT_CODE}", file=sys.stderr, flush=True)
        os._exit(FAULT_EXIT_CODE)


def _run(target: argparse.Namespace) -> int:
    try:
        if target.script:
            sys.argv = [target.script, *target.args]
            runpy.run_path(target.script, run_name="__main__")
            return 0
        if target.module:
            sys.argv = [target.module, *target.args]
            runpy.run_module(target.module, run_name="__main__", alter_sys=True)
            return 0
        from dsgd.cli import main as cli_main

        return int(cli_main(target.args) or 0)
    except SystemExit as e:  # a script's sys.exit(...), or argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dsgd.multiclient [--script FILE | --module MOD] ARGS...``: run one client."""
    p = argparse.ArgumentParser(prog="python -m dsgd.multiclient",
                                description="run a dsgd command (or a script/module) as one DTensor client")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--script", help="run this Python file as __main__ instead of a dsgd command")
    g.add_argument("--module", help="run this module as __main__ instead of a dsgd command")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the dsgd command and its arguments")
    target = p.parse_args(list(argv) if argv is not None else None)
    from dsgd.devices import quiet_tensorflow

    quiet_tensorflow()  # an entry point: importing dsgd leaves the environment alone
    if target.args[:1] == ["--"]:
        target.args = target.args[1:]
    try:
        cfg = config_from_env()
    except ClientConfigError as e:
        print(f"dsgd client: error: {e}", file=sys.stderr, flush=True)
        return 2
    if os.environ.get(ENV_LAUNCHED):
        _exit_with_parent()
    _maybe_fault(cfg, "start")
    initialize()
    if os.environ.get(ENV_LAUNCHED):
        print(f"{READY_MARKER} {cfg.client_id}", file=sys.stderr, flush=True)
    _maybe_fault(cfg, "ready")
    code = _run(target)
    # The command returned (with any code): leave together, so that nobody exits (and takes
    # the coordination service down) while another still works.  A client that raised never
    # gets here: it reports the error to the cluster, and the launcher sees it exit without
    # DONE_MARKER and stops the others.
    leave_together(cfg)
    if os.environ.get(ENV_LAUNCHED):
        print(f"{DONE_MARKER} {cfg.client_id} {code}", file=sys.stderr, flush=True)
    return code


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this client if the launcher that started it goes away (even by SIGKILL)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        print("dsgd client: the launcher is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="dsgd-parent-watch", daemon=True).start()


def _exit_now(code: int) -> None:
    """End the client: flush, then leave without TensorFlow's teardown (see the module docstring)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def entry_point() -> None:
    """``python -m dsgd.multiclient``: :func:`main`, then the process ends with its exit code."""
    try:
        rc = main()
    except SystemExit as e:  # argparse errors on the client's own options
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report, then end the process as a client must
        traceback.print_exc()
        report_error(f"dsgd client {os.environ.get(ENV_CLIENT_ID)} failed:\n{traceback.format_exc()}")
        rc = 1
    _exit_now(rc)


if __name__ == "__main__":
    # Run the imported module's copy, so that code importing dsgd.multiclient shares its state.
    from dsgd.multiclient import entry_point as _entry_point

    _entry_point()
