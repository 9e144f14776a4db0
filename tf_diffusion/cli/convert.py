"""``tf-diffusion convert``: a checkpoint in another format, written atomically, never over existing files.

tf-diffusion convert tiny-shapes out/ --to diffusers
tf-diffusion convert model.ckpt model.safetensors --to single-file --config sd-v1-5
tf-diffusion convert sd3.5_medium.safetensors sd35m/ --to diffusers --config stabilityai/stable-diffusion-3.5-medium
tf-diffusion convert sd35m/ sd3.5_medium.safetensors --to single-file
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
    import_tensorflow()
    from tf_diffusion.family_hooks import hooks_for_source

    if hooks_for_source(source, revision=args.revision).name == "mmdit":
        return _run_sd3(args, source)
    kwargs = source_kwargs(args)
    from tf_diffusion.weights.loading import load_pipeline_weights, save

    with load_pipeline_weights(source, **kwargs) as weights:
        save(weights, args.dst, format=args.to, overwrite=args.overwrite, dtype=args.dtype)
        report = weights.report
    print(f"wrote {args.dst} ({args.to}) from {report.format} {report.family} weights ({report.config_name})")
    return 0


# Source options that only the UNet families' loader reads.
_UNET_ONLY = {"tokenizer": "--tokenizer", "variant": "--variant", "prediction_type": "--prediction-type",
              "use_ema": "--use-ema"}  # fmt: skip


def _run_sd3(args: argparse.Namespace, source: str) -> int:
    """An SD3 / SD3.5 single file -> diffusers folder, or folder -> single file (``weights.sd3_convert``)."""
    from tf_diffusion.weights.loading import resolve_source
    from tf_diffusion.weights.sd3_convert import convert_sd3

    given = [option for name, option in _UNET_ONLY.items() if getattr(args, name)]
    if given:
        raise UsageError(f"{', '.join(given)}: not options of SD3 conversion (SD 1.x / 2.x and SDXL only)")
    config = args.config
    if config is not None and not os.path.isdir(config):
        config = resolve_source(config, revision=args.revision)  # a hub id of a diffusers SD3 folder
    path = resolve_source(source, revision=args.revision)
    what = convert_sd3(
        path, args.dst, format=args.to, config=config, overwrite=args.overwrite, dtype=args.dtype
    )
    print(f"wrote {args.dst} ({args.to}): {what}")
    return 0
