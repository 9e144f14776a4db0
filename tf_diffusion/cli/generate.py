"""``tf-diffusion generate``: images from a prompt, offline with the embedded tiny-shapes model by default.

    tf-diffusion generate "a red circle" -o out.png
    tf-diffusion generate "a blue star" --num-images 4 -o stars.png   # stars-1.png ... stars-4.png + stars-grid.png
    tf-diffusion generate "a green square" --image in.png --strength 0.6 -o out.png
    tf-diffusion generate "a yellow heart" --image in.png --mask mask.png -o out.png
    tf-diffusion generate "a red circle <lora:ink:0.8>" --lora-dir loras/ -o out.png
    tf-diffusion generate "a red circle" --lora style.safetensors:0.7 --embedding easyneg.pt \
        --negative-prompt easyneg -o out.png
    tf-diffusion generate "a house" --model sd15.safetensors \
        --control control_v11p_sd15_canny.safetensors:edges.png:0.8 -o house.png
    tf-diffusion generate "a cat" --model sd15.safetensors --ip-adapter models/ip-adapter_sd15.bin \
        --ip-image cat.jpg --ip-scale 0.6 -o cat.png   # image encoder: models/image_encoder/
    tf-diffusion generate "a lighthouse" --model sdxl-base/ --refiner sdxl-refiner/ --denoising-end 0.8 \
        --original-size 2048,2048 --aesthetic-score 6.5 -o out.png

PNGs carry the generation parameters in a ``parameters`` text chunk, written as
AUTOMATIC1111 writes them, so other tools read them back.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import sys
import tempfile

import numpy as np

from tf_diffusion.cli._common import (
    PRECISIONS,
    UsageError,
    check_model,
    check_sampler,
    check_size,
    finite_float,
    import_tensorflow,
    model_factor,
    positive_int,
)
from tf_diffusion.fileio import publish
from tf_diffusion.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV
from tf_diffusion.infotext import generation_parameters
from tf_diffusion.models import DEFAULT_MODEL

# generate() argument names -> our options, for messages from the library.
OPTION_NAMES = {
    "num_steps": "--steps",
    "guidance_scale": "--guidance",
    "height": "--height",
    "width": "--width",
    "num_images": "--num-images",
    "seed": "--seed",
    "scheduler": "--scheduler",
    "image": "--image",
    "mask": "--mask",
    "strength": "--strength",
    "max_pixels": "--max-image-pixels",
    "control_image": "--control IMAGE",
    "controlnet_conditioning_scale": "--control SCALE",
    "controlnet": "--control MODEL",
    "denoising_end": "--denoising-end",
    "ip_adapter_image": "--ip-image",
    "ip_adapter_scale": "--ip-scale",
    "max_sequence_length": "--max-sequence-length",
    "skip_guidance_layers": "--skip-layers",
    "skip_layer_guidance_scale": "--skip-layer-scale",
    "load_t5": "--no-t5",
}
# SDXL micro-conditioning options -> SDXLOptions fields; the aesthetic scores apply to refiners only,
# the target size to base models only.
SDXL_OPTIONS = {
    "--original-size": "original_size",
    "--crop": "crops_coords_top_left",
    "--target-size": "target_size",
    "--aesthetic-score": "aesthetic_score",
    "--negative-aesthetic-score": "negative_aesthetic_score",
}
_REFINER_ONLY = ("aesthetic_score", "negative_aesthetic_score")
_BASE_ONLY = ("target_size",)
DEFAULT_SWITCH = 0.8  # diffusers' documented base -> refiner hand-off


# The PNG parameters of one image (kept under this name for the command line's callers).
a1111_parameters = generation_parameters


def save_png(image: np.ndarray, path: pathlib.Path, parameters: str | None, overwrite: bool) -> None:
    """Write a uint8 (H, W, 3) image as PNG through a temporary file; never overwrite unless asked."""
    from PIL import Image, PngImagePlugin

    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(image).save(handle, format="PNG", pnginfo=info)
        publish(tmp, path, overwrite, "pass --overwrite to replace it")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def grid(images: np.ndarray) -> np.ndarray:
    """Tile (N, H, W, 3) images into a near-square grid (empty cells black)."""
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return out


def output_paths(output: pathlib.Path, count: int) -> tuple[list[pathlib.Path], pathlib.Path | None]:
    """Files for ``count`` images (out.png, or out-1.png ... plus out-grid.png)."""
    if output.suffix.lower() != ".png":
        raise ValueError(f"--output {output} must end in .png")
    if count == 1:
        return [output], None
    stem = output.with_suffix("")
    return [pathlib.Path(f"{stem}-{i + 1}.png") for i in range(count)], pathlib.Path(f"{stem}-grid.png")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on the tf-diffusion command's subparsers."""
    p = subparsers.add_parser(
        "generate", help="generate images from a prompt (offline tiny-shapes by default)"
    )
    p.add_argument("prompt", help='the prompt; weights such as "(red:1.3)" follow the A1111 rules')
    p.add_argument(
        "-o", "--output", default="tf_diffusion.png", help="PNG file to write (default: %(default)s)"
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="preset with shipped weights, checkpoint path or hub id"
    )
    p.add_argument(
        "--config",
        default=None,
        help="folder or preset giving what a single file lacks (a Flux transformer file: a diffusers Flux folder)",
    )
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default=None, help="sampler name, e.g. dpmpp_2m_karras, euler_a, ddim")
    p.add_argument(
        "--seed", type=int, default=None, help="random seed (default: drawn and written to the PNG)"
    )
    p.add_argument("--height", type=int, default=None, help="image height in pixels")
    p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument("--num-images", type=int, default=1, help="images to make (saved as files and a grid)")
    p.add_argument("--image", default=None, help="init image for img2img / inpainting")
    p.add_argument("--strength", type=float, default=None, help="img2img strength in [0, 1]")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint); needs --image")
    p.add_argument(
        "--mask-blur",
        type=float,
        default=None,
        help="inpainting: paste the original pixels back outside the mask, blended over a blur of this "
        "many pixels (default 4, as the A1111 web UI; -1 keeps the decoded image as diffusers does)",
    )
    p.add_argument(
        "--refiner",
        default=None,
        metavar="MODEL",
        help="SDXL: a refiner (checkpoint, folder or hub id) that finishes the base's latents "
        "(diffusers' ensemble of experts; PNG fields Refiner / Refiner switch at)",
    )
    p.add_argument(
        "--denoising-end",
        type=float,
        default=None,
        help=f"with --refiner: the fraction of the schedule the base runs (default {DEFAULT_SWITCH})",
    )
    p.add_argument(
        "--original-size", default=None, metavar="W,H", help="SDXL micro-conditioning original size"
    )
    p.add_argument("--crop", default=None, metavar="TOP,LEFT", help="SDXL micro-conditioning crop top-left")
    p.add_argument(
        "--target-size", default=None, metavar="W,H", help="SDXL base: micro-conditioning target size"
    )
    p.add_argument(
        "--aesthetic-score", type=float, default=None, help="SDXL refiner: aesthetic score (default 6)"
    )
    p.add_argument(
        "--negative-aesthetic-score",
        type=float,
        default=None,
        help="SDXL refiner: the unconditional half's aesthetic score (default 2.5)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help=f"refuse larger --image / --mask files (default: ${MAX_PIXELS_ENV} or {DEFAULT_MAX_PIXELS:,} = 4096x4096)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="a LoRA file (kohya / A1111, diffusers / PEFT, LyCORIS) merged for this run, weight 1 unless "
        "given; repeatable",
    )
    p.add_argument("--lora-dir", default=None, help="the folder that <lora:NAME:WEIGHT> tags in prompts name")
    p.add_argument(
        "--vae",
        default=None,
        metavar="PATH",
        help="a VAE to use instead of the model's: a .safetensors / .pt / .ckpt file (the web UI's models/VAE "
        "files) or a diffusers AutoencoderKL folder; a single-file model without a VAE then loads too",
    )
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="PATH",
        help="a textual-inversion embedding (A1111 .pt / .safetensors, SDXL clip_l + clip_g, diffusers "
        "learned_embeds); its "
        "file name (or its token) is its word in prompts; repeatable",
    )
    p.add_argument("--embedding-dir", default=None, help="load every embedding in this folder")
    p.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="MODEL:IMAGE[:SCALE]",
        help="a ControlNet (diffusers folder, .safetensors or .pth) and its hint image, at this scale "
        "(default 1); repeatable for several nets (tf-diffusion preprocess canny makes edge hints)",
    )
    p.add_argument(
        "--guess-mode",
        action="store_true",
        help="ControlNet guess mode (the web UI's 'ControlNet is more important'); needs --control",
    )
    p.add_argument(
        "--ip-adapter",
        action="append",
        default=[],
        metavar="PATH",
        help="an IP-Adapter file (.bin / .safetensors, the published layout); repeatable for several",
    )
    p.add_argument(
        "--ip-image",
        action="append",
        default=[],
        metavar="IMG",
        help="the picture the IP-Adapter prompts with; with one adapter repeatable (all are used), "
        "with several one per adapter",
    )
    p.add_argument(
        "--ip-scale",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="the IP-Adapter's scale (default 1); one for all adapters or one per adapter",
    )
    p.add_argument(
        "--ip-image-encoder",
        default=None,
        metavar="FOLDER",
        help="the adapters' image encoder (a transformers CLIPVisionModelWithProjection folder); "
        "default: image_encoder/ beside the first --ip-adapter",
    )
    # SD3 / SD3.5 options (family options: another family refuses them, naming the option).
    p.add_argument(
        "--no-t5", action="store_true", help="SD3: run without the T5 encoder (its tokens are zeros)"
    )
    p.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        metavar="N",
        help="SD3: T5 tokens, 1..512 (default 256)",
    )
    p.add_argument(
        "--skip-layers",
        default=None,
        metavar="I,J,...",
        help="SD3: skip-layer guidance over these transformer blocks (SD3.5 Medium: 7,8,9)",
    )
    p.add_argument(
        "--skip-layer-scale",
        type=float,
        default=None,
        metavar="S",
        help="SD3: skip-layer guidance scale (2.8)",
    )
    p.add_argument("--precision", choices=PRECISIONS, default="float32", help="compute precision")
    p.add_argument(  # execution.quantize
        "--quantize",
        choices=("int8",),
        default=None,
        help="store the UNet's and text encoders' linear weights in int8 (weight-only, per output channel)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run, option_names=OPTION_NAMES)
    return p


def check_arguments(args: argparse.Namespace) -> tuple[str, list[pathlib.Path], pathlib.Path | None]:
    """Every check that needs no model: options, the model argument, output files, then image headers.

    Returns:
        (model source, image paths, grid path or None).

    Raises:
        UsageError: a bad option value or combination.
        FileNotFoundError, FileExistsError: a missing input or an existing output (without --overwrite).
    """
    positive_int(args.steps, "--steps")
    positive_int(args.num_images, "--num-images")
    positive_int(args.max_image_pixels, "--max-image-pixels")
    finite_float(args.guidance, "--guidance")
    finite_float(args.strength, "--strength", 0.0, 1.0)
    positive_int(args.seed, "--seed", minimum=0)
    if args.mask is not None and args.image is None:
        raise UsageError("--mask needs --image (the picture to inpaint)")
    if args.strength is not None and args.image is None:
        raise UsageError("--strength applies to --image (img2img / inpainting) only")
    if args.mask_blur is not None:
        if args.mask is None:
            raise UsageError("--mask-blur applies to inpainting (--mask) only")
        if args.mask_blur != -1:
            finite_float(args.mask_blur, "--mask-blur", 0.0, 64.0)
    check_sdxl_arguments(args)
    family_option_values(args)
    check_sampler(args.scheduler)
    check_size(args.height, args.width, None)
    try:
        paths, grid_path = output_paths(pathlib.Path(args.output), args.num_images)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.overwrite:
        for path in paths + ([grid_path] if grid_path else []):
            if path.exists():
                raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    check_adapters(args)
    if args.vae is not None and not os.path.exists(args.vae):
        raise FileNotFoundError(f"--vae {args.vae}: no such file or folder")
    if args.guess_mode and not args.control:
        raise UsageError("--guess-mode applies to ControlNets (--control) only")
    for value in args.control:
        control_option(value)
    check_ip_adapter_arguments(args)
    source = check_model(args.model, "--model")
    args.refiner_source = None if args.refiner is None else check_model(args.refiner, "--refiner")
    factor, _ = model_factor(source)
    check_size(args.height, args.width, factor)
    for option, path in (("--image", args.image), ("--mask", args.image and args.mask)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{option} {path}: no such file")
    return source, paths, grid_path


def pair_option(value: str, option: str, minimum: int) -> tuple[int, int]:
    """``A,B`` -> (A, B), two integers >= ``minimum``."""
    what = "TOP,LEFT" if option == "--crop" else "W,H"
    allowed = "non-negative" if minimum == 0 else "positive"
    parts = value.split(",")
    try:
        numbers = [int(p.strip()) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 2 or any(n < minimum for n in numbers):
        raise UsageError(f"{option} {value}: must be {what}, two {allowed} integers")
    return numbers[0], numbers[1]


def sdxl_option_values(args: argparse.Namespace) -> dict:
    """The SDXL micro-conditioning options given, as ``SDXLOptions`` fields ((height, width) sizes)."""
    out = {}
    for option, field in SDXL_OPTIONS.items():
        value = getattr(args, field.replace("crops_coords_top_left", "crop"))
        if value is None:
            continue
        if field in _REFINER_ONLY:
            finite_float(value, option)
            out[field] = float(value)
        elif field == "crops_coords_top_left":
            out[field] = pair_option(value, option, 0)
        else:
            width, height = pair_option(value, option, 1)
            out[field] = (height, width)
    return out


def check_sdxl_arguments(args: argparse.Namespace) -> None:
    """--refiner / --denoising-end and the micro-conditioning options, before any model is read."""
    sdxl_option_values(args)
    if args.denoising_end is not None:
        if args.refiner is None:
            raise UsageError("--denoising-end applies with --refiner (where the refiner takes over) only")
        if not math.isfinite(args.denoising_end) or not 0.0 < args.denoising_end < 1.0:
            raise UsageError(
                f"--denoising-end {args.denoising_end:g}: must be a fraction strictly between 0 and 1"
            )


def sdxl_stage_options(values: dict, config) -> dict:
    """The micro-conditioning values that apply to one SDXL model: a refiner reads the aesthetic scores
    and no target size, a base model the reverse."""
    refiner = config.requires_aesthetics_score
    return {k: v for k, v in values.items() if k not in (_BASE_ONLY if refiner else _REFINER_ONLY)}


def check_sdxl_models(values: dict, args: argparse.Namespace, base, refiner) -> None:
    """Every SDXL option applies to the models given; --refiner is an SDXL model after an SDXL base."""
    options = {field: option for option, field in SDXL_OPTIONS.items()}
    if refiner is not None:
        if not base.config.is_sdxl or base.config.requires_aesthetics_score:
            kind = "an SDXL refiner" if base.config.is_sdxl else "not an SDXL model"
            raise UsageError(f"--refiner needs an SDXL base as --model; {args.model} is {kind}")
        if not refiner.config.is_sdxl:
            raise UsageError(f"--refiner {args.refiner}: not an SDXL model (its latents would not match)")
    models = [base] + ([] if refiner is None else [refiner])
    for field in values:
        if not base.config.is_sdxl:
            raise UsageError(f"{options[field]} applies to SDXL models only; --model {args.model} is not one")
        if not any(sdxl_stage_options({field: 1}, m.config) for m in models):
            if field in _REFINER_ONLY:
                raise UsageError(
                    f"{options[field]} applies to an SDXL refiner only (pass --refiner MODEL, or a refiner as --model)"
                )
            raise UsageError(
                f"{options[field]} does not apply to an SDXL refiner (its time ids hold the aesthetic score)"
            )


def family_option_values(args: argparse.Namespace) -> dict:
    """The family options given on the command line (SD3's), as ``generate()`` keyword arguments.

    Raises:
        UsageError: a bad value.
    """
    values = {}
    if args.max_sequence_length is not None:
        positive_int(args.max_sequence_length, "--max-sequence-length")
        if args.max_sequence_length > 512:
            raise UsageError(f"--max-sequence-length {args.max_sequence_length} must be in 1..512")
        values["max_sequence_length"] = args.max_sequence_length
    if args.skip_layers is not None:
        try:
            layers = [int(v) for v in args.skip_layers.split(",")]
        except ValueError:
            layers = []
        if not layers or any(v < 0 for v in layers):
            raise UsageError(f"--skip-layers {args.skip_layers!r} must be block indices such as 7,8,9")
        values["skip_guidance_layers"] = layers
    if args.skip_layer_scale is not None:
        finite_float(args.skip_layer_scale, "--skip-layer-scale")
        if args.skip_layers is None:
            raise UsageError("--skip-layer-scale applies to skip-layer guidance (--skip-layers) only")
        values["skip_layer_guidance_scale"] = args.skip_layer_scale
    return values


def lora_option(value: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); a path that itself holds ":" keeps it unless a number follows."""
    path, colon, weight = value.rpartition(":")
    if colon and path:
        try:
            number = float(weight)
        except ValueError:
            return value, 1.0
        finite_float(number, f"--lora {value}: weight")
        return path, number
    return value, 1.0


def control_option(value: str) -> tuple[str, str, float]:
    """``MODEL:IMAGE[:SCALE]`` -> (model, image, scale), both paths checked to exist.

    Paths may hold ":" themselves: the split is the one where both sides exist.
    """
    parts = value.split(":")
    scale = 1.0
    if len(parts) >= 3:
        try:
            scale = float(parts[-1])
        except ValueError:
            pass
        else:
            finite_float(scale, f"--control {value}: scale")
            parts = parts[:-1]
    if len(parts) < 2:
        raise UsageError(f"--control {value}: expected MODEL:IMAGE[:SCALE] (a ControlNet and its hint image)")
    for i in range(1, len(parts)):
        model, image = ":".join(parts[:i]), ":".join(parts[i:])
        if os.path.exists(model) and os.path.isfile(image):
            return model, image, scale
    model, image = parts[0], ":".join(parts[1:])
    missing = model if not os.path.exists(model) else image
    raise FileNotFoundError(f"--control {value}: {missing}: no such file")


def embedding_files(args: argparse.Namespace) -> list[str]:
    """The --embedding files, then those in --embedding-dir (sorted)."""
    from tf_diffusion.adapters.textual_inversion import EMBEDDING_SUFFIXES

    files = list(args.embedding)
    if args.embedding_dir is not None:
        folder = pathlib.Path(args.embedding_dir)
        files += [
            str(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES
        ]
    return files


def check_adapters(args: argparse.Namespace) -> None:
    """--lora / --lora-dir / --embedding / --embedding-dir and the prompt's <lora:...> tags, before TensorFlow."""
    from tf_diffusion.adapters import extra_networks

    for value in args.lora:
        path, _ = lora_option(value)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora {value}: no such file")
        if pathlib.Path(path).suffix.lower() not in extra_networks.LORA_SUFFIXES:
            raise UsageError(f"--lora {value}: allowed suffixes: {', '.join(extra_networks.LORA_SUFFIXES)}")
    for option, folder in (("--lora-dir", args.lora_dir), ("--embedding-dir", args.embedding_dir)):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{option} {folder}: no such folder")
    for path in args.embedding:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--embedding {path}: no such file")
    try:
        _, _, tags = extra_networks.strip_prompts([args.prompt], [args.negative_prompt or ""])
        extra_networks.resolve_tags(tags, args.lora_dir)
    except ValueError as e:
        raise UsageError(str(e).replace("(sd.lora_dir / --lora-dir)", "(pass --lora-dir)")) from None


def check_ip_adapter_arguments(args: argparse.Namespace) -> None:
    """--ip-adapter / --ip-image / --ip-scale / --ip-image-encoder, before TensorFlow."""
    adapters, images, scales = args.ip_adapter, args.ip_image, args.ip_scale
    if not adapters:
        for option, given in (
            ("--ip-image", images),
            ("--ip-scale", scales),
            ("--ip-image-encoder", args.ip_image_encoder),
        ):
            if given:
                raise UsageError(f"{option} needs --ip-adapter PATH (the IP-Adapter it is for)")
        return
    if not images:
        raise UsageError("--ip-adapter needs --ip-image IMG (the picture to prompt with)")
    if len(adapters) > 1 and len(images) != len(adapters):
        raise UsageError(f"{len(adapters)} --ip-adapter files need one --ip-image each; got {len(images)}")
    if len(scales) not in (0, 1, len(adapters)):
        raise UsageError(
            f"--ip-scale given {len(scales)} times; give it once, or once per --ip-adapter ({len(adapters)})"
        )
    for s in scales:
        finite_float(s, "--ip-scale")
    for option, path in [("--ip-adapter", a) for a in adapters] + [("--ip-image", i) for i in images]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{option} {path}: no such file")
    encoder = args.ip_image_encoder
    if encoder is None:
        encoder = os.path.join(os.path.dirname(os.path.abspath(adapters[0])), "image_encoder")
        if not os.path.isdir(encoder):
            raise FileNotFoundError(
                f"--ip-adapter {adapters[0]}: no image_encoder folder beside it; pass --ip-image-encoder FOLDER"
            )
    elif not os.path.isfile(os.path.join(encoder, "config.json")):
        raise FileNotFoundError(f"--ip-image-encoder {encoder}: no config.json (a transformers folder)")
    args.ip_encoder_folder = encoder


def ip_adapter_arguments(sd, args: argparse.Namespace, pictures: list) -> dict:
    """Load the --ip-adapter files into ``sd``; generate()'s IP-Adapter arguments."""
    if not args.ip_adapter:
        return {}
    sd.load_ip_adapter(args.ip_adapter, image_encoder=args.ip_encoder_folder)
    image = (pictures[0] if len(pictures) == 1 else pictures) if len(args.ip_adapter) == 1 else pictures
    scale = None
    if args.ip_scale:
        scale = args.ip_scale[0] if len(args.ip_scale) == 1 else list(args.ip_scale)
    return {"ip_adapter_image": image, "ip_adapter_scale": scale}


def apply_adapters(sd, args: argparse.Namespace) -> None:
    """Load the --lora files and embeddings into ``sd`` and set its LoRA folder."""
    for value in args.lora:
        path, weight = lora_option(value)
        sd.load_lora_weights(path, adapter_name=pathlib.Path(path).stem, weight=weight)
    for path in embedding_files(args):
        sd.load_textual_inversion(path)
    sd.lora_dir = args.lora_dir


def paste_back(refiner, latents, image, mask, blur: float, jit_compile):
    """Decode a refiner's inpainted latents and put the init image's pixels back outside the mask (the web
    UI's mask blur), as generate(mask_blur=...) does: uint8 images with ``Mask blur`` in their parameters."""
    import dataclasses

    from tf_diffusion import images as image_utils
    from tf_diffusion.pipeline import GeneratedImages

    decoded = refiner.decode(np.asarray(latents) / np.float32(refiner.config.vae.scaling_factor), jit_compile)
    original = image_utils.to_rgb(image, "--image") * 2.0 - 1.0
    binary = (image_utils.to_mask(mask, "--mask") >= 0.5).astype(np.float32)
    pasted = image_utils.paste_back(decoded, original, binary, blur)
    info = dataclasses.replace(latents.info, mask_blur=blur, output_type="uint8")
    return GeneratedImages.wrap(image_utils.to_uint8(pasted), info)


def read_image(path: str, option: str, max_pixels: int | None):
    """An input image, refused from its header when it has too many pixels (before decoding it)."""
    from tf_diffusion.images import open_image

    try:
        return open_image(path, f"{option} {path}", max_pixels)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise UsageError(str(e).replace("max_pixels=...", "--max-image-pixels")) from None


def run(args: argparse.Namespace) -> int:
    """Generate and save; returns the exit status."""
    source, paths, grid_path = check_arguments(args)
    image = read_image(args.image, "--image", args.max_image_pixels) if args.image else None
    mask = read_image(args.mask, "--mask", args.max_image_pixels) if args.mask else None
    if image is not None and mask is not None and image.size != mask.size:
        raise UsageError(
            f"--mask {args.mask} is {mask.size[0]}x{mask.size[1]} but --image {args.image} is "
            f"{image.size[0]}x{image.size[1]}; they must match"
        )
    units = [control_option(v) for v in args.control]
    hints = [read_image(i, "--control", args.max_image_pixels) for _, i, _ in units]
    ip_pictures = [read_image(i, "--ip-image", args.max_image_pixels) for i in args.ip_image]

    import_tensorflow()
    from tf_diffusion.pipeline import StableDiffusion, has_accelerator

    dtype = None if args.precision == "float32" else args.precision
    quantize = getattr(args, "quantize", None)
    # --no-t5 reaches only the SD3 loaders (None: the loader's default, so the UNet loader never sees it).
    load_t5 = False if args.no_t5 else None
    sd = StableDiffusion.from_pretrained(
        source, dtype=dtype, vae=args.vae, quantize=quantize, load_t5=load_t5, config=args.config
    )
    refiner = None
    if args.refiner_source is not None:
        refiner = StableDiffusion.from_pretrained(args.refiner_source, dtype=dtype, quantize=quantize)
    values = sdxl_option_values(args)
    check_sdxl_models(values, args, sd, refiner)
    apply_adapters(sd, args)
    control = ip_adapter_arguments(sd, args, ip_pictures)
    if args.control:
        from tf_diffusion.controlnet import ControlNet

        nets = [ControlNet.from_pretrained(m, dtype=dtype) for m, _, _ in units]
        single = len(units) == 1
        control.update(
            controlnet=nets[0] if single else nets,
            control_image=hints[0] if single else hints,
            controlnet_conditioning_scale=units[0][2] if single else [s for _, _, s in units],
            guess_mode=args.guess_mode,
        )
    mask_blur = None
    if mask is not None:
        mask_blur = 4.0 if args.mask_blur is None else (None if args.mask_blur == -1 else args.mask_blur)
    switch = (
        None if refiner is None else (DEFAULT_SWITCH if args.denoising_end is None else args.denoising_end)
    )
    # One call per process: on a CPU, XLA's extra compile time (seconds) outweighs what it saves
    # on one image, so the command stays in graph mode there; accelerators keep the XLA default.
    jit_compile = None if has_accelerator() else False

    try:
        images = sd.generate(
            args.prompt,
            args.negative_prompt or None,
            num_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            num_images=args.num_images,
            seed=args.seed,
            scheduler=args.scheduler,
            image=image,
            strength=args.strength,
            mask=mask,
            mask_blur=mask_blur if refiner is None else None,  # with a refiner: pasted back after it
            **control,
            sdxl_options=sdxl_stage_options(values, sd.config) if sd.config.is_sdxl else None,
            denoising_end=switch,
            output_type="uint8" if refiner is None else "latent",
            progress=not args.no_progress,
            jit_compile=jit_compile,
            **family_option_values(args),
        )
    except ValueError as e:
        raise _control_error(e, args) from None
    strength = None
    if refiner is not None:
        # The ensemble of experts: the refiner continues the base's latents from the switch on, with the
        # same steps, guidance, sampler and seeds.
        base = images.info
        strength = base.strength
        images = refiner.generate(
            args.prompt,
            args.negative_prompt or None,
            num_steps=base.num_steps,
            guidance_scale=base.guidance_scale,
            num_images=args.num_images,
            seed=base.seeds[0],
            scheduler=args.scheduler if args.scheduler is not None else base.sampler,
            image=images,
            mask=mask,
            denoising_start=switch,
            sdxl_options=sdxl_stage_options(values, refiner.config) or None,
            output_type="uint8" if mask_blur is None else "latent",
            progress=not args.no_progress,
            jit_compile=jit_compile,
        )
        if mask_blur is not None:
            images = paste_back(refiner, images, image, mask, mask_blur, jit_compile)
    from tf_diffusion.infotext import model_hash

    digest = model_hash(source) if os.path.isfile(source) else None
    refiner_digest = None
    if refiner is not None and os.path.isfile(args.refiner_source):
        refiner_digest = model_hash(args.refiner_source)
    for i, (path, picture) in enumerate(zip(paths, images, strict=True)):
        # From what generate() resolved: each image's seed, the sampler, steps, strength, size.
        try:
            text = a1111_parameters(
                images.info,
                i,
                args.model,
                digest,
                refiner=args.refiner,
                refiner_hash=refiner_digest,
                sdxl_options=values,
                strength=strength,
            )
        except ValueError as e:  # a sampler the web UI has no name for: the image without parameters
            print(f"warning: {path} is written without PNG parameters: {e}", file=sys.stderr)
            text = None
        save_png(picture, path, text, args.overwrite)
        print(path)
    if grid_path is not None:
        save_png(grid(images), grid_path, None, args.overwrite)
        print(grid_path)
    return 0


def _control_error(error: ValueError, args: argparse.Namespace) -> ValueError:
    """The library names hints control_image / control_image[k]; say which --control it was."""
    match = re.match(r"control_image(?:\[(\d+)\])? ", str(error))
    if match is None:
        return error
    value = args.control[int(match.group(1) or 0)]
    return ValueError(f"--control {value}: the hint image {str(error)[match.end() :]}")
