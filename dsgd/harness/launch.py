"""``dsgd launch``: run a dsgd command as N DTensor clients (DTensor's own multi-client runtime).

::

    dsgd launch --clients 2 --devices-per-client 4 -- bench --mesh batch=2,model=4
    dsgd launch --clients 2 --devices-per-client 4 -- python train.py     # any script

Each client is ``python -m dsgd.multiclient <command>`` (:mod:`dsgd.multiclient`) with
``DTENSOR_CLIENT_ID``, ``DTENSOR_NUM_CLIENTS``, ``DTENSOR_JOB_NAME``, ``DTENSOR_JOBS`` and
``DSGD_LOCAL_DEVICES`` set; it joins the cluster (``dtensor.initialize_accelerator_system``)
before TensorFlow starts, runs the command, and waits at a barrier for every client.
Client 0's standard output is the report: it is printed only once *every* client has
finished cleanly.  A watchdog stops the run when a client dies, exits without finishing,
never joins the cluster, or outlives the others: the remaining clients are killed and
the launcher exits with :data:`EXIT_FAILED`, naming the client, its exit code and the
last lines of its standard error.

On real hosts, run the same ``dsgd launch`` line on every host with ``--hosts`` (the same
list, in the same order, everywhere) and a fixed ``--port-base``; each host starts its own
clients (``--host-index``, or found from the host's name).  See
:func:`dsgd.harness.launch_placement.build_plan` (which client runs where, on which port).
"""
from __future__ import annotations

import collections
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from dsgd import multiclient as mc
from dsgd.harness.launch_placement import LaunchError, Plan, build_plan, check_ports, parse_hosts, pick_ports

EXIT_FAILED = 4  # a client crashed, was killed, never joined, or the run timed out
DEFAULT_START_TIMEOUT_S = 180.0
DEFAULT_GRACE_S = 60.0
_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IW]\d{4} \d\d:\d\d:\d\d)")
_TAIL_LINES = 15


# ----------------------------------------------------------------------------- the command


def client_command(command: Sequence[str]) -> list[str]:
    """The user's command after ``--`` as ``python -m dsgd.multiclient`` arguments.

    Accepts ``dsgd bench ...``, ``bench ...`` (any dsgd subcommand but ``launch``),
    ``python SCRIPT ...``, ``python -m MODULE ...`` and ``SCRIPT.py ...``.
    """
    from dsgd.cli import COMMANDS

    cmd = list(command)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        raise LaunchError("no command given: use e.g. `dsgd launch --clients 2 -- bench --mesh batch=2,model=4`")
    head = os.path.basename(cmd[0])
    if head == "dsgd":
        cmd = cmd[1:]
        if not cmd:
            raise LaunchError("`dsgd` needs a subcommand, e.g. `-- dsgd bench`")
        head = cmd[0]
    if head == "launch":
        raise LaunchError("`dsgd launch` cannot launch itself")
    if head in COMMANDS:
        return cmd
    if re.fullmatch(r"python[0-9.]*", head) or head == os.path.basename(sys.executable):
        rest = cmd[1:]
        if rest[:1] == ["-m"] and len(rest) >= 2:
            return ["--module", rest[1], *rest[2:]]
        if rest and rest[0].endswith(".py"):
            return ["--script", rest[0], *rest[1:]]
        raise LaunchError(f"`{shlex.join(cmd)}`: give `python SCRIPT.py ...` or `python -m MODULE ...`")
    if head.endswith(".py"):
        return ["--script", cmd[0], *cmd[1:]]
    raise LaunchError(
        f"unknown command {cmd[0]!r}: give a dsgd command ({', '.join(c for c in COMMANDS if c != 'launch')}), "
        "`python SCRIPT.py ...` or `python -m MODULE ...`")


# ----------------------------------------------------------------------------- running


@dataclass
class Client:
    config: mc.ClientConfig
    proc: subprocess.Popen
    stdout: list[str] = field(default_factory=list)
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    ready: bool = False
    done: bool = False
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def id(self) -> int:
        return self.config.client_id

    def tail(self, n: int = _TAIL_LINES) -> str:
        lines = [ln for ln in list(self.stderr_tail) if not _NOISE.match(ln) and not ln.startswith("@@dsgd-")]
        return "".join(lines[-n:]).rstrip()


@dataclass
class Result:
    ok: bool
    exit_code: int
    report: str  # client 0's stdout when ok (and client 0 ran here), else ""
    error: str = ""
    clients: list[Client] = field(default_factory=list)
    seconds: float = 0.0


def _reader(stream, sink, client: Client, echo: Optional[str], log) -> None:
    for line in stream:
        if log is not None:
            log.write(line)
            log.flush()
        if line.startswith(mc.READY_MARKER):
            client.ready = True
            continue
        if line.startswith(mc.DONE_MARKER):
            client.done = True
            continue
        sink.append(line)
        if echo is not None and not _NOISE.match(line):
            sys.stderr.write(f"{echo}{line}")
            sys.stderr.flush()
    stream.close()
    if log is not None:
        log.close()


def _stop(clients: Sequence[Client], wait_s: float = 5.0) -> None:
    """Terminate every client still running (its whole process group), then kill what is left."""
    running = [c for c in clients if c.proc.poll() is None]
    for c in running:
        try:
            os.killpg(c.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait_s
    for c in running:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            c.proc.wait()


def _gpu_share(cfg: mc.ClientConfig, j: int) -> dict:
    """GPU clients: this host's ``j``-th client sees its own ``K`` GPUs (``CUDA_VISIBLE_DEVICES``)."""
    if cfg.device_type != "GPU":
        return {}
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    k = cfg.local_devices
    if not visible:
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(j * k + i) for i in range(k))}
    if len(visible) < (j + 1) * k:
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={','.join(visible)} has too few GPUs for client {cfg.client_id} "
                          f"({k} per client)")
    return {"CUDA_VISIBLE_DEVICES": ",".join(visible[j * k:(j + 1) * k])}


def _raise_on_sigterm():
    """While clients run, SIGTERM on the launcher stops them too (as Ctrl-C does); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def run_clients(plan: Plan, command: Sequence[str], *, start_timeout: float = DEFAULT_START_TIMEOUT_S,
                grace: float = DEFAULT_GRACE_S, timeout: Optional[float] = None, stream: bool = False,
                log_dir: Optional[str] = None, env: Optional[dict] = None, poll_s: float = 0.1) -> Result:
    """Start this host's clients, watch them, and collect the result (see the module docstring).

    ``command``: ``python -m dsgd.multiclient`` arguments (:func:`client_command`).
    ``start_timeout``: every client must have joined the cluster by then.  ``grace``: once
    one client has finished cleanly, the others must finish within this many seconds.
    ``timeout``: bound on the whole run.  ``env``: extra variables for every client.
    """
    from dsgd.harness.isolate import child_env

    if not plan.jobs:
        raise LaunchError("the plan has no ports (give port_base or ports)")
    mine = [plan.configs[i] for i in plan.local]
    check_ports([int(c.jobs[c.client_id].rpartition(":")[2]) for c in mine], [f"client {c.client_id}" for c in mine])
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    clients: list[Client] = []
    t0 = time.monotonic()
    restore = _raise_on_sigterm()
    try:
        for j, cfg in enumerate(mine):
            extra = {**(env or {}), **mc.client_env(cfg), mc.ENV_LAUNCHED: "1", **_gpu_share(cfg, j)}
            proc = subprocess.Popen(
                [sys.executable, "-m", "dsgd.multiclient", *command],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                bufsize=1, env=child_env(extra), start_new_session=True)
            c = Client(cfg, proc)
            clients.append(c)
            logs = [open(os.path.join(log_dir, f"client{cfg.client_id}.{s}"), "w") if log_dir else None
                    for s in ("out", "err")]
            echo = f"[client {cfg.client_id}] " if stream else None
            for s, sink, lg, ec in ((proc.stdout, c.stdout, logs[0], None), (proc.stderr, c.stderr_tail, logs[1], echo)):
                t = threading.Thread(target=_reader, args=(s, sink, c, ec, lg), daemon=True)
                t.start()
                c.threads.append(t)
        error = _watch(clients, t0, start_timeout, grace, timeout, poll_s)
    except BaseException:
        _stop(clients)
        raise
    finally:
        restore()
    _stop(clients)
    for c in clients:
        for t in c.threads:
            t.join(timeout=5)
    seconds = time.monotonic() - t0
    if error:
        return Result(False, EXIT_FAILED, "", error, clients, seconds)
    first = next((c for c in clients if c.id == 0), None)
    code = first.proc.returncode if first is not None else max(c.proc.returncode for c in clients)
    return Result(True, code, "".join(first.stdout) if first is not None else "", "", clients, seconds)


def _watch(clients: list[Client], t0: float, start_timeout: float, grace: float,
           timeout: Optional[float], poll_s: float) -> str:
    """Poll until every client has finished cleanly (returns "") or something went wrong (the error)."""
    first_clean: Optional[float] = None
    while True:
        now = time.monotonic()
        for c in clients:
            rc = c.proc.poll()
            if rc is None:
                continue
            for t in c.threads:  # let the readers see the last lines (and the done marker)
                t.join(timeout=2)
            if not c.done:
                what = "before joining the cluster" if not c.ready else "before finishing"
                return (f"client {c.id} {_describe_exit(rc)} {what}; stopped the other clients. "
                        f"Last lines of its stderr:\n{c.tail() or '(none)'}")
            if first_clean is None:
                first_clean = now
        if all(c.proc.poll() is not None for c in clients):
            return ""
        if first_clean is not None and now - first_clean > grace:
            late = [c.id for c in clients if c.proc.poll() is None]
            return f"client(s) {late} still running {grace:.0f} s after another client finished; stopped them"
        if now - t0 > start_timeout:
            slow = [c for c in clients if not c.ready and c.proc.poll() is None]
            if slow:
                return (f"client(s) {[c.id for c in slow]} did not join the cluster within {start_timeout:.0f} s "
                        "(a client missing, unreachable, or a port blocked); stopped all clients. Last lines of "
                        f"client {slow[0].id}'s stderr:\n{slow[0].tail() or '(none)'}")
        if timeout and now - t0 > timeout:
            return f"the run took longer than --timeout {timeout:.0f} s; stopped all clients"
        time.sleep(poll_s)


# ----------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("--clients", type=int, default=2, help="number of DTensor clients (processes) in all (default 2)")
    p.add_argument("--devices-per-client", type=int, default=4,
                   help="logical devices per client (CPU: the host CPU is split; default 4)")
    p.add_argument("--device-type", default="CPU", choices=["CPU", "GPU"])
    p.add_argument("--hosts", help="comma-separated HOST or HOST:PORT_BASE, the same list in the same order on "
                                   "every host (default: localhost only); clients are spread evenly, in order")
    p.add_argument("--host-index", type=int, help="which entry of --hosts this host is (default: found by name)")
    p.add_argument("--port-base", type=int,
                   help="client j of a host listens on port PORT_BASE+j (default on one host: free ports chosen)")
    p.add_argument("--job-name", default=mc.DEFAULT_JOB_NAME, help="DTENSOR_JOB_NAME (default worker)")
    p.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S,
                   help="seconds for every client to join the cluster (default 180)")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                   help="seconds the other clients may run on after one has finished (default 60)")
    p.add_argument("--timeout", type=float, help="bound on the whole run, in seconds (default none)")
    p.add_argument("--stream", action="store_true", help="echo every client's stderr live, prefixed")
    p.add_argument("--log-dir", help="write each client's full stdout/stderr to DIR/client<i>.out|err")
    p.add_argument("--dry-run", action="store_true", help="print each client's environment and command, start nothing")
    p.add_argument("client_argv", nargs="...", metavar="COMMAND",
                   help="-- then the dsgd command (bench ..., dsgd bench ..., python X.py)")


def _one_host_no_port(hosts) -> bool:
    return not hosts or (len(hosts) == 1 and hosts[0][1] is None)


def main(args) -> int:
    from dsgd.harness.launch_args import check_launch

    command = client_command(args.client_argv)
    check_launch(args, command)  # the launcher's values and the clients' command, before any client starts
    hosts = parse_hosts(args.hosts) if args.hosts else None
    plan = build_plan(args.clients, args.devices_per_client, hosts=hosts, port_base=args.port_base,
                      host_index=args.host_index, job_name=args.job_name, device_type=args.device_type,
                      ports=pick_ports(args.clients) if args.port_base is None and _one_host_no_port(hosts) else None)
    if args.dry_run:
        for i in plan.local:
            envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in mc.client_env(plan.configs[i]).items())
            print(f"{envs} {shlex.quote(sys.executable)} -m dsgd.multiclient {shlex.join(command)}")
        return 0
    res = run_clients(plan, command, start_timeout=args.start_timeout, grace=args.grace, timeout=args.timeout,
                      stream=args.stream, log_dir=args.log_dir)
    if not res.ok:
        print(f"dsgd launch: error: {res.error}", file=sys.stderr)
        print(f"dsgd launch: no result: the run did not complete on all {len(plan.configs)} clients "
              f"({res.seconds:.1f} s)", file=sys.stderr)
        return res.exit_code
    sys.stdout.write(res.report)
    sys.stdout.flush()
    lead = next((c for c in res.clients if c.id == 0), None)
    if res.exit_code != 0 and lead is not None and lead.tail():
        print(f"dsgd launch: the command exited with code {res.exit_code} on client 0; its stderr ends:\n"
              f"{lead.tail()}", file=sys.stderr)
    return res.exit_code
