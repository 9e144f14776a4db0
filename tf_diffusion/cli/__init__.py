"""The ``tf-diffusion`` command: generate images, inspect, convert and export checkpoints, train.

    tf-diffusion generate PROMPT -o out.png
    tf-diffusion info PATH_OR_HUB_ID
    tf-diffusion convert SRC DST --to {single-file,diffusers,tf_diffusion}
    tf-diffusion export MODEL DIR
    tf-diffusion train --preset NAME --data FOLDER --steps N --checkpoint-dir DIR
    tf-diffusion preprocess canny IN.png HINT.png
    tf-diffusion serve [--model NAME] [--host 127.0.0.1] [--port 7860] [--api-auth USER:PASS]

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``. Parsing and every
check of options, paths and output files run before TensorFlow is imported, so a mistake is answered
at once. Errors are printed as one line on stderr, never as a traceback: exit status 2 for bad options,
1 for anything that failed later. TensorFlow's log lines are hidden unless ``--verbose`` is given (or
``$TF_DIFFUSION_VERBOSE=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tf_diffusion.cli import convert, export, generate, info, preprocess, serve, train
from tf_diffusion.cli._common import VERBOSE_ENV, UsageError, quiet_environment, to_cli_names

__all__ = ["PROG", "build_parser", "main"]

PROG = "tf-diffusion"
COMMANDS = (generate, info, convert, export, train, preprocess, serve)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line: ``tf-diffusion generate: error: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per subcommand."""
    parser = _Parser(prog=PROG, description="Stable Diffusion in TensorFlow / Keras 3.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help=f"show TensorFlow's log lines (or set ${VERBOSE_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 error, 2 bad options, 130 interrupted.
    """
    try:
        args = build_parser().parse_args(argv)  # imports nothing heavy
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet_environment()
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        sys.stderr.close()
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"{PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, ImportError) as e:
        text = to_cli_names(_one_line(e), getattr(args, "option_names", {}))
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
