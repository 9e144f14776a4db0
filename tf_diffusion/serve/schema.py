"""The A1111 API's request bodies: field names and defaults as the AUTOMATIC1111 web UI takes them.

The web UI builds its request models from its processing classes, so a request carries many fields
(hires fix, face restoration, tiling, variation seeds, scripts). Each field here is one of three kinds:

- **used**: prompt, negative_prompt, seed, sampler_name / sampler_index, scheduler, batch_size, n_iter,
  steps, cfg_scale, width, height, override_settings, send_images, save_images, force_task_id; img2img:
  init_images, mask, denoising_strength, mask_blur, inpainting_fill, inpainting_mask_invert, inpaint_full_res,
  inpaint_full_res_padding, resize_mode, include_init_images; ``alwayson_scripts["ControlNet"]`` units
  (``generation.control_units``).
- **refused unless left at its default** (``UNSUPPORTED``): what would change the picture and is not
  implemented here (``enable_hr``, ``restore_faces``, ``tiling``, ``subseed_strength``, ``styles``,
  ``script_name``, always-on scripts other than ControlNet, ``resize_mode`` 3 with a mask, ...): a clear
  422, never a silently different image.
- **accepted and without effect**: sampler fine-tuning that clients send with every request whatever
  the sampler (``eta``, ``s_churn``, ``s_tmax``, ``s_tmin``, ``s_noise``), the hires-fix fields while
  ``enable_hr`` is false, the save flags that ``save_images`` replaces, ``override_settings_restore_afterwards``.

Unknown fields are ignored, as the web UI's models ignore them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=1000)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = 7.0
    width: int = Field(512, ge=1)
    height: int = Field(512, ge=1)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None


class Txt2ImgRequest(_Request):
    """``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = False
    denoising_strength: float | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Request):
    """``POST /sdapi/v1/img2img``."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PNGInfoRequest(BaseModel):
    """``POST /sdapi/v1/png-info``."""

    image: str


class DetectRequest(BaseModel):
    """``POST /controlnet/detect``, as the ControlNet extension takes it (``controlnet_images``: the name
    older clients such as ``webuiapi`` send)."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_images: list[str] = []
    controlnet_processor_res: float = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = []
    low_vram: bool = False


def _off(value) -> bool:
    return value in (None, False, 0, 0.0, "", [], {})


# field -> (what is allowed, a test of the value): anything else is refused with a 422 naming the field.
UNSUPPORTED = {
    "enable_hr": ("false (hires fix is not implemented)", _off),
    "restore_faces": ("false (no face restoration)", _off),
    "tiling": ("false (no tiling)", _off),
    "subseed_strength": ("0 (no variation seeds)", _off),
    "seed_resize_from_h": ("-1 or 0 (no seed resizing)", lambda v: v in (-1, 0)),
    "seed_resize_from_w": ("-1 or 0 (no seed resizing)", lambda v: v in (-1, 0)),
    "styles": ("an empty list (no saved prompt styles)", _off),
    "script_name": ("empty (no scripts; GET /sdapi/v1/scripts lists none)", _off),
    "refiner_checkpoint": ("empty (no refiner)", _off),
    "initial_noise_multiplier": ("1 or null", lambda v: v in (None, 1, 1.0)),
    "image_cfg_scale": (
        "null or the web UI default 1.5 (an instruct-pix2pix setting)",
        lambda v: v in (None, 1.5),
    ),
    "latent_mask": ("null", _off),
}
