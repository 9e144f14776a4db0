"""diffusers / transformers config.json dicts -> our config dataclasses (VAE, text encoder).

The scheduler's translator lives with the samplers: ``tf_diffusion.schedulers.config_from_diffusers``.
"""

from __future__ import annotations

from collections.abc import Mapping

from tf_diffusion.config import CLIPTextConfig, VAEConfig


def _get(data: Mapping, key: str, default):
    value = data.get(key, default)
    return default if value is None else value


def vae_config_from_diffusers(data: Mapping) -> VAEConfig:
    """A diffusers AutoencoderKL config.json -> VAEConfig.

    Raises:
        ValueError: for settings our AutoencoderKL does not implement.
    """
    blocks = list(_get(data, "block_out_channels", [64]))
    base = blocks[0]
    if any(b % base for b in blocks):
        raise ValueError(
            f"block_out_channels={blocks} are not multiples of the first; cannot express as channel_mult"
        )
    for key, allowed in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(_get(data, key, [allowed] * len(blocks)))
        if any(t != allowed for t in types):
            raise ValueError(f"VAE {key}={types} is not supported; only {allowed} blocks are")
    quant = _get(data, "use_quant_conv", True), _get(data, "use_post_quant_conv", True)
    if quant[0] != quant[1]:
        raise ValueError(
            f"VAE use_quant_conv={quant[0]} with use_post_quant_conv={quant[1]} is not supported; "
            "both or neither (SD3)"
        )
    if _get(data, "mid_block_add_attention", True) is False:
        raise ValueError("VAE configs without the mid-block attention are not supported")
    return VAEConfig(
        in_channels=int(_get(data, "in_channels", 3)),
        out_channels=int(_get(data, "out_channels", 3)),
        latent_channels=int(_get(data, "latent_channels", 4)),
        base_channels=int(base),
        channel_mult=tuple(int(b // base) for b in blocks),
        num_res_blocks=int(_get(data, "layers_per_block", 1)),
        norm_groups=int(_get(data, "norm_num_groups", 32)),
        scaling_factor=float(_get(data, "scaling_factor", 0.18215)),
        force_upcast=bool(_get(data, "force_upcast", True)),
        shift_factor=float(_get(data, "shift_factor", 0.0)),
        use_quant_conv=bool(quant[0]),
    )


def clip_config_from_transformers(data: Mapping) -> CLIPTextConfig:
    """A transformers CLIPTextModel config.json -> CLIPTextConfig.

    Raises:
        ValueError: for an activation our text encoder does not implement.
    """
    act = _get(data, "hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"text encoder hidden_act={act!r} is not supported; expected quick_gelu or gelu")
    return CLIPTextConfig(
        vocab_size=int(_get(data, "vocab_size", 49408)),
        max_position_embeddings=int(_get(data, "max_position_embeddings", 77)),
        hidden_size=int(_get(data, "hidden_size", 512)),
        intermediate_size=int(_get(data, "intermediate_size", 2048)),
        num_hidden_layers=int(_get(data, "num_hidden_layers", 12)),
        num_attention_heads=int(_get(data, "num_attention_heads", 8)),
        hidden_act=act,
        layer_norm_eps=float(_get(data, "layer_norm_eps", 1e-5)),
        # Every CLIPTextConfig has a projection_dim; only CLIPTextModelWithProjection (SDXL's
        # text_encoder_2) holds the projection.
        projection_dim=int(_get(data, "projection_dim", 512)) if _with_projection(data) else None,
    )


def _with_projection(data: Mapping) -> bool:
    return "CLIPTextModelWithProjection" in (data.get("architectures") or ())


def sampler_from_diffusers(data: Mapping, class_name: str | None = None) -> str:
    """The sampler diffusers runs for a scheduler_config.json: our sampler name for its class and options.

    The ``_class_name`` picks the sampler class; among the registry names of that class
    (``schedulers.SAMPLERS``) the one whose fixed options equal the file's is taken (a
    ``DPMSolverMultistepScheduler`` with ``use_karras_sigmas: true`` is "dpmpp_2m_karras"). The
    remaining options (``timestep_spacing``, ``use_karras_sigmas`` of Euler, ...) stay in the
    SchedulerConfig read from the same file, which every sampler reads. Where no registry name fits
    (``solver_order: 3``), the class name itself is the sampler: ``get_sampler`` takes it with every
    option from the config. A class tf_diffusion does not implement (``KDPM2DiscreteScheduler``, ...)
    is returned as it is, so that loading works and ``generate()`` without ``scheduler=`` raises an
    error naming it.

    Args:
        data: the parsed ``scheduler/scheduler_config.json``.
        class_name: the scheduler class, if known otherwise (model_index.json's entry, which is
            what diffusers instantiates); default the file's ``_class_name`` (PNDMScheduler if none).

    Returns:
        A name ``schedulers.get_sampler`` takes, or the unimplemented class name.

    Raises:
        ValueError: for options these samplers do not reproduce (``schedulers.config_from_diffusers``).
    """
    from tf_diffusion.schedulers import SAMPLERS, config_from_diffusers

    class_name = class_name or data.get("_class_name") or "PNDMScheduler"
    config = config_from_diffusers(data)
    for name, (cls, fixed) in SAMPLERS.items():
        if cls.diffusers_class == class_name and all(getattr(config, k) == v for k, v in fixed.items()):
            return name
    return str(class_name)


def sampler_is_implemented(name: str) -> bool:
    """Whether ``schedulers.get_sampler`` takes ``name`` (a registry name or an implemented diffusers class)."""
    from tf_diffusion.schedulers import SAMPLERS

    return name in SAMPLERS or any(cls.diffusers_class == name for cls, _ in SAMPLERS.values())


def sampler_to_diffusers(name: str) -> tuple[str, dict]:
    """The diffusers scheduler class of a sampler name and the options the name fixes.

    Raises:
        ValueError: for a name ``schedulers.get_sampler`` does not take.
    """
    from tf_diffusion.schedulers import SAMPLERS

    if name in SAMPLERS:
        cls, fixed = SAMPLERS[name]
        return cls.diffusers_class, dict(fixed)
    if sampler_is_implemented(name):
        return name, {}
    raise ValueError(
        f"sampler {name!r} has no diffusers scheduler class; allowed: {sorted(SAMPLERS)} or their diffusers classes"
    )


# The flow-matching samplers: what SD3 and Flux folders may name.
FLOW_SAMPLERS = ("flow_euler", "flow_heun", "flow_dpmpp_2m", "flow_dpmpp_2m_sde")


def flow_scheduler_from_folder(folder, default_shift: float = 3.0):
    """The schedule and default sampler of an SD3 / Flux diffusers folder.

    ``scheduler/scheduler_config.json`` gives the options (``shift`` ``default_shift`` when the file has
    none, as the released SD3 and Flux files all set it) and model_index.json's scheduler class, else the
    file's ``_class_name``, the sampler, as diffusers instantiates it. No file: FlowMatchEuler.

    Returns:
        ``(SchedulerConfig, sampler name)``.

    Raises:
        ValueError: for a scheduler that is not a flow-matching one (naming the folder, the class and the
            allowed ones), or options the samplers do not reproduce.
    """
    import pathlib

    from tf_diffusion.schedulers import SAMPLERS, config_from_diffusers
    from tf_diffusion.weights.diffusers_folder import _scheduler_class, read_json

    folder = pathlib.Path(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return config_from_diffusers({"shift": default_shift}), "FlowMatchEulerDiscreteScheduler"
    data = read_json(path)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    config = config_from_diffusers({"shift": default_shift, **data})
    sampler = sampler_from_diffusers(data, _scheduler_class(index))
    flow_classes = {SAMPLERS[name][0].diffusers_class for name in FLOW_SAMPLERS}
    if sampler not in FLOW_SAMPLERS and not (
        sampler in flow_classes and sampler != "DPMSolverMultistepScheduler"
    ):
        raise ValueError(
            f"{path}: scheduler {sampler!r} is not a flow-matching scheduler, which this model needs; allowed: "
            f"{sorted(flow_classes - {'DPMSolverMultistepScheduler'})} or DPMSolverMultistepScheduler with "
            "use_flow_sigmas"
        )
    return config, sampler
