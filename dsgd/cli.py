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
# import name -> pip package, where they differ (dsgd's dependencies: pyproject.toml)
PIP_NAMES = {"tf_keras": "tf-keras", "tensorboard_plugin_profile": "tensorboard-plugin-profile"}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the value, what is allowed, where to read more), exit 2.

    ``load_error``: the command's module could not be imported (or its options built); the parser
    then takes any arguments, so that running the command names what is missing instead of
    refusing its options.
    """

    def __init__(self, *args, load_error: Optional[ImportError] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_error = load_error

    def parse_known_args(self, args=None, namespace=None):
        if self.load_error is None:
            return super().parse_known_args(args, namespace)
        namespace, _ = super().parse_known_args([], namespace)  # its defaults: what to run
        namespace.arguments = list(args or [])
        return namespace, []

    def error(self, message: str):
        # prog is "dsgd launch -- dsgd bench" for a launched command: its help is dsgd bench's
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split(' -- ')[-1]} --help)\n")


def cannot_load_message(command: str, error: ImportError) -> str:
    """``dsgd <command>: cannot load: <what is missing> (install it: ...)``, one line."""
    missing = getattr(error, "name", None)
    if missing:
        pkg = PIP_NAMES.get(missing.split(".")[0], missing.split(".")[0])
        fix = f"install it: {sys.executable} -m pip install {pkg}, or bash scripts/setup.sh for all of dsgd's harness"
    else:
        fix = "reinstall dsgd's harness: bash scripts/setup.sh"
    return f"dsgd {command}: cannot load: {error} ({fix})"


def _cannot_load(args) -> int:
    print(cannot_load_message(args.command, args.load_error), file=sys.stderr)
    return 2


def build_parser(prog: str = "dsgd") -> argparse.ArgumentParser:
    """The ``dsgd`` parser, one subcommand per :data:`COMMANDS` entry.  A command whose module (or
    options) cannot be loaded for a missing dependency stays listed, and says so when run (exit 2)."""
    p = Parser(prog=prog, description="Tuned mesh-aware SGD for DTensor, and its harness.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (mod, helptext) in COMMANDS.items():
        try:
            module = importlib.import_module(mod)
            module.add_arguments(Parser(prog=f"{prog} {name}"))  # its options build (they may import more)
        except ImportError as e:
            sp = sub.add_parser(name, help=f"{helptext} [cannot load: {e}]", add_help=False, load_error=e)
            sp.set_defaults(_main=_cannot_load, load_error=e)
            continue
        sp = sub.add_parser(name, help=helptext, description=helptext)
        module.add_arguments(sp)
        sp.set_defaults(_main=module.main)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dsgd``'s entry point: parse, run the command, exit 2 with one line for a bad value."""
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
