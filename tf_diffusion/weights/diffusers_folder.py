"""diffusers pipeline folders (``model_index.json`` + one subfolder per component), read and written.

Reading turns each component's ``config.json`` into our config, renames the UNet and VAE keys to
the original ones (``diffusers_unet`` / ``diffusers_vae``) and keeps tensors lazy. Writing is the
reverse: original keys -> diffusers keys, our configs -> ``config.json`` files that diffusers and
transformers load, the default sampler and scheduler settings as ``scheduler_config.json``, the
weights as float32 files (what ``from_pretrained`` runs by default) plus, for half-precision
weights, the ``fp16`` (``bf16``) variant files.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from tf_diffusion.config import CLIPTextConfig, PipelineConfig, SchedulerConfig, UNetConfig, VAEConfig
from tf_diffusion.families import (
    FAMILIES,
    components_of,
    diffusers_pipeline_classes,
    family_of_config,
)
from tf_diffusion.fileio import read_json_object
from tf_diffusion.schedulers import config_from_diffusers as scheduler_config_from_diffusers
from tf_diffusion.tokenizer import CLIPTokenizer
from tf_diffusion.weights.ckpt import load_ckpt
from tf_diffusion.weights.diffusers_configs import (
    clip_config_from_transformers,
    sampler_from_diffusers,
    sampler_is_implemented,
    sampler_to_diffusers,
    vae_config_from_diffusers,
)
from tf_diffusion.weights.diffusers_unet import (
    RESNET_RENAMES,
    convert_diffusers_unet_state_dict,
    diffusers_prefix_map,
    unet_config_from_diffusers,
)
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae, diffusers_vae_key_map
from tf_diffusion.weights.lazy import BFLOAT16, derived, is_floating
from tf_diffusion.weights.safetensors_io import open_safetensors, save_safetensors
from tf_diffusion.weights.state_dict import load_state_dict

MODEL_INDEX = "model_index.json"
# Pipelines some family reads (families.FAMILIES[...].diffusers_pipelines).
PIPELINE_CLASSES = diffusers_pipeline_classes()
# Weight file stems: diffusers models, then transformers models.
_STEMS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
    # SD3 (weights/sd3_folder.py)
    "transformer": ("diffusion_pytorch_model",),
    "text_encoder_3": ("model", "pytorch_model"),
}
_SAFETENSORS_STEM = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_DIFFUSERS_VERSION = "0.30.0"
# diffusers always writes these keys in its SD scheduler configs; their defaults differ between classes.
_SCHEDULER_CORE = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "steps_offset",
    "set_alpha_to_one",
    "clip_sample",
    "skip_prk_steps",
    "timestep_spacing",
)


@dataclass
class DiffusersFolder:
    """A diffusers folder read lazily.

    Attributes:
        config: the pipeline's configuration from its config.json files.
        tokenizer: from ``tokenizer/``.
        components: "text_encoder" / "unet" / "vae" -> {our key: lazy tensor}.
        files: component -> the weight files read (relative to the folder).
        scheduler: the raw ``scheduler_config.json`` (kept so conversions write it back).
        ignored: keys skipped on purpose (position-id buffers).
        ignored_components: model_index.json entries that are not loaded (safety checker ...).
        handles: open files; close them when done.
    """

    config: PipelineConfig
    tokenizer: CLIPTokenizer
    components: dict[str, dict]
    files: dict[str, list[str]]
    scheduler: dict
    ignored: list[str] = field(default_factory=list)
    ignored_components: list[str] = field(default_factory=list)
    handles: list = field(default_factory=list)


def read_json(path: pathlib.Path) -> dict:
    """A JSON object from ``path``, with errors that name the file (``fileio.read_json_object``)."""
    try:
        return read_json_object(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except OSError as e:  # a folder or an unreadable file where a JSON file belongs
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None


def weight_file_candidates(component: str, variant: str | None) -> list[str]:
    """Weight files of a component folder in the order diffusers prefers them (safetensors first)."""
    names = []
    for ext in ("safetensors", "bin"):
        for stem in _STEMS[component]:
            if ext == "safetensors" and stem == "pytorch_model":
                continue
            if ext == "bin" and stem == "model":
                continue
            single = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
            names.append(single)
            if variant:
                names += [f"{stem}.{ext}.index.{variant}.json", f"{stem}.{variant}.{ext}.index.json"]
            else:
                names.append(f"{stem}.{ext}.index.json")
    return names


def select_weight_files(available: Iterable[str], component: str, variant: str | None) -> str:
    """The weight file (or shard index) of ``component`` among ``available`` relative paths.

    Raises:
        ValueError: if none is there, naming the variants that are.
    """
    available = set(available)
    for name in weight_file_candidates(component, variant):
        if f"{component}/{name}" in available:
            return f"{component}/{name}"
    present = sorted(p for p in available if p.startswith(component + "/"))
    found_variants = sorted(
        {
            p.split("/")[-1].split(".")[1]
            for p in present
            if p.endswith((".safetensors", ".bin")) and p.split("/")[-1].count(".") == 2
        }
    )
    hint = ""
    if found_variants and variant not in found_variants:
        hint = f"; variants present: {found_variants}, pass variant=" + repr(found_variants[0])
    wanted = f"variant {variant!r}" if variant else "no variant"
    raise ValueError(
        f"no {component} weights with {wanted} (looked for {weight_file_candidates(component, variant)[:2]}){hint}"
    )


def _open_weights(folder: pathlib.Path, relative: str, handles: list) -> tuple[dict, list[str]]:
    """All tensors of a weight file or a sharded index, lazily; returns them and the files read."""
    path = folder / relative
    if relative.endswith(".json"):
        index = read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path}: a shard index needs a weight_map object")
        tensors, files = {}, []
        for shard in sorted(set(weight_map.values())):
            part, _ = _open_weights(folder, str(pathlib.PurePosixPath(relative).parent / shard), handles)
            tensors.update(part)
            files.append(str(pathlib.PurePosixPath(relative).parent / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{path}: the shards lack {len(missing)} listed tensors, e.g. {missing[0]!r}")
        return tensors, files
    if relative.endswith(".safetensors"):
        handle = open_safetensors(path)
        handles.append(handle)
        return dict(handle), [relative]
    state = load_ckpt(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state), [relative]


def read_diffusers_config(path: str | os.PathLike) -> tuple[PipelineConfig, CLIPTokenizer, dict, dict]:
    """The configs of a diffusers folder without its weights.

    Returns:
        (pipeline config, tokenizer, raw scheduler_config.json, raw model_index.json).

    Raises:
        ValueError: for a pipeline class other than SD 1.x/2.x ones, a missing component, or
            configs we cannot represent.
    """
    folder = pathlib.Path(path)
    index = read_json(folder / MODEL_INDEX)
    pipeline = index.get("_class_name")
    if pipeline in FAMILIES["sd3"].diffusers_pipelines:
        raise ValueError(
            f"{folder} is an SD3 / SD3.5 folder ({pipeline}); StableDiffusion builds UNet models: load it "
            f"with tf_diffusion.sd3.StableDiffusion3.from_pretrained"
        )
    if pipeline not in PIPELINE_CLASSES:
        raise ValueError(
            f"{folder / MODEL_INDEX}: _class_name={pipeline!r} is not supported; expected one of {PIPELINE_CLASSES}"
        )
    sdxl = pipeline in _SDXL_PIPELINES
    # SDXL adds text_encoder_2 / tokenizer_2; its refiner has no text_encoder (a null entry).
    required = ["unet", "vae", "scheduler"]
    if sdxl:
        required += ["text_encoder_2", "tokenizer_2"]
        if _present(index, "text_encoder"):
            required += ["text_encoder", "tokenizer"]
    else:
        required += ["text_encoder", "tokenizer"]
    for name in required:
        if name not in index or not (folder / name).is_dir():
            raise ValueError(f"{folder}: the diffusers folder has no {name}/ component")
    unet_json = read_json(folder / "unet" / "config.json")
    unet_cfg = unet_config_from_diffusers(unet_json)
    vae_cfg = vae_config_from_diffusers(read_json(folder / "vae" / "config.json"))
    text_cfg = tokenizer = None
    if "text_encoder" in required:
        text_cfg = clip_config_from_transformers(read_json(folder / "text_encoder" / "config.json"))
        tokenizer = CLIPTokenizer.from_pretrained_folder(folder / "tokenizer")
    extra = {}
    if sdxl:
        tokenizer_2 = CLIPTokenizer.from_pretrained_folder(folder / "tokenizer_2")
        if tokenizer is None:
            tokenizer = tokenizer_2
        extra = dict(
            text_encoder_2=clip_config_from_transformers(
                read_json(folder / "text_encoder_2" / "config.json")
            ),
            tokenizer_2=tokenizer_2.config,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        )
        if extra["text_encoder_2"].projection_dim is None:
            raise ValueError(f"{folder / 'text_encoder_2'}: SDXL needs a CLIPTextModelWithProjection there")
    scheduler_json = read_json(folder / "scheduler" / "scheduler_config.json")
    sample_size = unet_json.get("sample_size")
    default_size = sample_size * vae_cfg.downsample_factor if isinstance(sample_size, int) else 512
    config = PipelineConfig(
        name=folder.resolve().name,
        text_encoder=text_cfg,
        tokenizer=tokenizer.config,
        unet=unet_cfg,
        vae=vae_cfg,
        scheduler=scheduler_config_from_diffusers(scheduler_json),
        default_size=default_size,
        # diffusers samples with the folder's scheduler by default; so do we.
        default_sampler=sampler_from_diffusers(scheduler_json, _scheduler_class(index)),
        **extra,
        # diffusers' SDXL pipelines guide with 5.0 by default.
        **({"default_guidance": 5.0} if sdxl else {}),
    )
    return config, tokenizer, scheduler_json, index


# diffusers' SDXL pipeline classes (they hold text_encoder_2 / tokenizer_2).
_SDXL_PIPELINES = tuple(c for f in FAMILIES.values() if f.is_sdxl for c in f.diffusers_pipelines)


def _present(index: Mapping, name: str) -> bool:
    """Whether model_index.json names a component (``[null, null]`` marks an absent one)."""
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _scheduler_class(index: Mapping) -> str | None:
    """The scheduler class model_index.json names: the one diffusers' from_pretrained instantiates
    (with the options of scheduler_config.json), whatever that file's own ``_class_name`` says."""
    entry = index.get("scheduler")
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def read_diffusers_folder(path: str | os.PathLike, *, variant: str | None = None) -> DiffusersFolder:
    """Read a diffusers Stable Diffusion folder lazily.

    Args:
        path: the folder with ``model_index.json``.
        variant: weight variant such as "fp16" (``diffusion_pytorch_model.fp16.safetensors``).

    Raises:
        ValueError: for a pipeline class other than SD 1.x/2.x ones, missing components or
            files, configs we cannot represent, or keys that do not fit the configs.
    """
    folder = pathlib.Path(path)
    config, tokenizer, scheduler_json, index = read_diffusers_config(folder)
    ignored_components = sorted(
        k
        for k, v in index.items()
        if not k.startswith("_")
        and k not in (*_STEMS, "tokenizer", "tokenizer_2", "scheduler")
        and isinstance(v, list)
        and v
        and v[0] is not None
    )
    available = [
        p.relative_to(folder).as_posix()
        for c in components_of(config)
        for p in (folder / c).iterdir()
        if p.is_file()
    ]
    handles: list = []
    components, files, ignored = {}, {}, []
    try:
        for component in components_of(config):
            chosen = select_weight_files(available, component, variant)
            tensors, files[component] = _open_weights(folder, chosen, handles)
            if component in ("text_encoder", "text_encoder_2"):
                tensors, skipped = text_encoder_from_transformers(tensors)
                ignored += [f"text_encoder/{k}" for k in skipped]
            elif component == "unet":
                tensors = convert_diffusers_unet_state_dict(tensors, config.unet)
            else:
                tensors = convert_diffusers_vae(tensors, config.vae)
            components[component] = tensors
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    return DiffusersFolder(
        config, tokenizer, components, files, scheduler_json, ignored, ignored_components, handles
    )


def text_encoder_from_transformers(tensors: Mapping) -> tuple[dict, list[str]]:
    """transformers CLIPTextModel keys -> ours (``text_model.`` prefixed); drops position-id buffers.

    transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level; older
    versions and the hub's SD repositories keep it.
    """
    out, skipped = {}, []
    for key, value in tensors.items():
        # CLIPTextModelWithProjection's text_projection sits beside text_model.
        ours = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        if ours == "text_model.embeddings.position_ids":
            skipped.append(key)
            continue
        out[ours] = value
    return out, skipped


# --------------------------------------------------------------------------- writing


def load_folder_components(
    model, folder: pathlib.Path, converters: Mapping[str, Callable[[dict], Mapping] | None]
) -> None:
    """Assign each named component of a diffusers folder to ``model.<name>``, all-or-nothing per component.

    A component's weight files (safetensors or ``.bin``, sharded or not) are opened lazily, renamed by its
    converter (``None``: stored keys are our attribute paths) and loaded with ``load_state_dict``; every
    file handle is closed before returning, on success or error.

    Args:
        model: the built pipeline whose attributes are the components.
        folder: the diffusers pipeline folder.
        converters: component name -> a function from the stored tensors to ours, in loading order.
    """
    available = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    handles: list = []
    try:
        for name, convert in converters.items():
            tensors, _ = _open_weights(folder, select_weight_files(available, name, None), handles)
            load_state_dict(getattr(model, name), tensors if convert is None else convert(tensors))
    finally:
        for handle in handles:
            handle.close()


def clip_from_transformers(tensors: Mapping) -> dict:
    """transformers CLIPTextModel(WithProjection) tensors under our keys, without the skipped buffer names."""
    return text_encoder_from_transformers(tensors)[0]


def unet_to_diffusers(tensors: Mapping, config: UNetConfig) -> dict:
    """Original UNet keys -> diffusers UNet2DConditionModel keys (values untouched).

    Raises:
        ValueError: for a key this architecture does not have.
    """
    reverse = {original: new for new, original in diffusers_prefix_map(config).items()}
    resnet = {original: new for new, original in RESNET_RENAMES.items()}
    out = {}
    for key, value in tensors.items():
        prefix = _longest_prefix(key, reverse)
        if prefix is None:
            raise ValueError(f"UNet key {key!r} has no diffusers name in this architecture")
        new_prefix, rest = reverse[prefix], key[len(prefix) :]
        if ".resnets." in new_prefix:
            head = next((h for h in resnet if rest.startswith(h + ".")), None)
            if head is None:
                raise ValueError(f"UNet key {key!r} is not a ResBlock parameter")
            rest = resnet[head] + rest[len(head) :]
        out[new_prefix + rest] = value
    return out


def _longest_prefix(key: str, table: Mapping[str, str]) -> str | None:
    cut = len(key)
    while True:
        cut = key.rfind(".", 0, cut)
        if cut < 0:
            return None
        if key[: cut + 1] in table:
            return key[: cut + 1]


def vae_to_diffusers(tensors: Mapping, config: VAEConfig) -> dict:
    """Original VAE keys -> diffusers AutoencoderKL keys; the mid attention's 1x1 convs become Linear weights."""
    reverse = {}
    for new, original in diffusers_vae_key_map(config).items():
        # Skip the legacy attention names (query/key/value/proj_attn); diffusers writes to_q ...
        if any(f".attentions.0.{legacy}." in new for legacy in ("query", "key", "value", "proj_attn")):
            continue
        reverse[original] = new
    out = {}
    for key, value in tensors.items():
        if key not in reverse:
            raise ValueError(f"VAE key {key!r} has no diffusers name for this config")
        new = reverse[key]
        if ".mid_block.attentions.0." in new and new.endswith("weight") and len(value.shape) == 4:
            value = derived(value, lambda a: a[:, :, 0, 0], value.shape[:2], value.dtype)
        out[new] = value
    return out


def unet_config_to_diffusers(config: UNetConfig, sample_size: int) -> dict:
    """A UNetConfig as diffusers' UNet2DConditionModel config.json.

    Raises:
        ValueError: for settings diffusers hard-codes differently (attention norm epsilons).
    """
    defaults = UNetConfig()
    if (config.transformer_norm_eps, config.layer_norm_eps) != (
        defaults.transformer_norm_eps,
        defaults.layer_norm_eps,
    ):
        raise ValueError(
            "diffusers cannot express UNet transformer_norm_eps / layer_norm_eps other than 1e-6 / 1e-5"
        )
    channels = [config.model_channels * m for m in config.channel_mult]
    if config.num_heads is not None:
        heads = config.num_heads
    else:
        heads = [max(1, c // config.head_dim) for c in channels]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)]
    depth = config.transformer_depth
    # diffusers' configs give levels without attention depth 1 (unused), as SDXL's [1, 2, 10].
    depth = [max(d, 1) for d in depth] if isinstance(depth, tuple) else depth
    added = {}
    if config.adm_in_channels is not None:
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": config.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": config.adm_in_channels,
        }
    return {
        **added,
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": config.context_dim,
        "down_block_types": down,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": config.in_channels,
        "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": config.resnet_eps,
        "norm_num_groups": config.norm_groups,
        "out_channels": config.out_channels,
        "sample_size": sample_size,
        "transformer_layers_per_block": depth,
        "up_block_types": up,
        "use_linear_projection": config.use_linear_projection,
    }


def vae_config_to_diffusers(config: VAEConfig, sample_size: int) -> dict:
    """A VAEConfig as diffusers' AutoencoderKL config.json."""
    if config.norm_eps != 1e-6:
        raise ValueError(f"diffusers' AutoencoderKL hard-codes norm eps 1e-6, not {config.norm_eps}")
    levels = len(config.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [config.base_channels * m for m in config.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": config.force_upcast,
        "in_channels": config.in_channels,
        "latent_channels": config.latent_channels,
        "layers_per_block": config.num_res_blocks,
        "norm_num_groups": config.norm_groups,
        "out_channels": config.out_channels,
        "sample_size": sample_size,
        "scaling_factor": config.scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def text_config_to_transformers(config: CLIPTextConfig, tokenizer: CLIPTokenizer) -> dict:
    """A CLIPTextConfig as transformers' CLIPTextModel (or, with a projection,
    CLIPTextModelWithProjection: SDXL's text_encoder_2) config.json."""
    projected = config.projection_dim is not None
    return {
        "architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_act": config.hidden_act,
        "hidden_size": config.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "layer_norm_eps": config.layer_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "projection_dim": config.projection_dim if projected else config.hidden_size,
        "vocab_size": config.vocab_size,
    }


def scheduler_config_to_diffusers(
    config: SchedulerConfig, original: Mapping | None = None, sampler: str | None = None
) -> dict:
    """Scheduler settings as ``scheduler_config.json``.

    Keys of ``original`` we do not model are kept; every key we model is written from
    ``config`` (the core ones always, the others when they differ from our defaults).

    Args:
        config: the schedule and sampler options.
        original: a scheduler_config.json read with the weights, to write back.
        sampler: the model's default sampler; its diffusers class becomes ``_class_name`` and the
            options its name fixes are written (a sampler diffusers lacks keeps ``original``'s class,
            else PNDMScheduler). Steps and guidance are pipeline-call arguments in diffusers, so no
            scheduler file can hold them.
    """
    import dataclasses

    data = dict(original or {})
    data.setdefault("_class_name", "PNDMScheduler")
    fixed = {}
    if sampler is not None and sampler_is_implemented(sampler):
        data["_class_name"], fixed = sampler_to_diffusers(sampler)
        config = dataclasses.replace(config, **fixed)
    data["_diffusers_version"] = data.get("_diffusers_version", _DIFFUSERS_VERSION)
    defaults = SchedulerConfig()
    for f in dataclasses.fields(SchedulerConfig):
        value = getattr(config, f.name)
        if (
            f.name in _SCHEDULER_CORE
            or f.name in data
            or f.name in fixed
            or value != getattr(defaults, f.name)
        ):
            if value is None and f.name not in data:
                continue
            if f.name == "lambda_min_clipped" and value == float("-inf"):
                value = None  # diffusers' own spelling of "no clipping"; JSON has no -inf
            data[f.name] = list(value) if isinstance(value, tuple) else value
    if config.use_flow_sigmas:
        # DPMSolverMultistepScheduler's flow form spells the shift flow_shift and names the prediction.
        data["prediction_type"], data["flow_shift"] = "flow_prediction", data.pop("shift", config.shift)
    else:
        data.pop("use_flow_sigmas", None)
    return data


def write_diffusers_folder(
    folder: pathlib.Path,
    components: Mapping[str, Mapping],
    config: PipelineConfig,
    tokenizer: CLIPTokenizer,
    scheduler: Mapping | None = None,
) -> None:
    """Write a diffusers pipeline folder into the (new, empty) ``folder``.

    SD 1.x / 2.x as StableDiffusionPipeline; SDXL as StableDiffusionXLPipeline with
    ``text_encoder_2`` / ``tokenizer_2`` (the refiner, StableDiffusionXLImg2ImgPipeline, without
    ``text_encoder`` / ``tokenizer``), as diffusers' own folders are laid out.
    """
    factor = config.vae.downsample_factor
    scheduler_json = scheduler_config_to_diffusers(config.scheduler, scheduler, config.default_sampler)
    names = components_of(config)
    family = family_of_config(config)
    pipeline = family.diffusers_pipelines[0]  # the refiner's family: StableDiffusionXLImg2ImgPipeline
    index = {
        "_class_name": pipeline,
        "_diffusers_version": _DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler_json["_class_name"]],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if family.is_sdxl:
        index.update(
            force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt,
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
        )
        if config.requires_aesthetics_score:
            index["requires_aesthetics_score"] = True
    else:
        index.update(
            feature_extractor=[None, None], requires_safety_checker=False, safety_checker=[None, None]
        )
    present = "text_encoder" in names
    index["text_encoder"] = ["transformers", "CLIPTextModel"] if present else [None, None]
    index["tokenizer"] = ["transformers", "CLIPTokenizer"] if present else [None, None]
    tokenizers = {"text_encoder": tokenizer}
    if "text_encoder_2" in names:  # one vocabulary; the second tokenizer pads as config.tokenizer_2 says
        tokenizers["text_encoder_2"] = tokenizer.padded_with(config.tokenizer_2.pad_token_id)
    configs = {
        "unet": unet_config_to_diffusers(config.unet, config.default_size // factor),
        "vae": vae_config_to_diffusers(config.vae, config.default_size),
    }
    tensors = {
        "unet": unet_to_diffusers(components["unet"], config.unet),
        "vae": vae_to_diffusers(components["vae"], config.vae),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in names:
            configs[name] = text_config_to_transformers(getattr(config, name), tokenizers[name])
            tensors[name] = dict(components[name])
    variant = _half_variant(tensors)
    for name in names:
        (folder / name).mkdir()
        _write_json(folder / name / "config.json", configs[name])
        stem = folder / name / _SAFETENSORS_STEM[name]
        # from_pretrained without torch_dtype runs float32 and reads the files without a variant.
        save_safetensors(_as_float32(tensors[name]), f"{stem}.safetensors", {"format": "pt"})
        if variant is not None:
            save_safetensors(tensors[name], f"{stem}.{variant}.safetensors", {"format": "pt"})
    (folder / "scheduler").mkdir()
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_json)
    if present:
        tokenizer.save(folder / "tokenizer")
    if "text_encoder_2" in tokenizers:
        tokenizers["text_encoder_2"].save(folder / "tokenizer_2")
    _write_json(folder / MODEL_INDEX, index)


# Half-precision weights are also written as these diffusers variants (from_pretrained(variant=...)).
HALF_VARIANTS = {np.dtype("float16"): "fp16", BFLOAT16: "bf16"}


def _half_variant(components: Mapping[str, Mapping]) -> str | None:
    """The variant name of the weights' floating dtype if it is a half precision one, else None."""
    dtypes = {
        np.dtype(t.dtype) for tensors in components.values() for t in tensors.values() if is_floating(t.dtype)
    }
    return HALF_VARIANTS.get(dtypes.pop()) if len(dtypes) == 1 else None


def _as_float32(tensors: Mapping) -> dict:
    out = {}
    for key, value in tensors.items():
        dtype = np.dtype(value.dtype)
        if dtype in HALF_VARIANTS:
            value = derived(value, lambda a: np.asarray(a).astype(np.float32), tuple(value.shape), np.float32)
        out[key] = value
    return out


def _write_json(path: pathlib.Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
