"""Peak memory of the whole SD3.5 Medium pipeline in bfloat16, with and without T5-XXL, on this CPU.

Random weights of the full-size architecture (``StableDiffusion3.from_preset("sd3.5-medium")``, every
variable created in bfloat16), one guided flow-Euler step at ``--size`` with the prompt encoding and the
VAE decode included (graph mode, as the CLI runs on a CPU). Each case runs in a fresh process, so its peak
resident memory (VmHWM) is its own:

    with-t5     CLIP-L, CLIP-G, T5-XXL (4.76B parameters, 9.5 GB), the transformer and the VAE;
    without-t5  the same without T5 (its tokens are zeros, as diffusers runs with ``text_encoder_3=None``).

The T5 tokenizer is the test fixture's SentencePiece model (any model gives ids inside T5's vocabulary;
the ids do not change the cost). Reported: the weights' own bytes, the peak, their ratio, and times.

    nice -n 10 python benchmarks/sd3_pipeline.py              # both cases -> results/sd3_pipeline_cpu.json
    python benchmarks/sd3_pipeline.py case without-t5 512 1    # one case
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks._harness import measure, run_case, write_report  # noqa: E402

CASES = ("without-t5", "with-t5")
SPIECE = ROOT / "tests" / "fixtures" / "sd3" / "sd3-diffusers" / "tokenizer_3" / "spiece.model"
PROMPT = "a photograph of an astronaut riding a horse"


def _case(name: str, size: int, repeats: int) -> dict:
    import keras
    import numpy as np

    from tf_diffusion.presets import get_sd3_preset
    from tf_diffusion.sd3 import StableDiffusion3
    from tf_diffusion.t5 import T5Tokenizer

    keras.utils.set_random_seed(0)
    config = get_sd3_preset("sd3.5-medium")
    if name == "without-t5":
        config = config.replace(text_encoder_3=None)
    start = time.perf_counter()
    tokenizer_3 = T5Tokenizer(SPIECE, max_length=config.max_sequence_length) if name == "with-t5" else None
    sd = StableDiffusion3(config, dtype="bfloat16", tokenizer_3=tokenizer_3)
    build = time.perf_counter() - start
    models = [sd.text_encoder, sd.text_encoder_2, sd.transformer, sd.vae]
    if sd.text_encoder_3 is not None:
        models.append(sd.text_encoder_3)
    weights = sum(
        math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for model in models
        for v in model.weights
    )
    kw = dict(num_steps=1, height=size, width=size, seed=0, guidance_scale=4.5, progress=False)

    def call():
        return sd.generate(PROMPT, negative_prompt="blurry", **kw)

    _, timing = measure(call, repeats)
    peak = timing["peak_rss_gib"]
    return dict(
        case=name, build_s=round(build, 1), weights_gib=round(weights / 2**30, 2),
        peak_over_weights=round(peak / (weights / 2**30), 2), loadavg_1min=round(os.getloadavg()[0], 2),
        **timing,
    )  # fmt: skip


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "case":
        _, name, size, repeats = argv
        print(json.dumps(_case(name, int(size), int(repeats))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls after the first")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sd3_pipeline_cpu.json"))
    args = parser.parse_args(argv)
    if args.size % 16 or not 0 < args.size <= 3072:
        raise SystemExit(f"--size={args.size} is not allowed: a multiple of 16 up to 3072")
    results = []
    for name in args.cases:
        results.append(run_case(__file__, name, [args.size, args.repeats]))
        print(json.dumps(results[-1]), flush=True)
    write_report(args.out, dict(size=args.size, results=results))


if __name__ == "__main__":
    main()
