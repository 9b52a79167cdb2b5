"""`python -m fewsound <command> ...`: the library's command line.

Each command lives in its own module under `fewsound/commands/` and exposes two functions:
`add_arguments(parser)` and `run(args) -> int`. Modules are imported lazily so `--help` stays fast and
a command's heavy dependencies (torch, cdpam, ...) load only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from fewsound.errors import FewsoundError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("fewsound.commands.params", "print INR parameter counts for a preset (table1, kan-ablation)"),
    "fit": ("fewsound.commands.fit", "fit one INR to one audio clip and write pred/gt audio, spectrogram, metrics"),
    "evaluate": ("fewsound.commands.evaluate", "compute the paper's metrics between reference and reconstruction"),
    "reconstruct": ("fewsound.commands.reconstruct", "reconstruct a long audio file with a trained hypernetwork"),
    "mlflow": ("fewsound.commands.mlflow", "status|stop the embedded MLflow server; serve: the cluster's, backed up"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line (`prog: error: ... (see --help)`), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type of counts that must be >= 1 (--steps, --epochs, --trials, ...): a bad value is one line."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fewsound", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (its arguments are needed to parse).
        if name == wanted:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
