"""The ``tf-diffusion`` command: inspect and convert Stable Diffusion checkpoints.

    tf-diffusion info PATH_OR_HUB_ID
    tf-diffusion convert SRC DST --to {single-file,diffusers,tf_diffusion}
    tf-diffusion generate PROMPT -o out.png          (tf_diffusion.generate_cli)

Each subcommand is one function registered in ``build_parser`` (``_cmd_*`` here, or a
module's ``add_parser``), which sets ``func``. Errors are printed as one line on stderr
with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

PROG = "tf-diffusion"


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="preset name or diffusers / tf_diffusion folder to take the architecture from"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer folder (vocab.json, merges.txt) to use instead of the detected one"
    )
    parser.add_argument("--variant", help='diffusers weight variant, e.g. "fp16"')
    parser.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    parser.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample"),
        help="what the UNet predicts (single files cannot show it)",
    )
    parser.add_argument(
        "--use-ema", action="store_true", help="take the EMA UNet weights of a full single file"
    )


def _source_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        config=args.config,
        tokenizer=args.tokenizer,
        variant=args.variant,
        revision=args.revision,
        prediction_type=args.prediction_type,
        use_ema=True if args.use_ema else None,
    )


def _cmd_info(args: argparse.Namespace) -> int:
    from tf_diffusion.weights.loading import load_pipeline_weights

    with load_pipeline_weights(args.path, strict=False, **_source_kwargs(args)) as weights:
        report = weights.report
        if args.json:
            print(json.dumps(dataclasses.asdict(report), indent=2))
        else:
            print(report)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from tf_diffusion.weights.loading import load_pipeline_weights, save

    source, destination = os.path.abspath(args.src), os.path.abspath(args.dst)
    if os.path.exists(args.src) and source == destination:
        raise ValueError("DST is the same path as SRC; write the conversion somewhere else")
    if os.path.exists(destination) and not args.overwrite:
        raise FileExistsError(f"{args.dst}: already exists; pass --overwrite to replace it")
    with load_pipeline_weights(args.src, **_source_kwargs(args)) as weights:
        save(weights, args.dst, format=args.to, overwrite=args.overwrite, dtype=args.dtype)
        report = weights.report
    print(f"wrote {args.dst} ({args.to}) from {report.format} {report.family} weights ({report.config_name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Stable Diffusion in TensorFlow / Keras 3: checkpoint tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser(
        "info", help="describe a checkpoint: format, family, dtypes, parameters, anything unusual"
    )
    info.add_argument("path", help="checkpoint file, folder or Hugging Face Hub id")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_source_options(info)
    info.set_defaults(func=_cmd_info)

    convert = sub.add_parser("convert", help="convert a checkpoint to another format")
    convert.add_argument("src", help="checkpoint file, folder or Hugging Face Hub id")
    convert.add_argument("dst", help="output folder, or .safetensors file for --to single-file")
    convert.add_argument("--to", required=True, choices=("single-file", "diffusers", "tf_diffusion"))
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    convert.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast floating weights")
    _add_source_options(convert)
    convert.set_defaults(func=_cmd_convert)

    from tf_diffusion import export_cli, generate_cli, train_cli

    generate_cli.add_parser(sub)
    export_cli.add_parser(sub)
    train_cli.add_parser(sub)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 error, 2 usage)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
