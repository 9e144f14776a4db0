"""One guided SD3.5 Medium transformer step: ours in bfloat16 against diffusers in bfloat16.

"Guided" is batch 2 (the prompt and the negative prompt, as classifier-free guidance runs them); the
context is 333 tokens (77 CLIP + 256 T5, diffusers' default ``max_sequence_length``); at 1024 pixels
the latents are 128x128, 4096 patches. The weights are diffusers' random initialisation
(``torch.manual_seed(0)``) of SD3.5 Medium's config (24 joint blocks, 13 with a second attention, RMS
q/k norm), saved once in bfloat16 as a diffusers ``transformer/`` folder that both cases load.
``--depth`` truncates the blocks for a quick run. Each case runs in a fresh process (run under ``nice``):

- ``diffusers-bf16``: ``SD3Transformer2DModel`` in bfloat16 under ``torch.inference_mode`` (SDPA);
- ``ours-bf16``: ``MMDiT`` built with the "bfloat16" policy, the folder's weights loaded through
  ``convert_diffusers_mmdit``, called in a TensorFlow graph (``tf.function``).

Each reports ``weights_gib``, ``rss_gib`` after loading, ``peak_rss_gib`` (VmHWM), ``first_call_s``
(tracing included), ``step_s`` (the best of ``--repeats`` later calls) and ``rel_error`` against diffusers.

Usage:
    nice -n 10 python benchmarks/sd3_step.py --size 1024                # JSON to results/sd3_step.json
    python benchmarks/sd3_step.py case ours-bf16 FOLDER INPUTS.npz OUT.npy   # one case
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

CASES = ("diffusers-bf16", "ours-bf16")
RELEASED_DEPTH = 24


def _write_model(folder: pathlib.Path, depth: int) -> None:
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(min(13, depth))), qk_norm="rms_norm",
    ).to(torch.bfloat16)  # fmt: skip
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="20GB")


def _write_inputs(path: pathlib.Path, size: int, tokens: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    side = size // 8
    np.savez(
        path,
        latents=rng.standard_normal((2, 16, side, side)).astype(np.float32),  # NCHW, as diffusers takes
        context=rng.standard_normal((2, tokens, 4096)).astype(np.float32),
        pooled=rng.standard_normal((2, 2048)).astype(np.float32),
        timesteps=np.array([750.0, 750.0], np.float32),
    )


def _case(name: str, folder: str, inputs: str, out: str, repeats: int) -> dict:
    import numpy as np

    x = dict(np.load(inputs))
    if name == "diffusers-bf16":
        import torch
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        t = {k: torch.from_numpy(v).bfloat16() for k, v in x.items()}
        args = dict(
            hidden_states=t["latents"], encoder_hidden_states=t["context"], pooled_projections=t["pooled"],
            timestep=t["timesteps"], return_dict=False,
        )  # fmt: skip

        def call():
            with torch.inference_mode():
                return model(**args)[0].float().numpy()
    else:
        import tensorflow as tf

        from tf_diffusion.mmdit import MMDiT
        from tf_diffusion.weights.diffusers_folder import _open_weights, read_json
        from tf_diffusion.weights.diffusers_mmdit import convert_diffusers_mmdit, mmdit_config_from_diffusers
        from tf_diffusion.weights.state_dict import load_state_dict

        folder = pathlib.Path(folder)
        config = mmdit_config_from_diffusers(read_json(folder / "config.json"))
        model = MMDiT(config, dtype="bfloat16")
        handles: list = []
        try:
            tensors, _ = _open_weights(folder, "diffusion_pytorch_model.safetensors", handles)
            load_state_dict(model, convert_diffusers_mmdit(tensors, config))
        finally:
            for handle in handles:
                handle.close()
        weights = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.variables)
        args = (
            tf.constant(x["latents"].transpose(0, 2, 3, 1)),  # NHWC
            tf.constant(x["timesteps"]),
            tf.constant(x["context"]),
            tf.constant(x["pooled"]),
        )
        step = tf.function(lambda *a: model(*a), autograph=False)

        def call():
            return np.asarray(tf.cast(step(*args), tf.float32)).transpose(0, 3, 1, 2)

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
    parser.add_argument("--depth", type=int, default=RELEASED_DEPTH, help="joint blocks (released: 24)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--tokens", type=int, default=333, help="context tokens (77 CLIP + 256 T5)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sd3_step.json"))
    args = parser.parse_args(argv)
    if args.size % 16 or not 0 < args.size <= 3072:
        raise SystemExit(
            f"--size={args.size} is not allowed: a multiple of 16 up to 3072 (the position table)"
        )
    if not 1 <= args.depth <= RELEASED_DEPTH:
        raise SystemExit(f"--depth={args.depth} is not allowed: 1 to {RELEASED_DEPTH}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        folder, inputs = tmp / "transformer", tmp / "inputs.npz"
        _write_model(folder, args.depth)
        _write_inputs(inputs, args.size, args.tokens)
        results, outputs = run_cases(
            __file__, args.cases, tmp, lambda name, out: [folder, inputs, out, args.repeats]
        )
    rel_errors(results, outputs, "diffusers-bf16")
    write_report(args.out, dict(depth=args.depth, size=args.size, tokens=args.tokens, results=results))


if __name__ == "__main__":
    main()
