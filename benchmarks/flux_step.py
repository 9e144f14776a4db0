"""One Flux.1 [schnell] transformer step: our int8 and bfloat16 weights against diffusers in bfloat16.

The released transformer (19 double + 38 single blocks, 12B parameters: 24 GB in bfloat16) does not
fit a 24 GiB machine, so ``--depth`` / ``--single-depth`` truncate it: the blocks keep the released
width (3072, 24 heads of 128), only fewer of them. The weights are diffusers' random initialisation
(``torch.manual_seed(0)``), saved once in bfloat16 as a diffusers ``transformer/`` folder that every
case loads, so all cases compute with the same weights. Each case runs in a fresh process (run the
script under ``nice``):

- ``diffusers-bf16``: ``FluxTransformer2DModel`` in bfloat16 under ``torch.inference_mode``;
- ``ours-bf16``: ``load_flux_transformer(folder, dtype="bfloat16")``, called in a TensorFlow graph
  (``tf.function``);
- ``ours-int8``: the same with ``quantize="int8"`` (int8 Linear weights, bfloat16 compute).

Each reports ``weights_gib`` (the bytes of the model's parameters), ``rss_gib`` after loading,
``peak_rss_gib`` (VmHWM, the process peak, after the calls), ``first_call_s`` (tracing included),
``step_s`` (the best of ``--repeats`` later calls), and ``rel_error``: ||out - diffusers|| / ||diffusers||
on the same inputs (packed latents of a ``--size`` image, ``--tokens`` T5 tokens, batch 1).

Usage:
    nice -n 10 python benchmarks/flux_step.py --depth 2 --single-depth 4 --size 512   # JSON to results/
    python benchmarks/flux_step.py case ours-int8 FOLDER INPUTS.npz OUT.npy            # one case
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks._harness import measure, rel_errors, run_cases, write_report  # noqa: E402

CASES = ("diffusers-bf16", "ours-bf16", "ours-int8")


def _write_model(folder: pathlib.Path, depth: int, single_depth: int) -> None:
    """diffusers' random [schnell]-shaped transformer, truncated, saved in bfloat16."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=depth, num_single_layers=single_depth,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    ).to(torch.bfloat16)  # fmt: skip
    model.save_pretrained(folder, safe_serialization=True)


def _write_inputs(path: pathlib.Path, size: int, tokens: int) -> None:
    import numpy as np

    from tf_diffusion.flux import latent_image_ids, text_ids

    rng = np.random.default_rng(0)
    grid = size // 16  # VAE factor 8, then 2x2 patches
    np.savez(
        path,
        img=rng.standard_normal((1, grid * grid, 64)).astype(np.float32),
        img_ids=latent_image_ids(grid, grid),
        txt=rng.standard_normal((1, tokens, 4096)).astype(np.float32),
        txt_ids=text_ids(tokens),
        timesteps=np.array([1.0], np.float32),
        y=rng.standard_normal((1, 768)).astype(np.float32),
    )


def _case(name: str, folder: str, inputs: str, out: str, repeats: int) -> dict:
    import numpy as np

    x = dict(np.load(inputs))
    if name == "diffusers-bf16":
        import torch
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        t = {k: torch.from_numpy(v) for k, v in x.items()}
        args = dict(
            hidden_states=t["img"].bfloat16(), encoder_hidden_states=t["txt"].bfloat16(),
            pooled_projections=t["y"].bfloat16(), timestep=t["timesteps"].bfloat16(),
            img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=None, return_dict=False,
        )  # fmt: skip

        def call():
            with torch.inference_mode():
                return model(**args)[0].float().numpy()
    else:
        import tensorflow as tf

        from tf_diffusion.weights.flux import load_flux_transformer

        quantize = "int8" if name == "ours-int8" else None
        model = load_flux_transformer(folder, dtype="bfloat16", quantize=quantize)
        weights = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.variables)
        args = {k: tf.constant(v) for k, v in x.items()}
        step = tf.function(lambda a: model(**a, guidance=None), autograph=False)

        def call():
            return np.asarray(tf.cast(step(args), tf.float32))

    result, timing = measure(call, repeats)
    np.save(out, result)
    return dict(case=name, weights_gib=round(weights / 2**30, 3), **timing)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "case":
        _, name, folder, inputs, out, *rest = argv
        print(json.dumps(_case(name, folder, inputs, out, int(rest[0]) if rest else 1)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2, help="double blocks (released: 19)")
    parser.add_argument("--single-depth", type=int, default=4, help="single blocks (released: 38)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--tokens", type=int, default=256, help="T5 tokens ([schnell] uses up to 256)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flux_step.json"))
    args = parser.parse_args(argv)
    if args.size % 16 or args.size <= 0:
        raise SystemExit(f"--size={args.size} is not allowed: it must be a positive multiple of 16")
    if args.depth < 0 or args.single_depth < 0:
        raise SystemExit("--depth and --single-depth must be non-negative")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        _write_model(tmp / "transformer", args.depth, args.single_depth)
        _write_inputs(tmp / "inputs.npz", args.size, args.tokens)
        folder, inputs = tmp / "transformer", tmp / "inputs.npz"
        results, outputs = run_cases(
            __file__, args.cases, tmp, lambda name, out: [folder, inputs, out, args.repeats]
        )
    rel_errors(results, outputs, "diffusers-bf16")
    report = dict(
        depth=args.depth, single_depth=args.single_depth, size=args.size, tokens=args.tokens, results=results
    )
    write_report(args.out, report)


if __name__ == "__main__":
    main()
