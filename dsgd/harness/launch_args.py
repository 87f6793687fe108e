"""``dsgd launch``'s checks of its values, beside the command (:mod:`dsgd.harness.launch`): the
launcher's own, and the clients' dsgd command checked as the clients will see it."""
from __future__ import annotations

import importlib.util
from typing import Sequence

from dsgd import argcheck
from dsgd.advisor.layouts_args import check_command as check_layouts_command
from dsgd.harness.bench_args import check_bench
from dsgd.harness.profile_args import check_profile

#: each dsgd command's checks, by command name
CHECKS = {"bench": check_bench, "profile": check_profile, "layouts": check_layouts_command}


def check_launch(args, command: Sequence[str]) -> None:
    """``dsgd launch``'s values and, for a dsgd command, that command's values as the clients
    will see them (meshes against the cluster's devices); ``command``: :func:`dsgd.harness.launch.client_command`'s.
    Raises :class:`dsgd.argcheck.UsageError`, or exits 2 with argparse's one line for a bad option."""
    argcheck.check_int(args.clients, "--clients")
    argcheck.check_int(args.devices_per_client, "--devices-per-client")
    for flag, v in (("--start-timeout", args.start_timeout), ("--grace", args.grace), ("--timeout", args.timeout)):
        if v is not None and v <= 0:
            raise argcheck.UsageError(f"{flag} {v} must be > 0 seconds")
    argcheck.check_output_dir(args.log_dir, "--log-dir")
    if command[:1] == ["--script"]:
        argcheck.check_input_file(command[1] if len(command) > 1 else None, "the script")
        return
    if command[:1] == ["--module"]:
        if importlib.util.find_spec(command[1]) is None:
            raise argcheck.UsageError(f"module {command[1]!r} cannot be found; check the name or the working "
                                      "directory")
        return
    from dsgd.cli import build_parser, cannot_load_message

    # a bad option: argparse's one-line error ("dsgd launch -- dsgd bench: error: ..."), exit 2
    sub = build_parser("dsgd launch -- dsgd").parse_args(list(command))
    if getattr(sub, "load_error", None) is not None:  # a missing dependency: named before any client starts
        raise argcheck.UsageError(cannot_load_message(sub.command, sub.load_error))
    devices = argcheck.Devices(args.clients * args.devices_per_client, True,
                               f"--clients {args.clients} x --devices-per-client {args.devices_per_client}")
    if sub.command == "bench":
        check_bench(sub, devices)
    elif sub.command in CHECKS:  # launch and regress check their values when they run
        CHECKS[sub.command](sub)
