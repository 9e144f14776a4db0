"""Write tests/fixtures/flux_lora/: a tiny Flux transformer, one random LoRA in two formats, diffusers' outputs.

The transformer is a tiny diffusers ``FluxTransformer2DModel`` (one double- and one single-stream block,
guidance-distilled). peft attaches a rank-4 LoRA (alpha 8, random A and B) to every Linear layer diffusers'
Flux LoRAs target: the split attention projections (``to_q`` ... ``add_v_proj``), the output
projections, ``proj_mlp`` / ``proj_out``, the feed-forwards, the adaLN ``norm*.linear`` layers, the
embedders and ``norm_out.linear``. The same factors are written

- ``lora_diffusers.safetensors``: by ``FluxPipeline.save_lora_weights`` (``transformer.`` keys, with the
  adapter metadata);
- ``lora_kohya.safetensors``: as sd-scripts' ``networks/lora_flux.py`` names them, on the original fused
  layers (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``): a fused
  layer's down is the parts' downs stacked, its up the parts' ups block-diagonal, its alpha the scale
  times the stacked rank; ``norm_out.linear``'s up has its (scale, shift) halves swapped into the
  original (shift, scale) order.

``lora_xlabs.safetensors`` is another random LoRA in XLabs' format (``double_blocks.0.processor.
qkv_lora1.down.weight``, no alpha), with diffusers' output after its own XLabs converter. (diffusers' kohya
converter cannot check the kohya file: it assumes the released model's widths, 3072 and 12288.)

Also ``base.safetensors`` (the transformer in the original layout), ``inputs.npz`` and ``outputs.npz``:
diffusers' output without the LoRA and with it at scale 1.0 and 0.5.

Run: PYTHONPATH=. /work/venv/bin/python tools/make_fixtures_flux_lora.py
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from make_fixtures_flux import _run  # the same diffusers call (tools/ is the script's folder)
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.numpy import save_file

from tf_diffusion.flux import latent_image_ids
from tf_diffusion.weights.flux import convert_diffusers_flux, flux_config_from_diffusers

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "flux_lora"
RANK, ALPHA = 4, 8
TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
    "context_embedder", "linear_1", "linear_2",
]  # fmt: skip
CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)  # fmt: skip


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    b, t = 2, 5
    img_ids = latent_image_ids(2, 3)
    img_ids[:, 0] = 1.0  # every rotary axis moves
    return dict(
        img=rng.standard_normal((b, 6, CONFIG["in_channels"])).astype(np.float32),
        img_ids=img_ids.astype(np.float32),
        txt=rng.standard_normal((b, t, CONFIG["joint_attention_dim"])).astype(np.float32),
        txt_ids=np.zeros((t, 3), np.float32),
        timesteps=np.array([0.3, 0.8], np.float32),
        y=rng.standard_normal((b, CONFIG["pooled_projection_dim"])).astype(np.float32),
        guidance=np.array([3.5, 2.0], np.float32),
    )


# diffusers module (within a block) -> (original layer, the parts fused into it, in row order).
_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def _kohya(peft_sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same LoRA on the original fused layers, as sd-scripts names and stacks it."""
    plan = {o: (d,) for o, d in _TOP.items()}
    for i in range(CONFIG["num_layers"]):
        plan |= {
            f"double_blocks.{i}.{o}": tuple(f"transformer_blocks.{i}.{p}" for p in ps)
            for o, ps in _DOUBLE.items()
        }
    for i in range(CONFIG["num_single_layers"]):
        plan |= {
            f"single_blocks.{i}.{o}": tuple(f"single_transformer_blocks.{i}.{p}" for p in ps)
            for o, ps in _SINGLE.items()
        }
    out, used = {}, set()
    for original, parts in plan.items():
        downs = [peft_sd[f"{p}.lora_A.weight"] for p in parts]
        ups = [peft_sd[f"{p}.lora_B.weight"] for p in parts]
        used |= {f"{p}.lora_{x}.weight" for p in parts for x in "AB"}
        down = np.concatenate(downs, axis=0)
        up = np.zeros((sum(u.shape[0] for u in ups), down.shape[0]), np.float32)
        row = 0
        for j, u in enumerate(ups):  # block-diagonal: each part's rows read its own rank slice
            up[row : row + u.shape[0], j * RANK : (j + 1) * RANK] = u
            row += u.shape[0]
        if (
            original == "final_layer.adaLN_modulation.1"
        ):  # diffusers (scale, shift) -> original (shift, scale)
            half = up.shape[0] // 2
            up = np.concatenate([up[half:], up[:half]], axis=0)
        name = "lora_unet_" + original.replace(".", "_")
        out[f"{name}.lora_down.weight"] = np.ascontiguousarray(down)
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = np.array(ALPHA / RANK * down.shape[0], np.float32)
    left = sorted(set(peft_sd) - used)
    if left:
        raise SystemExit(f"LoRA modules the kohya plan misses: {left}")
    return out


def _diffusers_output(path: pathlib.Path, x, scale: float) -> np.ndarray:
    """diffusers' output with a LoRA file loaded by its own converters (FluxPipeline.lora_state_dict)."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval()
    state_dict, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=model)
    return _run(model, x, scale)


def _xlabs() -> dict[str, np.ndarray]:
    """A random LoRA in XLabs' format: one down and a stacked up per fused qkv, no alpha (scale 1)."""
    rng = np.random.default_rng(5)
    h = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    modules = {}
    for i in range(CONFIG["num_layers"]):
        for name, rows in (("qkv_lora1", 3 * h), ("qkv_lora2", 3 * h), ("proj_lora1", h), ("proj_lora2", h)):
            modules[f"double_blocks.{i}.processor.{name}"] = (rows, h)
    for i in range(CONFIG["num_single_layers"]):
        modules[f"single_blocks.{i}.processor.qkv_lora"] = (3 * h, h)  # q, k, v rows of linear1 only
        modules[f"single_blocks.{i}.processor.proj_lora"] = (h, 5 * h)  # linear2 reads attention + MLP
    out = {}
    for name, (rows, fan_in) in modules.items():
        out[f"{name}.down.weight"] = (rng.standard_normal((RANK, fan_in)) * 0.2).astype(np.float32)
        out[f"{name}.up.weight"] = (rng.standard_normal((rows, RANK)) * 0.2).astype(np.float32)
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval()
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    x = _inputs()
    out_base = _run(model, x)

    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # nonzero B; the output moves by about 1 (larger factors amplify
                # the frameworks' float32 differences past 1e-4)
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_sd = {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}
    out_full = _run(model, x, 1.0)
    out_half = _run(model, x, 0.5)
    # float32 rounding alone: peft's unmerged LoRA against the same model in float64.
    x64 = {k: v.astype(np.float64) for k, v in x.items()}
    exact = _run(model.double(), x64, 1.0)
    model.float()
    spread = float(np.abs(out_full - exact).max())
    model.disable_adapters()
    out_off = _run(model, x)
    model.enable_adapters()
    np.testing.assert_allclose(out_off, out_base, atol=1e-6)

    FluxPipeline.save_lora_weights(
        OUT,
        transformer_lora_layers=get_peft_model_state_dict(model),
        weight_name="lora_diffusers.safetensors",
        transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS},
    )
    save_file(_kohya(peft_sd), str(OUT / "lora_kohya.safetensors"))
    save_file(_xlabs(), str(OUT / "lora_xlabs.safetensors"))
    xlabs_out = _diffusers_output(OUT / "lora_xlabs.safetensors", x, 1.0)
    cfg = flux_config_from_diffusers({"_class_name": "FluxTransformer2DModel", **CONFIG})
    original = convert_diffusers_flux(base, cfg)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in original.items()}, str(OUT / "base.safetensors")
    )
    np.savez(OUT / "inputs.npz", **x)
    np.savez(OUT / "outputs.npz", base=out_base, lora_1=out_full, lora_half=out_half, xlabs_1=xlabs_out)
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=1) + "\n")
    moved = float(np.abs(out_full - out_base).max())
    print(f"wrote {OUT}; LoRA moves the output by {moved:.3g}, float32 vs float64 diffusers: {spread:.3g}")


if __name__ == "__main__":
    main()
