"""Image to image: redraw a picture guided by a prompt, keeping its layout.

python examples/img2img.py input.png "a blue star, centered" -o blue_star.png --strength 0.7
"""

import argparse

from PIL import Image

from tf_diffusion import StableDiffusion, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default="img2img.png")
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sd = StableDiffusion.from_pretrained(resolve_model(args.model))
    init = Image.open(args.image)  # RGBA, grayscale and 16-bit images are converted
    images = sd.generate(args.prompt, image=init, strength=args.strength, seed=args.seed)
    sd.to_pil(images)[0].save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
