"""Reference for SDXL LoRA training: one step's loss and LoRA gradients as diffusers' SDXL LoRA script computes them.

diffusers' ``examples/text_to_image/train_text_to_image_lora_sdxl.py`` (with ``--train_text_encoder``) puts
peft LoRAs on the UNet's attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and on both text encoders'
attention (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), then per batch: latents = VAE sample *
scaling factor; noise ~ N(0, I); t ~ U{0, T-1}; x_t = ``DDPMScheduler.add_noise``; the context is the
penultimate hidden states of both encoders side by side, the pooled embedding the second encoder's
projected output, the time ids ``original_size + crop_top_left + target_size``; loss =
``F.mse_loss(unet(...).float(), noise.float(), reduction="mean")``. This tool does that computation on the
tiny SDXL fixture (tests/fixtures/sdxl/sdxl-diffusers) with the random draws fixed (latents, noise and
timesteps given, so the VAE is not needed) and the LoRA factors seeded (peft's zero ``lora_B`` would leave
half the gradients zero), then backpropagates.

Writes tests/fixtures/sdxl_train/: ``lora.safetensors`` (the factors, diffusers / peft names, torch layout) and
``step.npz`` (latents NHWC, noise NHWC, timesteps, both encoders' ids, time ids, the loss, every LoRA tensor's
gradient norm (``grad_names``, ``grad_norms``) and ``grad/<name>`` the full gradient of a few, torch layout). tests/test_train_sdxl.py
feeds the same inputs to ``LoraTrainer.prediction_and_target`` and compares, without torch.

Usage (dev only; needs torch, diffusers, peft): python tools/make_fixtures_sdxl_train.py
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ROOT / "tests" / "fixtures" / "sdxl" / "sdxl-diffusers"
OUT = ROOT / "tests" / "fixtures" / "sdxl_train"
RANK, ALPHA = 2, 4.0  # scale 2; rank 2 keeps the file small (the script's default rank is 4)
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the script's UNet targets
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the script's text-encoder targets
CAPTIONS = ["a red circle", "a blue star on grass"]
TIMESTEPS = [37, 781]
FULL_GRADS = (  # a few tensors whose whole gradient is kept (the norms are kept for every one)
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight",
    "text_encoder.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight",
    "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight",
)


def seeded_factors(module: torch.nn.Module, seed: int) -> None:
    """Replace every LoRA factor with a seeded draw of standard deviation 0.5 / sqrt(fan-in)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                draw = rng.standard_normal(tuple(param.shape)) * 0.5 / np.sqrt(param.shape[1])
                param.copy_(torch.from_numpy(draw.astype(np.float32)))


def main() -> None:
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(BASE), torch_dtype=torch.float32, local_files_only=True, add_watermarker=False
    )
    scheduler = DDPMScheduler.from_pretrained(str(BASE), subfolder="scheduler")
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for module in parts.values():
        module.requires_grad_(False)
    # As the script: unet.add_adapter; the text encoders through peft directly (transformers 5's own
    # add_adapter asks for a newer peft than the index serves; the layers peft injects are the same).
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS))
    for name in ("text_encoder", "text_encoder_2"):
        inject_adapter_in_model(
            LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TEXT_TARGETS), parts[name]
        )
    for seed, module in enumerate(parts.values()):
        seeded_factors(module, 50 + seed)
        for param_name, param in module.named_parameters():
            param.requires_grad_("lora_" in param_name)

    rng = np.random.default_rng(51)
    size = 16  # 16 x 16 images: the time ids; 8 x 8 latents with this VAE
    h = size // pipe.vae_scale_factor
    latents = rng.standard_normal((2, 4, h, h))
    noise = rng.standard_normal(latents.shape)
    latents, noise = latents.astype(np.float32), noise.astype(np.float32)
    ids = [
        tok(CAPTIONS, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids
        for tok in (pipe.tokenizer, pipe.tokenizer_2)
    ]  # fmt: skip
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
    t = torch.tensor(TIMESTEPS, dtype=torch.long)

    # The script's encode_prompt: penultimate states of each encoder, the last one's pooled output.
    states, pooled = [], None
    for encoder, token_ids in zip((pipe.text_encoder, pipe.text_encoder_2), ids, strict=True):
        out = encoder(token_ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        states.append(out[-1][-2])
    context = torch.cat(states, dim=-1)
    noisy = scheduler.add_noise(torch.from_numpy(latents), torch.from_numpy(noise), t)
    pred = pipe.unet(
        noisy, t, context, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled}, return_dict=False
    )[0]
    loss = F.mse_loss(pred.float(), torch.from_numpy(noise).float(), reduction="mean")
    loss.backward()

    OUT.mkdir(parents=True, exist_ok=True)
    factors, grads = {}, {}
    for part, module in parts.items():
        named = dict(module.named_parameters())
        for key, value in get_peft_model_state_dict(module).items():
            # transformers 5 names the CLIP parameters without the "text_model." of the files' keys.
            path = key if part == "unet" or key.startswith("text_model.") else f"text_model.{key}"
            full = f"{part}.{path}"
            factors[full] = value.detach().numpy().copy()
            param = named[key.replace(".weight", ".default.weight")]
            grads[full] = (
                np.zeros(param.shape, np.float32) if param.grad is None else param.grad.numpy().copy()
            )
    save_file(factors, str(OUT / "lora.safetensors"))
    record = dict(
        latents=np.transpose(latents, (0, 2, 3, 1)),
        noise=np.transpose(noise, (0, 2, 3, 1)),
        t=np.asarray(TIMESTEPS, np.int32),
        ids=ids[0].numpy().astype(np.int32),
        ids_2=ids[1].numpy().astype(np.int32),
        time_ids=time_ids.numpy(),
        loss=np.float64(loss.item()),
    )
    record["grad_names"] = np.array(sorted(grads))  # one array each: 336 entries would bloat the npz
    record["grad_norms"] = np.array([np.linalg.norm(grads[n].astype(np.float64)) for n in sorted(grads)])
    for name in FULL_GRADS:
        record[f"grad/{name}"] = grads[name]
    np.savez_compressed(OUT / "step.npz", **record)
    zero = [n for n, g in grads.items() if not np.any(g)]
    print(f"loss {loss.item():.6f}; {len(grads)} LoRA tensors, {len(zero)} with a zero gradient: {zero}")


if __name__ == "__main__":
    main()
