"""LoRA fixtures: peft LoRAs on the tiny pipeline's UNet and text encoder, saved as diffusers and kohya files.

The base components are those of tools/make_fixtures_pipeline.py (weights from
``tf_diffusion.testing.random_state_dict`` with its seeds, so the test rebuilds them from
tests/fixtures/pipeline/shapes.json). On them this attaches random LoRAs with peft
(``unet.add_adapter(LoraConfig(...))``; the text encoder through ``peft.inject_adapter_in_model``,
because transformers 5's own LoRA path asks for a newer peft than the index serves) and writes:

- ``lora_diffusers.safetensors``: ``StableDiffusionPipeline.save_lora_weights`` with both adapter
  configs (alpha and the rank / alpha patterns live in the ``lora_adapter_metadata`` header).
- ``lora_kohya.safetensors`` and ``lora_kohya.pt``: the same LoRA under kohya / A1111 names, written here
  from kohya's documented naming (sd-scripts ``networks/lora.py``): ``lora_unet_`` + the diffusers module
  path with ``.`` -> ``_`` (``lora_te_`` + the transformers path for the text encoder), ``lora_A`` ->
  ``.lora_down.weight``, ``lora_B`` -> ``.lora_up.weight``, and a scalar ``.alpha`` per module; the
  header has ``ss_network_dim`` / ``ss_network_alpha`` as sd-scripts writes them. The UNet half is checked by
  loading it with diffusers' own ``load_lora_weights`` (kohya conversion) into a fresh pipeline, which
  must give the peft UNet's output.
- ``lora_second.safetensors``: a second, UNet-only diffusers LoRA, for two adapters at once.
- ``lora_io.npz``: fixed inputs and the reference outputs (UNet noise prediction NCHW, text encoder
  last_hidden_state) without LoRA, with it at weight 1.0 and 0.5, and with both adapters at 0.7 / 0.4.

Usage (dev only): pip install -e ".[reference]" peft && python tools/make_fixtures_lora.py
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_fixtures_pipeline import CLIP, UNET, WEIGHT_SEEDS, seeded  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "lora"

UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
]  # fmt: skip
UNET_LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=UNET_TARGETS,
    # Per-module rank and alpha as peft stores them: the 3x3 ResBlock convs (LoCon) get rank 2, alpha 3.
    rank_pattern={"conv1": 2},
    alpha_pattern={"conv1": 3.0},
    init_lora_weights=False,
)
TE_LORA = dict(
    r=4,
    lora_alpha=2,
    target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    init_lora_weights=False,
)
SECOND_LORA = dict(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False)


def randomise_lora(module: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    """Give every lora_A / lora_B weight a seeded draw large enough to move the outputs."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                fan_in = int(np.prod(param.shape[1:]))
                draw = rng.standard_normal(tuple(param.shape)).astype(np.float32) * scale / np.sqrt(fan_in)
                param.copy_(torch.from_numpy(draw))


def set_lora_scale(module: torch.nn.Module, weight: float | None) -> None:
    """Scale every LoRA layer's contribution by ``weight`` (None: back to the adapter's own scaling)."""
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            if weight is None:
                layer.unscale_layer()
            else:
                layer.scale_layer(weight)


def kohya_tensors(state: dict, config: LoraConfig, prefix: str, strip: str) -> dict:
    """peft lora_A / lora_B keys -> kohya names, with each module's alpha as a scalar tensor."""
    out = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")
        module = module.removeprefix(strip)
        name = prefix + module.replace(".", "_")
        part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
        out[f"{name}.{part}"] = value.detach().contiguous()
        leaf = module.rsplit(".", 1)[-1]
        alpha = config.alpha_pattern.get(leaf, config.lora_alpha)
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = seeded(UNet2DConditionModel(**UNET), WEIGHT_SEEDS["unet"])
    text_encoder = seeded(CLIPTextModel(CLIPTextConfig(**CLIP)), WEIGHT_SEEDS["text_encoder"])

    rng = np.random.default_rng(20)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # NCHW
    t = np.array([10, 500], dtype=np.int64)
    context = rng.standard_normal((2, 7, CLIP["hidden_size"])).astype(np.float32)
    ids = rng.integers(1, 49406, size=(2, 77)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 49406, 49407

    def run_unet(model):
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()

    def run_te(model):
        with torch.no_grad():
            return model(torch.from_numpy(ids)).last_hidden_state.numpy()

    io = dict(x=x, t=t, context=context, ids=ids, unet_base=run_unet(unet), te_base=run_te(text_encoder))

    unet_config = LoraConfig(**UNET_LORA)
    unet.add_adapter(unet_config, adapter_name="default")
    randomise_lora(unet, 21)
    te_config = LoraConfig(**TE_LORA)
    inject_adapter_in_model(te_config, text_encoder, adapter_name="default")
    randomise_lora(text_encoder, 22)

    for weight, tag in ((None, "1.0"), (0.5, "0.5")):
        set_lora_scale(unet, weight)
        set_lora_scale(text_encoder, weight)
        io[f"unet_lora_{tag}"] = run_unet(unet)
        io[f"te_lora_{tag}"] = run_te(text_encoder)
        set_lora_scale(unet, None)
        set_lora_scale(text_encoder, None)
    for tag in ("1.0", "0.5"):
        moved = float(np.max(np.abs(io[f"unet_lora_{tag}"] - io["unet_base"])))
        moved_te = float(np.max(np.abs(io[f"te_lora_{tag}"] - io["te_base"])))
        print(f"LoRA at {tag} moves the UNet output by {moved:.3f}, the text encoder's by {moved_te:.3f}")
        assert moved > 1e-2 and moved_te > 1e-2

    unet_state = get_peft_model_state_dict(unet, adapter_name="default")
    te_state = get_peft_model_state_dict(text_encoder, adapter_name="default")
    te_prefix = "" if next(iter(te_state)).startswith("text_model.") else "text_model."
    te_state = {te_prefix + k: v for k, v in te_state.items()}
    StableDiffusionPipeline.save_lora_weights(
        OUT,
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=te_state,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
        weight_name="lora_diffusers.safetensors",
    )

    kohya = {
        **kohya_tensors(unet_state, unet_config, "lora_unet_", ""),
        **kohya_tensors(te_state, te_config, "lora_te_", ""),
    }
    meta = {"ss_network_dim": str(unet_config.r), "ss_network_alpha": str(unet_config.lora_alpha)}
    save_file(kohya, OUT / "lora_kohya.safetensors", metadata=meta)
    torch.save(kohya, OUT / "lora_kohya.pt")

    # diffusers reads our kohya naming: its own kohya conversion on a fresh pipeline gives peft's UNet.
    with tempfile.TemporaryDirectory() as tmp:
        unet_only = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
        save_file(unet_only, pathlib.Path(tmp) / "k.safetensors")
        check = StableDiffusionPipeline(
            unet=seeded(UNet2DConditionModel(**UNET), WEIGHT_SEEDS["unet"]),
            text_encoder=None,
            tokenizer=None,
            vae=None,
            scheduler=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        check.load_lora_weights(tmp, weight_name="k.safetensors", adapter_name="kohya")
        err = float(np.max(np.abs(run_unet(check.unet) - io["unet_lora_1.0"])))
        print(f"diffusers' load_lora_weights of the kohya file: UNet max abs error {err:.2e}")
        assert err < 1e-5, err

    second_config = LoraConfig(**SECOND_LORA)
    unet.add_adapter(second_config, adapter_name="second")
    randomise_lora_only(unet, "second", 23)
    unet.set_adapters(["default", "second"], weights=[0.7, 0.4])
    io["unet_two_0.7_0.4"] = run_unet(unet)
    second_state = get_peft_model_state_dict(unet, adapter_name="second")
    StableDiffusionPipeline.save_lora_weights(
        OUT,
        unet_lora_layers=second_state,
        unet_lora_adapter_metadata=second_config.to_dict(),
        weight_name="lora_second.safetensors",
    )
    np.savez_compressed(OUT / "lora_io.npz", **io)
    (OUT / "lora_configs.json").write_text(
        json.dumps({"unet": UNET_LORA, "text_encoder": TE_LORA, "second": SECOND_LORA}, indent=1) + "\n"
    )


# SD 2.x shapes: linear proj_in / proj_out, a constant head width (per-level head counts), gelu text encoder.
SD2_UNET = dict(UNET, use_linear_projection=True, attention_head_dim=[4, 8])
SD2_CLIP = dict(CLIP, hidden_act="gelu")
SD2_SEEDS = {"unet": 5, "text_encoder": 6}


def sd2_case() -> None:
    """A kohya and a diffusers LoRA on SD 2.x-shaped tiny components, with outputs at weight 1.0."""
    from make_fixtures_pipeline import SHAPES

    unet = seeded(UNet2DConditionModel(**SD2_UNET), SD2_SEEDS["unet"])
    text_encoder = seeded(CLIPTextModel(CLIPTextConfig(**SD2_CLIP)), SD2_SEEDS["text_encoder"])
    shapes = {name: SHAPES[seed] for name, seed in SD2_SEEDS.items()}
    (OUT / "sd2_components.json").write_text(
        json.dumps({"unet": SD2_UNET, "text_encoder": SD2_CLIP, "seeds": SD2_SEEDS, "shapes": shapes}) + "\n"
    )
    rng = np.random.default_rng(30)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([3, 700], dtype=np.int64)
    context = rng.standard_normal((2, 5, SD2_CLIP["hidden_size"])).astype(np.float32)
    ids = rng.integers(1, 49406, size=(2, 77)).astype(np.int64)
    with torch.no_grad():
        io = dict(x=x, t=t, context=context, ids=ids)
        unet_config, te_config = LoraConfig(**UNET_LORA), LoraConfig(**TE_LORA)
        unet.add_adapter(unet_config, adapter_name="default")
        randomise_lora(unet, 31)
        inject_adapter_in_model(te_config, text_encoder, adapter_name="default")
        randomise_lora(text_encoder, 32)
        io["unet_lora_1.0"] = unet(
            torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)
        ).sample.numpy()
        io["te_lora_1.0"] = text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    unet_state = get_peft_model_state_dict(unet, adapter_name="default")
    te_state = get_peft_model_state_dict(text_encoder, adapter_name="default")
    te_prefix = "" if next(iter(te_state)).startswith("text_model.") else "text_model."
    te_state = {te_prefix + k: v for k, v in te_state.items()}
    StableDiffusionPipeline.save_lora_weights(
        OUT,
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=te_state,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
        weight_name="sd2_lora_diffusers.safetensors",
    )
    kohya = {
        **kohya_tensors(unet_state, unet_config, "lora_unet_", ""),
        **kohya_tensors(te_state, te_config, "lora_te_", ""),
    }
    save_file(kohya, OUT / "sd2_lora_kohya.safetensors")
    np.savez_compressed(OUT / "sd2_lora_io.npz", **io)


def randomise_lora_only(module: torch.nn.Module, adapter: str, seed: int) -> None:
    """randomise_lora for one named adapter's weights only."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name:
                fan_in = int(np.prod(param.shape[1:]))
                draw = rng.standard_normal(tuple(param.shape)).astype(np.float32) / np.sqrt(fan_in)
                param.copy_(torch.from_numpy(draw))


if __name__ == "__main__":
    main()
    sd2_case()
