"""``tf-diffusion generate``: images from a prompt, offline with the embedded tiny-shapes model by default.

    tf-diffusion generate "a red circle" -o out.png
    tf-diffusion generate "a blue star" --num-images 4 -o stars.png   # stars-1.png ... stars-4.png + stars-grid.png
    tf-diffusion generate "a green square" --image in.png --strength 0.6 -o out.png
    tf-diffusion generate "a yellow heart" --image in.png --mask mask.png -o out.png

PNGs carry the generation parameters in a ``parameters`` text chunk, written as
AUTOMATIC1111 writes them, so other tools read them back.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sysconfig
import tempfile

import numpy as np

from tf_diffusion.fileio import publish

DEFAULT_MODEL = "tiny-shapes"
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

# Our sampler names -> the names AUTOMATIC1111 writes in its parameters text.
A1111_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
}


def shipped_weights_dirs() -> list[pathlib.Path]:
    """Where embedded models may live, in the order they are searched.

    ``$TF_DIFFUSION_WEIGHTS`` alone when set; otherwise the repository's ``weights/`` (a source checkout
    or an editable install), then ``share/tf_diffusion/weights`` under the installation's data directory,
    where a wheel puts them (setup.cfg's ``data_files``), then the same under the user base (``--user``).
    """
    env = os.environ.get("TF_DIFFUSION_WEIGHTS")
    if env:
        return [pathlib.Path(env)]
    dirs = [pathlib.Path(__file__).resolve().parents[1] / "weights"]
    for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")):
        dirs.append(pathlib.Path(sysconfig.get_path("data", scheme)) / "share" / "tf_diffusion" / "weights")
    return dirs


def resolve_model(name: str) -> str:
    """A model argument as a path or hub id: shipped preset names map to their folder of shipped weights."""
    dirs = shipped_weights_dirs()
    for base in dirs:
        if (base / name).is_dir():
            return str(base / name)
    from tf_diffusion.presets import PRESETS

    if name in PRESETS:
        looked = ", ".join(str(d / name) for d in dirs)
        raise ValueError(
            f"preset {name!r} has no shipped weights (looked in {looked}); pass a checkpoint file, a folder "
            f"or a hub id with --model"
        )
    return name


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    strength: float | None = None,
    batch: tuple[int, int] | None = None,
) -> str:
    """The generation parameters as AUTOMATIC1111 writes them into a PNG's ``parameters`` chunk."""
    fields = [
        f"Steps: {steps}",
        f"Sampler: {A1111_SAMPLERS.get(sampler, sampler)}",
        f"CFG scale: {guidance:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
        f"Model: {model}",
    ]
    if strength is not None:
        fields.append(f"Denoising strength: {strength:g}")
    if batch is not None and batch[0] > 1:
        fields.extend([f"Batch size: {batch[0]}", f"Batch pos: {batch[1]}"])
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


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
    p.add_argument("--precision", choices=PRECISIONS, default="float32", help="compute precision")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def _open_image(path: str, what: str):
    from PIL import Image

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with Image.open(path) as image:
        image.load()
        return image.copy()


def run(args: argparse.Namespace) -> int:
    """Generate and save; returns the exit status."""
    from tf_diffusion.noise import NoiseSource
    from tf_diffusion.pipeline import StableDiffusion, has_accelerator

    output = pathlib.Path(args.output)
    paths, grid_path = output_paths(output, args.num_images if args.num_images > 0 else 1)
    if not args.overwrite:
        for path in paths + ([grid_path] if grid_path else []):
            if path.exists():
                raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if args.mask is not None and args.image is None:
        raise ValueError("--mask needs --image (the picture to inpaint)")

    source = resolve_model(args.model)
    dtype = None if args.precision == "float32" else args.precision
    sd = StableDiffusion.from_pretrained(source, dtype=dtype)
    steps = args.steps if args.steps is not None else sd.config.default_steps
    guidance = args.guidance if args.guidance is not None else sd.config.default_guidance
    scheduler = args.scheduler or sd.config.default_sampler
    seed = args.seed if args.seed is not None else NoiseSource().seed
    image = _open_image(args.image, "--image") if args.image else None
    mask = _open_image(args.mask, "--mask") if args.mask else None

    images = sd.generate(
        args.prompt,
        args.negative_prompt or None,
        num_steps=steps,
        guidance_scale=guidance,
        height=args.height,
        width=args.width,
        num_images=args.num_images,
        seed=seed,
        scheduler=scheduler,
        image=image,
        strength=args.strength,
        mask=mask,
        progress=not args.no_progress,
        # One call per process: on a CPU, XLA's extra compile time (seconds) outweighs what it saves
        # on one image, so the command stays in graph mode there; accelerators keep the XLA default.
        jit_compile=None if has_accelerator() else False,
    )
    height, width = images.shape[1:3]
    strength = None
    if image is not None:
        strength = args.strength if args.strength is not None else (1.0 if mask is not None else 0.8)
    for i, (path, picture) in enumerate(zip(paths, images, strict=True)):
        text = a1111_parameters(
            args.prompt,
            args.negative_prompt,
            steps=steps,
            sampler=scheduler,
            guidance=guidance,
            seed=seed,
            width=width,
            height=height,
            model=args.model,
            strength=strength,
            batch=(len(images), i),
        )
        save_png(picture, path, text, args.overwrite)
        print(path)
    if grid_path is not None:
        save_png(grid(images), grid_path, None, args.overwrite)
        print(grid_path)
    return 0
