"""Text to image with the embedded tiny-shapes model (offline), or any checkpoint via --model.

python examples/text2image.py "a red circle in the top left" -o red_circle.png
"""

import argparse

from tf_diffusion import StableDiffusion, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default="text2image.png")
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sd = StableDiffusion.from_pretrained(resolve_model(args.model))
    images = sd.generate(args.prompt, seed=args.seed)  # the model's default steps, guidance and sampler
    sd.to_pil(images)[0].save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
