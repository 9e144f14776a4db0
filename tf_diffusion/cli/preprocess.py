"""``tf-diffusion preprocess``: make a ControlNet hint image from a picture.

    tf-diffusion preprocess canny photo.jpg edges.png
    tf-diffusion preprocess canny photo.jpg edges.png --low 50 --high 150

Needs OpenCV for Canny (``pip install "tf-diffusion[controlnet]"``). The output is a PNG, written
through a temporary file; an existing file is kept unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import pathlib

from tf_diffusion.cli._common import UsageError

KINDS = ("canny",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``preprocess`` on the tf-diffusion command's subparsers."""
    p = subparsers.add_parser("preprocess", help="make a ControlNet hint image (Canny edges)")
    p.add_argument("kind", choices=KINDS, help="the preprocessor")
    p.add_argument("input", help="the picture to read")
    p.add_argument("output", help="the hint image to write (.png)")
    p.add_argument("--low", type=int, default=100, help="Canny's low threshold in [0, 255] (default 100)")
    p.add_argument("--high", type=int, default=200, help="Canny's high threshold in [0, 255] (default 200)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)
    return p


def check(args: argparse.Namespace) -> tuple[pathlib.Path, pathlib.Path]:
    """Every check that needs no image decoding: thresholds, paths, the output name."""
    for name, value in (("--low", args.low), ("--high", args.high)):
        if not 0 <= value <= 255:
            raise UsageError(f"{name} {value} is outside [0, 255]")
    if args.low > args.high:
        raise UsageError(f"--low {args.low} must not exceed --high {args.high}")
    source, output = pathlib.Path(args.input), pathlib.Path(args.output)
    if not source.is_file():
        raise UsageError(f"{source}: no such image file")
    if output.suffix.lower() != ".png":
        raise UsageError(f"{output} must end in .png")
    if output.exists() and not args.overwrite:
        raise UsageError(f"{output} already exists; pass --overwrite to replace it")
    if output.resolve() == source.resolve():
        raise UsageError(f"{output} is the input file; write the hint elsewhere")
    return source, output


def run(args: argparse.Namespace) -> int:
    from tf_diffusion.cli.generate import save_png
    from tf_diffusion.images import open_image
    from tf_diffusion.preprocess import PREPROCESSORS

    source, output = check(args)
    image = open_image(source)
    hint = PREPROCESSORS[args.kind](image, low_threshold=args.low, high_threshold=args.high)
    save_png(hint, output, None, args.overwrite)
    print(f"wrote {output} ({hint.shape[1]}x{hint.shape[0]}, {args.kind})")
    return 0
