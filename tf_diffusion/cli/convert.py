"""``tf-diffusion convert``: a checkpoint in another format, written atomically, never over existing files.

tf-diffusion convert tiny-shapes out/ --to diffusers
tf-diffusion convert model.ckpt model.safetensors --to single-file --config sd-v1-5
"""

from __future__ import annotations

import argparse
import os

from tf_diffusion.cli._common import (
    UsageError,
    add_source_options,
    check_model,
    check_source_paths,
    import_tensorflow,
    source_kwargs,
)

FORMATS = ("single-file", "diffusers", "tf_diffusion")
DTYPES = ("float32", "float16", "bfloat16")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``convert`` on the tf-diffusion command's subparsers."""
    p = subparsers.add_parser("convert", help="convert a checkpoint to another format")
    p.add_argument("src", help="shipped model name, checkpoint file, folder or Hugging Face Hub id")
    p.add_argument("dst", help="output folder, or .safetensors file for --to single-file")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--dtype", choices=DTYPES, help="cast floating weights")
    add_source_options(p)
    p.set_defaults(func=run, option_names={"format": "--to", "dtype": "--dtype"})
    return p


def run(args: argparse.Namespace) -> int:
    """Convert; returns the exit status."""
    if args.to == "single-file" and not args.dst.endswith(".safetensors"):
        raise UsageError(
            f"DST {args.dst}: --to single-file writes a .safetensors file; name it *.safetensors"
        )
    source = check_model(args.src, "")
    destination = os.path.abspath(args.dst)
    if os.path.exists(source) and os.path.abspath(source) == destination:
        raise UsageError("DST is the same path as SRC; write the conversion somewhere else")
    if os.path.lexists(destination) and not args.overwrite:
        raise FileExistsError(f"{args.dst}: already exists; pass --overwrite to replace it")
    check_source_paths(args)
    kwargs = source_kwargs(args)
    import_tensorflow()
    from tf_diffusion.weights.loading import load_pipeline_weights, save

    with load_pipeline_weights(source, **kwargs) as weights:
        save(weights, args.dst, format=args.to, overwrite=args.overwrite, dtype=args.dtype)
        report = weights.report
    print(f"wrote {args.dst} ({args.to}) from {report.format} {report.family} weights ({report.config_name})")
    return 0
