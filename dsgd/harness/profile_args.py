"""``dsgd profile``'s defaults and the checks of its values, beside the command (:mod:`dsgd.harness.profile`).

The defaults live here, not in the command's module, so that the command can import its checks
without an import cycle; :mod:`dsgd.harness.profile` uses these names.
"""
from __future__ import annotations

import os
import re

from dsgd import argcheck
from dsgd.harness.grid import check_grid
from dsgd.names import AUTO

DEFAULT_WORKLOADS = ("bert-mini", "many-small")
DEFAULT_MESHES = ("1", "batch=2,model=4")
DEFAULT_IMPLEMENTATIONS = (AUTO,)
DEFAULT_MODES = ("eager",)  # where ``--mode`` is not given: the optimizer step called eagerly


def check_profile(args) -> None:
    """``dsgd profile``'s values (``--diff`` only needs its ledger); raises :class:`dsgd.argcheck.UsageError`.

    As ``dsgd bench``'s: the workloads are checked where an eager/graph ``--mode`` is asked, the
    ``--model`` names where a train_step/fit mode is (:func:`dsgd.harness.grid.check_grid`).
    """
    if args.diff:
        ledger = args.ledger or os.path.join(args.out, "ledger.csv")
        if not os.path.isfile(ledger):
            raise argcheck.UsageError(f"--diff: no ledger at {ledger!r}; capture profiles first (dsgd profile), or "
                                      "give --ledger FILE / --out DIR")
        return
    argcheck.check_int(args.time_steps, "--time-steps")
    if args.timeout is not None and args.timeout <= 0:
        raise argcheck.UsageError(f"--timeout {args.timeout} must be > 0 seconds")
    check_grid(args, workloads=DEFAULT_WORKLOADS, meshes=DEFAULT_MESHES, implementations=DEFAULT_IMPLEMENTATIONS,
               modes=DEFAULT_MODES, devices=argcheck.worker_devices(args.devices))
    argcheck.check_output_dir(args.out, "--out")
    argcheck.check_output_file(args.ledger, "--ledger", create_dirs=True)
    if args.commit is not None and not re.fullmatch(r"[A-Za-z0-9._+-]+", args.commit):
        raise argcheck.UsageError(f"--commit {args.commit!r} may hold only letters, digits and . _ + -; give e.g. a "
                                  "short SHA")
