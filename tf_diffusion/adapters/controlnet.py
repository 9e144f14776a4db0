"""ControlNet as an adapter: a denoiser wrapper plus the conditioning it reads.

``generate(controlnet=..., control_image=...)`` calls ``prepare`` to check the arguments, then hands
the loop three things (docs/architecture.md, "Adding an adapter"):

- the hint images as ``Conditioning`` extras ``control_image_<k>`` (N, H, W, C) in [0, 1], one per
  net, in the rows of the conditional and unconditional bundles, so guidance batches them;
- each net's scale at each evaluation as a per-step conditioning leaf ``control_scale`` (E, N, K):
  ``controlnet_conditioning_scale`` times 0 or 1 for the guidance window, as diffusers computes it,
  and 0 for the unconditional rows in guess mode (diffusers runs the nets on the conditional half
  only and gives the other half zero residuals: the same numbers). Scales and hints are data, so the
  compiled step does not retrace per step, per scale or per image;
- ``ControlNetDenoiser``, which runs every net on the latents, sums their scaled residuals, as
  diffusers' MultiControlNetModel does, and passes them to the UNet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from keras import ops

from tf_diffusion.controlnet import ControlNet, guess_mode_scales
from tf_diffusion.denoising.conditioning import Conditioning

SCALE = "control_scale"
IMAGE = "control_image_{}"


def scaled_residuals(net: ControlNet, down, mid, scale, guess_mode: bool):
    """A net's residuals times its scale (a scalar or one per row), as diffusers' ControlNetModel scales them.

    In guess mode the residuals are also scaled from 0.1 (first) to 1 (middle) on a log scale,
    except for nets with ``global_pool_conditions``.
    """
    scale = ops.cast(ops.convert_to_tensor(scale), "float32")
    if len(scale.shape) == 1:
        scale = ops.reshape(scale, (-1, 1, 1, 1))  # one per row: (B, 1, 1, 1)
    if guess_mode and not net.config.global_pool_conditions:
        factors = guess_mode_scales(len(down))
        down = [d * ops.cast(scale * f, d.dtype) for d, f in zip(down, factors[:-1], strict=True)]
        return down, mid * ops.cast(scale * factors[-1], mid.dtype)
    return [d * ops.cast(scale, d.dtype) for d in down], mid * ops.cast(scale, mid.dtype)


class ControlNetDenoiser:
    """A denoiser that adds the summed residuals of one or several ControlNets to a UNet denoiser.

    Reads ``cond.extras["control_image_<k>"]`` (B, H, W, C) and ``cond.extras["control_scale"]``
    (B, K), and passes every other leaf to the wrapped denoiser. The nets see the latents without
    the inpainting UNet's extra channels, and SDXL's ``text_embeds`` / ``time_ids``, as in diffusers.
    """

    def __init__(self, base, nets: Sequence[ControlNet], guess_mode: bool = False):
        self.base, self.nets, self.guess_mode = base, tuple(nets), bool(guess_mode)
        self.known_extras = (*base.known_extras, SCALE, *(IMAGE.format(k) for k in range(len(self.nets))))

    @property
    def backbone(self):
        return self.base.backbone

    @property
    def unet(self):
        """The backbone (executors read its execution options)."""
        return self.base.unet

    @property
    def key(self):
        return ("controlnet", self.base.key, tuple(id(n) for n in self.nets), self.guess_mode)

    def __call__(self, x, t, cond: Conditioning):
        extras = dict(cond.extras)
        if SCALE not in extras:
            raise ValueError(f"the ControlNet denoiser needs conditioning {SCALE!r} (B, {len(self.nets)})")
        scales = ops.cast(extras.pop(SCALE), "float32")  # (B, K)
        hints = [extras.pop(IMAGE.format(k)) for k in range(len(self.nets))]
        added = {k: extras[k] for k in ("text_embeds", "time_ids") if k in extras}
        t_batch = ops.broadcast_to(t, (ops.shape(x)[0],))
        down_sum = mid_sum = None
        for k, (net, hint) in enumerate(zip(self.nets, hints, strict=True)):
            down, mid = net(x, t_batch, cond.context, hint, **added)
            down, mid = scaled_residuals(net, down, mid, scales[:, k], self.guess_mode)
            if down_sum is None:
                down_sum, mid_sum = list(down), mid
            else:
                down_sum = [a + b for a, b in zip(down_sum, down, strict=True)]
                mid_sum = mid_sum + mid
        return self.base(
            x, t, Conditioning(cond.context, extras), down_residuals=down_sum, mid_residual=mid_sum
        )


@dataclasses.dataclass(frozen=True)
class ControlPlan:
    """The checked ControlNet arguments of one ``generate()`` call.

    Attributes:
        nets: the ControlNets.
        images: one (N, H, W, 3) float32 hint batch in [0, 1] per net, one row per output image.
        scales, starts, ends: per net: ``controlnet_conditioning_scale``, and the guidance window
            as fractions of the evaluations.
        guess_mode: diffusers' guess mode (also on for nets with ``global_pool_conditions``).
    """

    nets: tuple
    images: tuple
    scales: tuple
    starts: tuple
    ends: tuple
    guess_mode: bool

    def extras(self) -> dict:
        """The hint leaves of both conditioning bundles."""
        return {IMAGE.format(k): image for k, image in enumerate(self.images)}

    def step_scales(self, num_evals: int) -> np.ndarray:
        """(E, K): each net's scale at each evaluation, 0 outside its window (diffusers' controlnet_keep)."""
        out = np.zeros((num_evals, len(self.nets)), np.float32)
        for i in range(num_evals):
            for k in range(len(self.nets)):
                outside = i / num_evals < self.starts[k] or (i + 1) / num_evals > self.ends[k]
                out[i, k] = self.scales[k] * (0.0 if outside else 1.0)
        return out

    def per_step(self, num_evals: int, rows: int, guided: bool) -> dict:
        """The per-step conditioning leaves: ``{"cond": {...}, "uncond": {...}}`` of (E, N, K) scales."""
        scales = np.repeat(self.step_scales(num_evals)[:, None, :], rows, axis=1)  # (E, N, K)
        out = {"cond": {f"extra.{SCALE}": scales}}
        if guided:
            uncond = np.zeros_like(scales) if self.guess_mode else scales
            out["uncond"] = {f"extra.{SCALE}": uncond}
        return out

    def denoiser(self, base) -> ControlNetDenoiser:
        return ControlNetDenoiser(base, self.nets, self.guess_mode)

    def infotext(self) -> dict[str, str]:
        """PNG parameter fields ``ControlNet 0``, ``ControlNet 1``, ... as the web UI's ControlNet
        extension writes them (hints are taken as given: ``Module: none``; guess mode is the
        extension's ``ControlNet is more important`` control mode)."""
        from tf_diffusion.infotext import controlnet_unit_text

        mode = "ControlNet is more important" if self.guess_mode else "Balanced"
        return {
            f"ControlNet {k}": controlnet_unit_text(
                {
                    "Module": "none",
                    "Model": model_title(net),
                    "Weight": self.scales[k],
                    "Guidance Start": self.starts[k],
                    "Guidance End": self.ends[k],
                    "Control Mode": mode,
                }
            )
            for k, net in enumerate(self.nets)
        }


def model_title(net: ControlNet) -> str:
    """The net as the ControlNet extension lists it: the file's stem and its short hash
    (``control_v11p_sd15_canny [d14c016b]``); a folder's name alone; ``controlnet`` for a net built
    in memory. The hash is computed once per net."""
    title = getattr(net, "_infotext_title", None)
    if title is None:
        import pathlib

        from tf_diffusion.infotext import legacy_model_hash

        source = getattr(net, "source", None)
        if source is None:
            title = "controlnet"
        else:
            path = pathlib.Path(source)
            try:
                title = path.name if path.is_dir() else f"{path.stem} [{legacy_model_hash(path)}]"
            except (OSError, ValueError):  # moved or deleted since it was loaded: the name alone
                title = path.stem
        # Characters the extension's unit text cannot hold become spaces.
        title = title.replace(",", " ").replace(":", " ")
        net._infotext_title = title
    return title


def _per_net(value, name: str, count: int, check) -> tuple:
    """A number for every net, or a list with one per net."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(
            f"{name} has {len(values)} entries but there are {count} ControlNets; give one per net"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name}={value!r} must be a number or a list of numbers")
        check(float(v))
        out.append(float(v))
    return tuple(out)


def check_net(sd, net, index: int) -> None:
    """Raise if ``net`` (the ``index``-th ControlNet given) cannot run with ``sd``'s UNet, naming the values."""
    if not isinstance(net, ControlNet):
        raise ValueError(
            f"controlnet[{index}] is a {type(net).__name__}; expected a tf_diffusion ControlNet "
            "(tf_diffusion.ControlNet.from_pretrained(path))"
        )
    ours, theirs = sd.config.unet, net.config.unet
    if theirs.context_dim != ours.context_dim:
        raise ValueError(
            f"controlnet[{index}] is for another model family: it reads {theirs.context_dim}-wide text "
            f"context, {sd.config.name} gives {ours.context_dim} (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048)"
        )
    if theirs.adm_in_channels != ours.adm_in_channels:
        raise ValueError(
            f"controlnet[{index}] takes added conditioning adm_in_channels={theirs.adm_in_channels}, "
            f"{sd.config.name}'s UNet adm_in_channels={ours.adm_in_channels}: another model family"
        )
    shape = ("model_channels", "channel_mult", "num_res_blocks")
    if any(getattr(theirs, f) != getattr(ours, f) for f in shape):
        raise ValueError(
            f"controlnet[{index}]'s blocks ({', '.join(f'{f}={getattr(theirs, f)}' for f in shape)}) do not fit "
            f"{sd.config.name}'s UNet ({', '.join(f'{f}={getattr(ours, f)}' for f in shape)})"
        )
    if net.config.hint_factor != sd.config.vae.downsample_factor:
        raise ValueError(
            f"controlnet[{index}] takes hints {net.config.hint_factor}x the latent size; "
            f"{sd.config.name}'s VAE scales by {sd.config.vae.downsample_factor}"
        )
    if net.config.conditioning_channels != 3:
        raise ValueError(
            f"controlnet[{index}] takes {net.config.conditioning_channels}-channel hints; only RGB (3) hints "
            "are supported by generate()"
        )


def prepare(
    sd,
    controlnet,
    control_image,
    scale,
    start,
    end,
    guess_mode: bool,
    *,
    height: int,
    width: int,
    num_prompts: int,
    num_images: int,
) -> ControlPlan | None:
    """Check ``generate()``'s ControlNet arguments; None when no ControlNet is given.

    Raises:
        ValueError: a control image without a net or the reverse, lists of another length than the
            nets, a control image of another size than the output, a net of another family, a
            scale that is not a number, or a guidance window outside 0 <= start < end <= 1.
    """
    from tf_diffusion import images as image_utils

    if controlnet is None:
        if control_image is not None:
            raise ValueError("control_image needs controlnet=...; pass the ControlNet(s) it is for")
        return None
    nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if not nets:
        raise ValueError("controlnet is an empty list; pass a ControlNet or a list of them")
    for k, net in enumerate(nets):
        check_net(sd, net, k)
    if control_image is None:
        raise ValueError(f"controlnet needs control_image=...: one hint image per net ({len(nets)})")
    multi = isinstance(controlnet, (list, tuple))
    if multi:
        if not isinstance(control_image, (list, tuple)) or len(control_image) != len(nets):
            got = len(control_image) if isinstance(control_image, (list, tuple)) else "not a list"
            raise ValueError(
                f"control_image must be a list with one image per ControlNet ({len(nets)}), got {got}"
            )
        images = list(control_image)
    else:
        images = [control_image]

    n = num_prompts * num_images
    batches = []
    for k, image in enumerate(images):
        what = f"control_image[{k}]" if multi else "control_image"
        rgb = image_utils.to_rgb(image, what)  # (k, H, W, 3) in [0, 1]
        if rgb.shape[1:3] != (height, width):
            raise ValueError(
                f"{what} is {rgb.shape[2]}x{rgb.shape[1]} (WxH) but the output is {width}x{height}; "
                "resize the control image to the output size (no silent resizing)"
            )
        # diffusers: one image serves every output image; one per prompt repeats per image of the prompt.
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, n, axis=0)
        elif rgb.shape[0] == num_prompts:
            rgb = np.repeat(rgb, num_images, axis=0)
        else:
            raise ValueError(
                f"{what} holds {rgb.shape[0]} images; give one, or one per prompt ({num_prompts})"
            )
        batches.append(np.ascontiguousarray(rgb, np.float32))

    def finite(name):
        def check(v):
            if not np.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")

        return check

    def unit(name):
        def check(v):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} is outside [0, 1] (a fraction of the steps)")

        return check

    count = len(nets)
    scales = _per_net(scale, "controlnet_conditioning_scale", count, finite("controlnet_conditioning_scale"))
    starts = _per_net(start, "control_guidance_start", count, unit("control_guidance_start"))
    ends = _per_net(end, "control_guidance_end", count, unit("control_guidance_end"))
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        if s >= e:
            raise ValueError(
                f"control_guidance_start {s} must be below control_guidance_end {e}"
                + (f" (net {k})" if multi else "")
            )
    guess = bool(guess_mode) or any(net.config.global_pool_conditions for net in nets)
    return ControlPlan(tuple(nets), tuple(batches), scales, starts, ends, guess)
