"""The ``dsgd`` command line: a thin layer over library functions."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module, help); each module has add_arguments(parser) and main(args) -> int
COMMANDS = {
    "bench": ("dsgd.harness.bench", "time one optimizer step across workloads, meshes, layouts, implementations"),
    "profile": ("dsgd.harness.profile", "capture TensorBoard profiles and XLA HLO into profiles/"),
    "layouts": ("dsgd.advisor.layouts", "recommend variable layouts for a model on a mesh"),
    "launch": ("dsgd.harness.launch", "run a dsgd command as N DTensor clients (multi-client)"),
    "regress": ("dsgd.harness.regress", "find benchmarks that got slower between commits, in asv's results"),
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the value, what is allowed, where to read more), exit 2."""

    def error(self, message: str):
        # prog is "dsgd launch -- dsgd bench" for a launched command: its help is dsgd bench's
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split(' -- ')[-1]} --help)\n")


def build_parser(prog: str = "dsgd") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Tuned mesh-aware SGD for DTensor, and its harness.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (mod, helptext) in COMMANDS.items():
        try:
            module = importlib.import_module(mod)
        except ImportError:
            continue
        sp = sub.add_parser(name, help=helptext, description=helptext)
        module.add_arguments(sp)
        sp.set_defaults(_main=module.main)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dsgd.devices import quiet_tensorflow

    quiet_tensorflow()
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        return int(args._main(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # argcheck.UsageError and the libraries' own input errors
        print(f"dsgd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
