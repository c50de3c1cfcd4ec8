"""The `specpt` command line: one sub-command per task, each implemented as `main(argv)` in its module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

# sub-command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "mock": ("specpt_hf.data.mock.cli", "write DESI-format mock coadd + redrock files"),
    "plot-mock": ("specpt_hf.data.plots", "plot mock spectra next to a real DESI spectrum"),
    "download": ("specpt_hf.data.download", "download EDR coadd + redrock files"),
    "prepare": ("specpt_hf.data.prepare", "write Parquet shards and a dataset card"),
    "train": ("specpt_hf.training.train", "pretrain the autoencoder or train the redshift head"),
    "templates": ("specpt_hf.templates", "rest-frame templates for a redshift model's chi^2 refinement"),
    "archetypes": ("specpt_hf.archetypes", "archetypes that judge a redshift model's refinement"),
    "evaluate": ("specpt_hf.evaluation.evaluate_model", "metrics and plots on a held-out split"),
    "predict": ("specpt_hf.predict", "redshift catalog from DESI coadd files"),
    "push": ("specpt_hf.hub.push", "write a model repo folder with its card and upload it to the Hub"),
    "presets": ("specpt_hf.presets", "list the named model presets"),
}


DEBUG_VARIABLE = "SPECPT_DEBUG"  # =1: expected errors show their traceback, as with --debug
EXPECTED_ERRORS = (OSError, ValueError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """The `--debug` flag of the commands that report errors through `run_reporting_errors`."""
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of an error (or {DEBUG_VARIABLE}=1)"
    )


def run_reporting_errors(command: str, run: Callable[[], int], debug: bool = False) -> int:
    """`run()`, with an expected error (OSError, ValueError) printed as one line `specpt COMMAND: message`
    on stderr and exit status 1; with `debug` or SPECPT_DEBUG=1 the error is raised (traceback)."""
    try:
        return run()
    except EXPECTED_ERRORS as err:
        if debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"specpt {command}: {message or type(err).__name__}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: specpt COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
