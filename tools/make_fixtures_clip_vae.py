"""Write the CLIP text encoder and VAE parity fixtures from the PyTorch references.

Builds tiny random transformers ``CLIPTextModel``s and diffusers
``AutoencoderKL``s with fixed seeds, randomises every norm affine and bias so a
wrong mapping cannot pass, and writes to ``tests/fixtures/{clip,vae}/*.npz``:

* ``config``: our config (CLIPTextConfig / VAEConfig) as JSON;
* ``param/<key>``: reference weights, torch layout, float32 (CLIP under the
  ``text_model.`` keys SD checkpoints use, VAE under diffusers keys);
* inputs and reference outputs, images and latents transposed to NHWC.

It also checks (here, not in the tests, which must not import torch) that
``convert_diffusers_vae`` is the exact inverse of diffusers' own
``convert_ldm_vae_checkpoint`` for each config and for the full SD VAE, and
that legacy attention names convert the same.

Usage: python tools/make_fixtures_clip_vae.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from diffusers import AutoencoderKL as TorchAutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from transformers import CLIPTextConfig as TorchCLIPTextConfig  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from tf_diffusion.config import CLIPTextConfig, VAEConfig  # noqa: E402
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae  # noqa: E402

OUT = ROOT / "tests" / "fixtures"
CLIP_CONFIGS = {
    "clip_quick_gelu": CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    ),
    "clip_gelu": CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        hidden_act="gelu",
    ),
}
# Narrow (8 channels, 4 groups) so that both files stay near 0.6 MB together; the
# 3-level one runs two resnets per encoder level (three per decoder level).
VAE_CONFIGS = {
    "vae_2level": VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4),
    "vae_3level": VAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2, norm_groups=4),
}
BOS, EOS = 998, 999


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Redraw norm affines and biases (references init them to ones / zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm = isinstance(_owner(module, name), (torch.nn.LayerNorm, torch.nn.GroupNorm))
            noise = torch.randn(p.shape, generator=gen)
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)


def _owner(module: torch.nn.Module, name: str) -> torch.nn.Module:
    return module.get_submodule(name.rsplit(".", 1)[0])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(_np(t).transpose(0, 2, 3, 1))


def _config_json(cfg) -> np.ndarray:
    return np.array(json.dumps(dataclasses.asdict(cfg)))


def make_clip(name: str, cfg: CLIPTextConfig, seed: int) -> None:
    torch.manual_seed(seed)
    ref_cfg = TorchCLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        attn_implementation="eager",
    )
    model = CLIPTextModel(ref_cfg).eval()
    _randomize(model, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        # transformers' init draws tiny embeddings and projections; larger ones make the
        # attention pattern (and so the causal mask) matter.
        for pname, p in model.named_parameters():
            if "embedding" in pname:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)

    # Two prompts of different lengths: BOS, tokens, EOS, then EOS padding (SD 1.x style).
    rng = np.random.default_rng(seed)
    ids = np.full((2, cfg.max_position_embeddings), EOS, dtype=np.int64)
    for row, n in enumerate((5, 20)):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = rng.integers(0, BOS, size=n)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
        # diffusers' clip_skip=k: hidden_states[-(k + 1)] through final_layer_norm.
        skip = {k: model.final_layer_norm(out.hidden_states[-(k + 1)]) for k in (1, 2)}

    arrays = {"config": _config_json(cfg), "input_ids": ids.astype(np.int32)}
    # transformers >= 5 drops the text_model. prefix; SD checkpoints and the hub keep it.
    for key, value in model.state_dict().items():
        arrays[f"param/text_model.{key}"] = _np(value)
    # Older checkpoints carry the position_ids buffer, which the model must ignore.
    arrays["param/text_model.embeddings.position_ids"] = np.arange(cfg.max_position_embeddings)[None]
    arrays["last_hidden_state"] = _np(out.last_hidden_state)
    for k, value in skip.items():
        arrays[f"clip_skip_{k}"] = _np(value)
    _save(OUT / "clip" / f"{name}.npz", arrays)


def _torch_vae(cfg: VAEConfig) -> TorchAutoencoderKL:
    n = len(cfg.channel_mult)
    return TorchAutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
    ).eval()


def check_vae_rename(cfg: VAEConfig, model: TorchAutoencoderKL) -> None:
    """Ours (diffusers -> original) then diffusers' (original -> diffusers) must be the identity."""
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ours = convert_diffusers_vae({k: v.numpy() for k, v in reference.items()}, cfg)
    back = convert_ldm_vae_checkpoint(
        {k: torch.from_numpy(np.asarray(v)) for k, v in ours.items()}, model.config
    )
    if set(back) != set(reference):
        raise SystemExit(f"rename mismatch: {sorted(set(back) ^ set(reference))[:10]}")
    for key, value in reference.items():
        if back[key].shape != value.shape or not torch.equal(back[key], value):
            raise SystemExit(f"rename changed {key}: {tuple(back[key].shape)} vs {tuple(value.shape)}")
    legacy_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, value in reference.items():
        for new, old in legacy_names.items():
            key = key.replace(new, old)
        legacy[key] = value.numpy()
    legacy_converted = convert_diffusers_vae(legacy, cfg)
    if set(legacy_converted) != set(ours) or any(
        not np.array_equal(np.asarray(legacy_converted[k]), np.asarray(ours[k])) for k in ours
    ):
        raise SystemExit("legacy attention names convert differently")


def make_vae(name: str, cfg: VAEConfig, seed: int) -> None:
    torch.manual_seed(seed)
    model = _torch_vae(cfg)
    _randomize(model, seed + 1)
    check_vae_rename(cfg, model)

    rng = np.random.default_rng(seed)
    image = rng.uniform(-1.0, 1.0, size=(2, cfg.in_channels, 32, 32)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(image)).latent_dist
        decoded = model.decode(dist.mode()).sample
        # The posterior's clamp, on moments wide enough to hit both bounds.
        moments = torch.from_numpy(
            rng.uniform(-50, 50, size=(1, 2 * cfg.latent_channels, 2, 2)).astype(np.float32)
        )
        wide = DiagonalGaussianDistribution(moments)

    arrays = {"config": _config_json(cfg)}
    for key, value in model.state_dict().items():
        arrays[f"param/{key}"] = _np(value)
    arrays.update(
        image=_nhwc(torch.from_numpy(image)),
        mean=_nhwc(dist.mean),
        logvar=_nhwc(dist.logvar),
        decoded=_nhwc(decoded),
        wide_moments=_nhwc(moments),
        wide_mean=_nhwc(wide.mean),
        wide_logvar=_nhwc(wide.logvar),
        wide_std=_nhwc(wide.std),
    )
    _save(OUT / "vae" / f"{name}.npz", arrays)


def _save(path: pathlib.Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    for seed, (name, cfg) in enumerate(CLIP_CONFIGS.items()):
        make_clip(name, cfg, seed=100 + 10 * seed)
    for seed, (name, cfg) in enumerate(VAE_CONFIGS.items()):
        make_vae(name, cfg, seed=200 + 10 * seed)
    # The full SD VAE: only the rename round trip, nothing written.
    torch.manual_seed(0)
    check_vae_rename(VAEConfig(), _torch_vae(VAEConfig()))
    print("diffusers VAE rename round-trips exactly (tiny configs and the SD VAE)")


if __name__ == "__main__":
    main()
