"""The ``ifnet`` command: one entry point, one module per subcommand.

Each subcommand lives in ``ifnet/cli/<name>.py`` and defines::

    HELP = "one line for `ifnet --help`"
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

Only the chosen subcommand's module is imported, so ``ifnet enhance`` does not pay for torch.
A subcommand whose module does not exist yet says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Optional, Sequence

from ifnet import __version__
from ifnet.errors import IFNetError

#: name -> one-line description (shown even before a module exists). Order is the help order.
COMMANDS: dict[str, str] = {
    "enhance": "CLAHE image enhancement (IEC) of a folder of X-rays into a new folder",
    "convert-openi": "build an R2Gen-format annotation.json from the raw OpenI / Kaggle IU-Xray download",
    "label": "label reports with the 14 CheXpert observations (offline rule-based labeler)",
    "score": "BLEU/METEOR/ROUGE-L/CIDEr and clinical efficacy of generated vs reference reports",
    "train": "train IFNet from a YAML config",
    "tune-top": "fine-tune the top stage of the CNN on the training labels (CPU), for model.weights_path",
    "evaluate": "decode a split with a checkpoint and score it",
    "generate": "write the report for one new study (PNG, JPEG or DICOM)",
    "reproduce": "train and evaluate with several seeds, report mean +- std",
    "serve": "web page and REST API for a checkpoint",
    "export": "export a checkpoint to ONNX (optionally int8)",
    "demo": "the whole pipeline on a generated sample, no download needed",
}


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """``--config`` (a YAML run config) and repeatable ``--set key=value`` overrides, as the commands that
    resolve a training config (:func:`ifnet.config.resolve`) all take them."""
    parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, dotted path (e.g. --set optim.epochs=5); repeatable")


def _module_name(command: str) -> str:
    return "ifnet.cli." + command.replace("-", "_")


def _has_module(command: str) -> bool:
    return importlib.util.find_spec(_module_name(command)) is not None


def _top_parser() -> argparse.ArgumentParser:
    lines = []
    for name, text in COMMANDS.items():
        suffix = "" if _has_module(name) else "  [not built yet]"
        lines.append(f"  {name:<14} {text}{suffix}")
    parser = argparse.ArgumentParser(
        prog="ifnet",
        description="IFNet radiology report generation toolkit.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `ifnet COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ifnet {__version__}")
    parser.add_argument("command", nargs="?", help="one of the commands below")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        top.parse_args(argv)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.print_usage(sys.stderr)
        print(f"ifnet: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if not _has_module(command):
        print(f"ifnet {command}: not built yet in this version ({__version__})", file=sys.stderr)
        return 2
    module = importlib.import_module(_module_name(command))
    parser = argparse.ArgumentParser(prog=f"ifnet {command}", description=COMMANDS[command])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except IFNetError as e:
        print(f"ifnet {command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"ifnet {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` & co.: stop quietly, as Unix tools do.
        sys.stderr.close()
        return 141
