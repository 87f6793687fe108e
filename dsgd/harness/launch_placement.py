"""Where ``dsgd launch``'s clients run: free ports on this host, and the placement of N clients on
hosts and ports (:func:`build_plan`: every client's :class:`dsgd.multiclient.ClientConfig`, and
which of them this host starts)."""
from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from typing import Optional, Sequence

from dsgd import multiclient as mc


class LaunchError(ValueError):
    """A launch that cannot start (bad arguments, ports in use): reported before any client runs."""


# ----------------------------------------------------------------------------- ports


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on this host now (on 127.0.0.1 and on all interfaces)."""
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here
            continue
        try:
            # as gRPC binds: SO_REUSEADDR, so a port whose old connections linger in TIME_WAIT
            # counts as free, and one with a live listener (or plain bound socket) as in use
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL
                continue
            return False
        finally:
            s.close()
    return True


def check_ports(ports: Sequence[int], who: Sequence[str]) -> None:
    """Raise :class:`LaunchError` naming every port of ``ports`` already in use on this host."""
    busy = [f"{p} ({w})" for p, w in zip(ports, who) if not port_free(p)]
    if busy:
        raise LaunchError(
            f"port(s) already in use on this host: {', '.join(busy)}; free them or choose another --port-base")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_ports(n: int, rng: Optional[random.Random] = None, attempts: int = 200) -> list[int]:
    """``n`` distinct ports free on this host, below the kernel's ephemeral range.

    Ports the kernel hands out for outgoing connections are avoided, so that a port found
    free now is not taken by chance before the client's gRPC server binds it.
    """
    rng = rng or random.Random()
    hi = max(_ephemeral_low(), 20000 + n) - n
    chosen: list[int] = []
    for _ in range(attempts):
        p = rng.randrange(15000, hi)
        if p not in chosen and port_free(p):
            chosen.append(p)
            if len(chosen) == n:
                return chosen
    raise LaunchError(f"could not find {n} free ports on this host after {attempts} tries; give --port-base")


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Who runs where: every client's config, and which of them this host starts."""

    configs: list[mc.ClientConfig]
    local: list[int]  # client ids started by this launcher
    hosts: list[str]

    @property
    def jobs(self) -> tuple[str, ...]:
        return self.configs[0].jobs


def parse_hosts(spec: str) -> list[tuple[str, Optional[int]]]:
    """``"h1,h2:9100"`` -> ``[("h1", None), ("h2", 9100)]`` (a port there is that host's port base)."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if sep and port.isdigit() and host:
            out.append((host, int(port)))
        elif sep and not item.startswith("["):
            raise LaunchError(f"--hosts entry {item!r}: expected HOST or HOST:PORT_BASE")
        else:
            out.append((item, None))
    if not out:
        raise LaunchError("--hosts is empty")
    return out


def _this_host_index(hosts: Sequence[str]) -> int:
    names = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"}
    try:
        names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    matches = [i for i, h in enumerate(hosts) if h in names]
    if len(matches) != 1:
        raise LaunchError(
            f"cannot tell which of --hosts {','.join(hosts)} this host ({socket.gethostname()}) is "
            f"({'none' if not matches else 'several'} match); give --host-index")
    return matches[0]


def build_plan(clients: int, devices_per_client: int, *, hosts: Optional[Sequence] = None,
               port_base: Optional[int] = None, host_index: Optional[int] = None, job_name: str = mc.DEFAULT_JOB_NAME,
               device_type: str = "CPU", ports: Optional[Sequence[int]] = None) -> Plan:
    """Assign clients to hosts and ports.

    One host (default ``localhost``): clients ``0..N-1`` on ports ``port_base + i`` (or ``ports``).
    Several hosts (``hosts``: names, or ``(name, port_base)`` pairs overriding ``port_base``):
    ``N / len(hosts)`` consecutive clients per host, in the order of ``hosts``, the host's
    ``j``-th client on its port base ``+ j``; this host (``host_index``) starts its own.
    """
    if clients < 1:
        raise LaunchError(f"--clients must be >= 1, got {clients}")
    if devices_per_client < 1:
        raise LaunchError(f"--devices-per-client must be >= 1, got {devices_per_client}")
    entries = [h if isinstance(h, tuple) else (h, None) for h in (hosts or ["localhost"])]
    names = [h for h, _ in entries]
    if len(set(entries)) != len(entries):
        raise LaunchError(f"--hosts lists a host twice: {','.join(names)}")
    if clients % len(entries):
        raise LaunchError(f"--clients {clients} does not divide over {len(entries)} hosts")
    per_host = clients // len(entries)
    bases = [b if b is not None else port_base for _, b in entries]
    if len(entries) > 1 and None in bases:
        raise LaunchError("with several --hosts, give --port-base or HOST:PORT_BASE (every host must agree on the ports)")
    if ports is not None:
        if len(entries) > 1:
            raise LaunchError("explicit ports are for one host only")
        host_ports = [list(ports)]
    elif bases[0] is not None:
        host_ports = [[b + j for j in range(per_host)] for b in bases]
    else:
        host_ports = None
    if host_ports is not None and any(len(p) != per_host or min(p) < 1 or max(p) > 65535 for p in host_ports):
        raise LaunchError(f"need {per_host} ports in 1..65535 per host, got {host_ports}")
    if host_index is None:
        host_index = 0 if len(entries) == 1 else _this_host_index(names)
    if not 0 <= host_index < len(entries):
        raise LaunchError(f"--host-index {host_index} is outside 0..{len(entries) - 1}")
    jobs = tuple(f"{h}:{p}" for h, hp in zip(names, host_ports) for p in hp) if host_ports is not None else ()
    configs = [mc.ClientConfig(i, jobs, job_name, devices_per_client, device_type.upper()) for i in range(clients)]
    local = list(range(host_index * per_host, (host_index + 1) * per_host))
    return Plan(configs, local, names)
