"""Inpainting: repaint the white part of a mask, keep the rest of the picture.

python examples/inpainting.py input.png mask.png "a yellow heart" -o inpainted.png
"""

import argparse

from PIL import Image

from tf_diffusion import StableDiffusion, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("mask")
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default="inpainting.png")
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sd = StableDiffusion.from_pretrained(resolve_model(args.model))
    images = sd.generate(
        args.prompt, image=Image.open(args.image), mask=Image.open(args.mask), seed=args.seed
    )
    sd.to_pil(images)[0].save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
