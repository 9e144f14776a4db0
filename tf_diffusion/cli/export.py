"""``tf-diffusion export``: a TF Serving SavedModel (prompt string in, PNG out) or TFLite components.

    tf-diffusion export MODEL DIR                          # DIR/1/ for tensorflow_model_server
    tf-diffusion export MODEL DIR --sampler dpmpp_2m_karras --steps 25 --height 512 --width 512 --xla
    tf-diffusion export MODEL DIR --format tflite --quantization float16

MODEL is a preset with shipped weights (tiny-shapes), a checkpoint file or folder, or a hub id. DIR must
be empty or absent unless ``--overwrite`` is given; versions are written to a temporary folder and renamed
into place, so a model server watching DIR never loads a half-written export.
"""

from __future__ import annotations

import argparse
import os

from tf_diffusion.cli._common import (
    UsageError,
    check_model,
    check_sampler,
    check_size,
    import_tensorflow,
    model_factor,
    positive_int,
)

FORMATS = ("saved_model", "tflite")
QUANTIZATIONS = ("none", "float16", "dynamic_range")
# tf_diffusion.export's EXPORT_DTYPES and TFLITE_COMPONENTS, known here without importing TensorFlow
# (tests/test_cli_fast.py keeps them equal).
EXPORT_DTYPES = ("float32", "bfloat16", "mixed_float16", "mixed_bfloat16")
TFLITE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "decoder")
# export_saved_model / export_tflite argument names -> our options, for messages from the library.
OPTION_NAMES = {
    "num_steps": "--steps",
    "sampler": "--sampler",
    "height": "--height",
    "width": "--width",
    "version": "--version",
    "dtype": "--dtype",
    "quantization": "--quantization",
    "components": "--components",
    "jit_compile": "--xla",
    "controlnet": "--controlnet",
    "load_t5": "--no-t5",
    "max_sequence_length": "--max-sequence-length",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the tf-diffusion command's subparsers."""
    p = subparsers.add_parser(
        "export", help="write a TF Serving SavedModel (prompt -> image) or TFLite models of the components"
    )
    p.add_argument("model", help="shipped model name, checkpoint file or folder, or hub id")
    p.add_argument(
        "directory", help="output folder: SavedModel versions DIR/<version>/, or the .tflite files"
    )
    p.add_argument("--format", choices=FORMATS, default="saved_model", help="default: %(default)s")
    p.add_argument("--version", type=int, default=None, help="SavedModel version (default: highest + 1)")
    p.add_argument("--sampler", default=None, help="sampler fixed in the graph (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps fixed in the graph")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument(
        "--dtype", choices=EXPORT_DTYPES, default=None, help="compute precision (default: float32)"
    )
    p.add_argument(
        "--xla", action="store_true", help="XLA-compile the denoising loop (GPU/TPU model servers)"
    )
    p.add_argument(
        "--components",
        nargs="+",
        choices=TFLITE_COMPONENTS,
        default=None,
        help="tflite: which components to convert (default: every one the model has; text_encoder_2 is SDXL's)",
    )
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="tflite weight format")
    p.add_argument(
        "--controlnet",
        default=None,
        metavar="PATH",
        help="saved_model: one ControlNet (file or folder) in the graph; the signatures then take "
        "control_image and control_scale",
    )
    p.add_argument(
        "--no-t5",
        action="store_true",
        help="SD3: load the model without T5 (the SavedModel leaves T5 out; its tokens are zeros)",
    )
    p.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        metavar="N",
        help="SD3: the zero tokens standing for T5 in the graph, 1..512 (default: the model's)",
    )
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty DIR; replace what clashes")
    p.set_defaults(func=run, option_names=OPTION_NAMES)
    return p


def run(args: argparse.Namespace) -> int:
    """Export; returns the exit status."""
    if args.format == "tflite" and (
        args.xla or args.sampler or args.steps or args.version is not None or args.dtype
    ):
        raise UsageError(
            "--xla, --sampler, --steps, --version and --dtype apply to --format saved_model only "
            "(TFLite takes --quantization)"
        )
    if args.format == "saved_model" and args.quantization != "none":
        raise UsageError("--quantization applies to --format tflite only")
    if args.controlnet is not None:
        if args.format == "tflite":
            raise UsageError("--controlnet applies to --format saved_model only")
        if not os.path.exists(args.controlnet):
            raise FileNotFoundError(f"--controlnet {args.controlnet}: no such file or folder")
    positive_int(args.steps, "--steps")
    family_options = {}
    if args.max_sequence_length is not None:
        if args.format == "tflite":
            raise UsageError("--max-sequence-length applies to --format saved_model only")
        positive_int(args.max_sequence_length, "--max-sequence-length")
        if args.max_sequence_length > 512:
            raise UsageError(f"--max-sequence-length {args.max_sequence_length} must be in 1..512")
        family_options["max_sequence_length"] = args.max_sequence_length
    positive_int(args.version, "--version", minimum=0)
    check_sampler(args.sampler, "--sampler")
    check_size(args.height, args.width, None)
    source = check_model(args.model, "")
    check_size(args.height, args.width, model_factor(source)[0])
    if os.path.exists(args.directory) and not os.path.isdir(args.directory):
        raise UsageError(f"DIR {args.directory}: exists and is not a folder")
    if not args.overwrite and os.path.isdir(args.directory):
        # The same refusals export_saved_model / export_tflite make, before the model is built.
        if args.format == "tflite":
            clash = [
                f"{c}.tflite"
                # Without --components, the ones every model has; export_tflite checks the rest.
                for c in args.components or ("unet", "decoder")
                if os.path.exists(os.path.join(args.directory, f"{c}.tflite"))
            ]
            if clash:
                raise FileExistsError(
                    f"{args.directory}: {', '.join(clash)} exist; pass --overwrite to replace them"
                )
        elif any(not name.startswith(".tmp-") for name in os.listdir(args.directory)):
            raise FileExistsError(
                f"{args.directory}: not empty; pass --overwrite to add or replace a version"
            )

    import_tensorflow()
    from tf_diffusion import export
    from tf_diffusion.controlnet import ControlNet
    from tf_diffusion.pipeline import StableDiffusion

    # --no-t5 reaches only the SD3 loaders (None: the loader's default, so the UNet loader never sees it).
    sd = StableDiffusion.from_pretrained(source, load_t5=False if args.no_t5 else None)
    if args.format == "tflite":
        quantization = None if args.quantization == "none" else args.quantization
        paths = export.export_tflite(
            sd,
            args.directory,
            components=args.components,
            quantization=quantization,
            height=args.height,
            width=args.width,
            overwrite=args.overwrite,
        )
        for component, path in paths.items():
            print(f"wrote {path} ({component}, {path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    info = export.export_saved_model(
        sd,
        args.directory,
        version=args.version,
        sampler=args.sampler,
        num_steps=args.steps,
        height=args.height,
        width=args.width,
        dtype=args.dtype,
        jit_compile=args.xla,
        overwrite=args.overwrite,
        controlnet=None if args.controlnet is None else ControlNet.from_pretrained(args.controlnet),
        **family_options,
    )
    meta = info.metadata
    print(
        f"wrote {info.path} (SavedModel version {info.version}: {meta['sampler']}, {meta['num_steps']} steps, "
        f"{meta['width']}x{meta['height']}, {meta['dtype']}{', XLA' if meta['jit_compile'] else ''})"
    )
    return 0
