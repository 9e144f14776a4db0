"""The tiny-shapes model card, written from the training logs, the VAE statistics and the final evaluation."""

from __future__ import annotations

import json
import os

import numpy as np


def _log_summary(path: str) -> dict:
    """Steps, wall time and the mean of the last 100 logged losses of one stage's JSON-lines log."""
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if not rows:
        return {}
    tail = rows[-10:]
    out = {"steps": rows[-1]["step"], "minutes": (rows[-1]["time"] - rows[0]["time"]) / 60}
    for key in ("loss", "rec"):
        if key in tail[-1]:
            out[key] = float(np.mean([r[key] for r in tail]))
    return out


def _schedule_line(cfg) -> str:
    line = f"- Schedule: {cfg.beta_schedule} betas ({cfg.beta_start} to {cfg.beta_end}, {cfg.num_train_timesteps} steps)"
    if cfg.rescale_betas_zero_snr:
        line += " rescaled to zero terminal SNR"
    return f"{line}, {cfg.prediction_type} prediction, {cfg.timestep_spacing or 'default'} timestep spacing."


def write_model_card(args, sd, result: dict, log=print) -> str:
    """weights/tiny-shapes/MODEL_CARD.md from the logs, the VAE stats and the final evaluation.

    Args:
        args: the training script's options (ckpt_dir, out, overwrite, and the batch sizes and rates
            the card quotes).
        sd: the exported pipeline (its config and parameter counts go into the card).
        result: the final evaluation (``train.evaluate``).
        log: where to report the path written.

    Returns:
        The path written: ``--out``/MODEL_CARD.md, or ``--ckpt-dir``/MODEL_CARD.md when one exists in
        ``--out`` already and ``--overwrite`` was not given.
    """
    from tf_diffusion.weights.state_dict import count_parameters

    with open(os.path.join(args.ckpt_dir, "vae_stats.json")) as f:
        vae = json.load(f)
    stages = {
        name: _log_summary(os.path.join(args.ckpt_dir, f"{name}_log.jsonl"))
        for name in ("vae", "vae_decoder", "unet")
    }
    score = result["score"]
    params = {n: count_parameters(getattr(sd, n)) for n in ("text_encoder", "unet", "vae")}
    size_mb = sum(os.path.getsize(os.path.join(args.out, f"{n}.safetensors")) for n in params) / 1e6

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def stage(name):
        st = stages[name]
        if not st:
            return "not run"
        losses = ", ".join(f"{k} {st[k]:.4f}" for k in ("loss", "rec") if k in st)
        return f"{st['steps']} steps, {st['minutes']:.0f} min logged, final {losses}"

    counts = score.get("counts", {})
    lines = [
        "# tiny-shapes",
        "",
        "A small text-to-image model trained from scratch on procedurally drawn shapes, so that",
        "tf_diffusion has a default model that works offline. It draws one coloured shape (circle,",
        "square, triangle, star, heart, cross) in ten colours, three sizes and nine positions, on five",
        "backgrounds, at 64x64. It knows nothing else.",
        "",
        "## Architecture (preset `tiny-shapes`)",
        "",
        f"- Text encoder: CLIP, 3 layers, width 128, 4 heads, full CLIP vocabulary ({params['text_encoder']:,} parameters).",
        f"- UNet: model_channels 64, channel_mult (1, 2, 2), 1 res block per level, attention at the two lower levels, 4 heads ({params['unet']:,} parameters).",
        f"- VAE: factor 4 (64x64x3 <-> 16x16x4), base 32 channels, channel_mult (1, 2, 2) ({params['vae']:,} parameters); scaling_factor {sd.config.vae.scaling_factor} (1 / latent std).",
        _schedule_line(sd.config.scheduler),
        f"- Weights: float16, {size_mb:.1f} MB in total; EMA weights of the last checkpoint.",
        "",
        "## Data",
        "",
        "`examples/tiny_shapes/dataset.py`, train split, drawn on the fly (every batch is new). Captions come from six",
        "templates and name colour and shape unless `--mention` left them out of a share (see the commands",
        "that trained it); size, position and background only sometimes. Six",
        "(shape, colour) and four (shape, position) combinations are held out of training entirely.",
        "",
        "## Training (examples/tiny_shapes/train.py, on 2 shared CPU cores)",
        "",
        f"- VAE: {stage('vae')}; batch {args.vae_batch}, AdamW, L1 then L1+L2 reconstruction + KL (1e-5), EMA.",
        f"- VAE decoder fine-tune (encoder frozen): {stage('vae_decoder')}.",
        f"- Text encoder + UNet: {stage('unet')}; batch {args.unet_batch}, AdamW lr {args.unet_lr}, caption dropout 0.1, EMA {args.ema_decay}.",
        f"- VAE reconstruction on held-out-split images: mean abs error {vae['mae_uint8']:.2f} / 255, PSNR {vae['psnr_db']:.1f} dB.",
        "",
        "## Measured quality",
        "",
        f"{result['prompts']} prompts asking for held-out combinations (`shapes.heldout_prompts`), one image each,",
        f"sampler {result['sampler']}, {result['steps']} steps, guidance {result['guidance']}, scored by the independent",
        "pixel checker `examples/tiny_shapes/checker.py` (each attribute over the prompts that name it):",
        "",
        "| attribute | accuracy | prompts |",
        "| --- | --- | --- |",
    ]
    reworded = result.get("phrasing_score")
    if reworded is not None:  # the same attributes in held-out wordings (tiny_shapes.phrasing)
        lines[-2:] = [
            "| attribute | template wording | held-out wording | prompts |",
            "| --- | --- | --- | --- |",
        ]
    for key in ("color", "shape", "position", "size", "background"):
        other = "" if reworded is None else f" {pct(reworded.get(key))} |"
        lines.append(f"| {key} | {pct(score.get(key))} |{other} {counts.get(key, '')} |")
    other = "" if reworded is None else f" {pct(reworded.get('all'))} |"
    lines += [
        f"| all named attributes | {pct(score.get('all'))} |{other} {result['prompts']} |",
        "",
        f"Time per image (one prompt, guidance on, after warm-up, 2-core CPU): {result['seconds_per_image_median']:.2f} s (median of 5).",
        "",
        "## Limitations",
        "",
        "Only this toy domain; 64x64 only; combinations and wordings outside the templates are hit and miss.",
        "The checker reads one shape per image; samples are scored as generated, not cherry-picked.",
        "",
    ]
    path = os.path.join(args.out, "MODEL_CARD.md")
    if os.path.exists(path) and not args.overwrite:
        path = os.path.join(args.ckpt_dir, "MODEL_CARD.md")  # never replace a (hand-edited) card
    with open(path, "w") as f:
        f.write("\n".join(lines))
    log(f"wrote {path}")
    return path
