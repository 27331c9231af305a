"""The denoiser's units and what they cost in bytes.

The denoiser (ControlNet + transformer) is cut into *units*: the children of every transformer
block (attention, feed-forward, modulation), at most ~75 M parameters each. A unit's placement
(core.residency) decides where its weights live; the byte arithmetic here is shared by the plan
(core.plan) and the residency, so the memory the plan counts is the memory the residency takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class UnitSize:
    name: str
    numel: int  # all parameters of the unit
    fp8_numel: int  # the part stored as fp8 when the unit is F or Q (Linear weights)


def block_lists(transformer, controlnet) -> list[tuple[str, nn.ModuleList]]:
    """Transformer-block lists in execution order: the ControlNet runs first in every step."""
    out = []
    for prefix, model in (("controlnet", controlnet), ("transformer", transformer)):
        for attr in ("transformer_blocks", "single_transformer_blocks"):
            blocks = getattr(model, attr, None)
            if blocks is not None and len(blocks):
                out.append((f"{prefix}.{attr}", blocks))
    return out


def denoiser_units(transformer, controlnet) -> list[tuple[str, nn.Module]]:
    """(name, module) of every unit, in execution order."""
    units = []
    for prefix, blocks in block_lists(transformer, controlnet):
        for i, block in enumerate(blocks):
            for child_name, child in block.named_children():
                if any(True for _ in child.parameters()):
                    units.append((f"{prefix}.{i}.{child_name}", child))
    return units


def text_encoder_units(t5) -> list[tuple[str, nn.Module]]:
    """The T5 encoder's Linear layers, in execution order (q, k, v, o, wi_0, wi_1, wo per block):
    streamed through the same ring as the denoiser while a prompt is encoded."""
    return [
        (f"text_encoder_2.block.{i}.{n}", m)
        for i, block in enumerate(t5.encoder.block)
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear)
    ]


def fp8_params(module: nn.Module) -> set[int]:
    return {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}


def unit_sizes(units) -> list[UnitSize]:
    out = []
    for name, m in units:
        f8 = fp8_params(m)
        out.append(
            UnitSize(
                name, sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if id(p) in f8)
            )
        )
    return out


def align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


def packed_bytes(numel: int, fp8_numel: int, es: int, fp8: bool) -> int:
    """Bytes of one unit's pack: [fp8 part (aligned) | compute-dtype part]."""
    n8 = fp8_numel if fp8 else 0
    return align(n8) + (numel - n8) * es if n8 else numel * es


def ring_bytes(units: list[UnitSize], placement: str, es: int, ring: int) -> int:
    """The copy ring: `ring` (at least 2) times the largest S/Q pack; 0 if nothing streams."""
    moved = [packed_bytes(u.numel, u.fp8_numel, es, c == "Q") for u, c in zip(units, placement) if c in "SQ"]
    return align(max(moved)) * max(ring, 2) if moved else 0


def work_slots(units: list[UnitSize], placement: str, slots: int) -> tuple[int, int]:
    """(count, elements each) of the compute-dtype work slots F/Q units are cast into."""
    cast = [u.numel for u, c in zip(units, placement) if c in "FQ"]
    return (min(max(slots, 1), len(cast)), max(cast)) if cast else (0, 0)


def buffer_bytes(units: list[UnitSize], placement: str, es: int, slots: int, ring: int) -> int:
    """GPU bytes of the streaming buffers: `slots` work slots of the largest F/Q unit (compute dtype)
    plus the copy ring. The plan sizes its memory with this, Residency its buffers with its parts."""
    n, numel = work_slots(units, placement, slots)
    return n * numel * es + ring_bytes(units, placement, es, ring)
