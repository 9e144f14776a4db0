"""Time one 64x64 image from the embedded tiny-shapes model at its default settings, after warm-up.

Goal (issue 5): at most 2 s per image on the 2-core CPU. Prints JSON; nothing is asserted.

    python benchmarks/tiny_generate.py [--runs 5]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from tf_diffusion import StableDiffusion
    from tf_diffusion.models import resolve_model

    start = time.perf_counter()
    sd = StableDiffusion.from_pretrained(resolve_model("tiny-shapes"))
    load_s = time.perf_counter() - start
    prompt = "a red circle in the center on a white background"
    start = time.perf_counter()
    sd.generate(prompt, seed=0, progress=False)  # warm-up: traces and compiles
    warmup_s = time.perf_counter() - start
    times = []
    for seed in range(1, args.runs + 1):
        start = time.perf_counter()
        sd.generate(prompt, seed=seed, progress=False)
        times.append(time.perf_counter() - start)
    cfg = sd.config
    print(
        json.dumps(
            {
                "model": "tiny-shapes",
                "settings": {
                    "steps": cfg.default_steps,
                    "guidance": cfg.default_guidance,
                    "sampler": cfg.default_sampler,
                },
                "load_s": round(load_s, 3),
                "first_call_s": round(warmup_s, 3),
                "median_s_per_image": round(statistics.median(times), 3),
                "runs_s": [round(t, 3) for t in times],
                "goal_s": 2.0,
                "cpu_count": os.cpu_count(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
