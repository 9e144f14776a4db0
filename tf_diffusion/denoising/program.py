"""One model evaluation and the whole sampling loop, as pure functions of tensors.

A ``DenoiseProgram`` says *what* is computed: a sampler, a denoiser, a guidance rule and the step
hooks (the 4-channel inpainting blend). An executor (``tf_diffusion.denoising.executor``, the sharded
one in ``tf_diffusion.distributed``, the SavedModel export) decides *how*: step by step or fused,
compiled how, on which devices. Both sides meet in the loop inputs, a dict of three groups that an
executor can place without knowing what they hold:

- ``rows``: one row per image (axis 0): ``cond`` and ``uncond`` (``Conditioning.tree()``), and each
  hook's per-image tensors under the hook's name;
- ``per_step``: one entry per model evaluation, then one per image ((E, N, ...)): ``noise`` for
  samplers that add noise while stepping; ``cond`` / ``uncond``: conditioning leaves that change per
  evaluation (``Conditioning.tree()`` names; ControlNet scales), joined to the rows' bundles at step i;
- ``shared``: the same for every image: the sampler's ``tables``, ``timesteps``, ``guidance_scale``
  and each hook's shared tensors under its name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keras import ops

from tf_diffusion.denoising.conditioning import Conditioning


class _TablePlan:
    """A plan view whose tables are tensors (what the samplers' ``step`` reads inside a trace)."""

    def __init__(self, tables):
        self.tables = tables


class MaskBlend:
    """4-channel inpainting: after each evaluation, the known region replaces the unmasked latents.

    The known region is the init image's latents noised to the next evaluation's level (clean after the
    last one), as diffusers' inpaint pipeline does. Rows: ``mask`` (N, h, w, 1), ``image_latents`` and
    ``noise`` (N, h, w, C); shared: ``scales`` (E, 2), the add-noise coefficients after evaluation i.
    """

    name = "mask_blend"

    def __call__(self, x, i, rows, shared):
        # A gather, not a slice: XLA compiles a slice at a traced index once per index value.
        scales = ops.take(shared["scales"], i, axis=0)
        a, b = scales[0], scales[1]
        known = rows["image_latents"] * a + rows["noise"] * b
        return (1.0 - rows["mask"]) * known + rows["mask"] * x


def _at_step(tree, per_step_tree, i):
    """A bundle's rows plus its per-step leaves ((E, N, ...), e.g. ControlNet scales) at evaluation i."""
    if not per_step_tree:
        return tree
    return {**tree, **{k: ops.take(v, i, axis=0) for k, v in per_step_tree.items()}}


def sampler_key(sampler) -> tuple:
    """What distinguishes one sampler's traced step from another's (its class, name, config and options)."""
    return (type(sampler).__name__, sampler.name, sampler.config, tuple(sorted(sampler.options().items())))


@dataclasses.dataclass(frozen=True, eq=False)
class DenoiseProgram:
    """The sampling computation, independent of how it is executed.

    Attributes:
        sampler: a ``tf_diffusion.schedulers`` sampler.
        denoiser: a callable ``(x, t, cond) -> prediction`` (``UNetDenoiser``).
        guidance: a guidance rule (``ClassifierFreeGuidance``, ``NoGuidance``).
        hooks: step hooks applied after each sampler step, in order.

    How the layers run while these functions are traced (compile mode, CPU fast paths, state prepared
    per call) is the executor's choice, made through ``tf_diffusion.execution``'s context.
    """

    sampler: Any
    denoiser: Any
    guidance: Any
    hooks: tuple = ()

    @property
    def key(self) -> tuple:
        """A hashable identity of the traced program: equal keys trace the same function."""
        return (
            sampler_key(self.sampler),
            self.denoiser.key,
            self.guidance.name,
            tuple(h.name for h in self.hooks),
        )

    def step(self, i, x, state, inputs: dict):
        """Evaluation ``i``: denoiser (guided), sampler step, hooks. Returns ``(x, state)``."""
        rows, per_step, shared = inputs["rows"], inputs.get("per_step", {}), inputs["shared"]
        plan = _TablePlan(shared["tables"])
        model_in = self.sampler.scale_model_input(x, i, plan)
        cond = Conditioning.from_tree(_at_step(rows["cond"], per_step.get("cond"), i))
        uncond = (
            Conditioning.from_tree(_at_step(rows["uncond"], per_step.get("uncond"), i))
            if "uncond" in rows
            else None
        )
        batched = self.guidance.batch(cond, uncond)
        model_in = (
            ops.concatenate([model_in] * self.guidance.copies, axis=0)
            if self.guidance.copies > 1
            else model_in
        )
        t = ops.take(shared["timesteps"], i)
        prediction = self.denoiser(model_in, t, batched)
        prediction = self.guidance.combine(prediction, shared.get("guidance_scale", 1.0))
        noise = ops.take(per_step["noise"], i, axis=0) if "noise" in per_step else None
        x, state = self.sampler.step(prediction, i, x, state, plan, noise=noise)
        for hook in self.hooks:
            x = hook(x, i, rows.get(hook.name, {}), shared.get(hook.name, {}))
        return x, state

    def loop(self, x, state, inputs: dict):
        """Every evaluation as one ``ops.fori_loop`` (one program under XLA). Returns ``(x, state)``."""

        def body(i, carry):
            return self.step(i, carry[0], carry[1], inputs)

        return ops.fori_loop(0, ops.shape(inputs["shared"]["timesteps"])[0], body, (x, state))
