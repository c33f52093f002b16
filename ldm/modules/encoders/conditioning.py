"""What every conditioner hands the UNet: a cross-attention context and, for families that have
one (SDXL), a vector added to the time embedding. CFG batches this structure as a whole, so the
guided denoiser never needs to know which family it drives."""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Conditioning:
    context: torch.Tensor                  # (B, tokens, channels) for cross-attention
    vector: Optional[torch.Tensor] = None  # (B, channels) for the UNet's label_emb, or None

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Stack along the batch, e.g. [uncond, cond] for one CFG call."""
        parts = [as_conditioning(p) for p in parts]
        if len({p.vector is None for p in parts}) > 1:
            raise ValueError("cannot batch conditionings with and without a vector")
        vector = None if parts[0].vector is None else torch.cat([p.vector for p in parts])
        return Conditioning(torch.cat([p.context for p in parts]), vector)


def as_conditioning(cond) -> Conditioning:
    """A bare tensor (what SD 1.x/2.x text towers return) is a context without a vector."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)

