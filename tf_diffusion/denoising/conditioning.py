"""What the denoiser is conditioned on, as one bundle that guidance can batch leaf by leaf."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from keras import ops


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Everything a denoiser reads besides the latents and the timestep; every leaf is batch-major.

    Attributes:
        context: (B, T, D) text hidden states for cross-attention.
        extras: family- and task-specific leaves by name, each (B, ...): ``"concat"`` holds extra input
            channels (B, h, w, k) appended to the latents (the 9-channel inpainting UNet's mask and
            masked-image latents); later families add pooled text embeddings, added time ids, image hints.
            A denoiser reads the names it knows and refuses any other.
    """

    context: Any
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def tree(self) -> dict:
        """The bundle as a plain dict, the form compiled functions take (``from_tree`` inverts it)."""
        return {"context": self.context, **{f"extra.{k}": v for k, v in self.extras.items()}}

    @classmethod
    def from_tree(cls, tree: Mapping) -> Conditioning:
        extras = {k[len("extra.") :]: v for k, v in tree.items() if k.startswith("extra.")}
        return cls(tree["context"], extras)

    @staticmethod
    def concat(bundles) -> Conditioning:
        """Bundles joined along the batch axis, leaf by leaf (all must have the same leaves)."""
        bundles = list(bundles)
        names = set(bundles[0].extras)
        if any(set(b.extras) != names for b in bundles):
            raise ValueError(
                f"cannot batch conditionings with different leaves: {[sorted(b.extras) for b in bundles]}"
            )
        return Conditioning(
            ops.concatenate([b.context for b in bundles], axis=0),
            {k: ops.concatenate([b.extras[k] for b in bundles], axis=0) for k in sorted(names)},
        )
