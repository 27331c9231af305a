"""The denoiser's units and what they cost in bytes.

The denoiser (ControlNet + transformer) is cut into *units*: the children of every transformer
block (attention, feed-forward, modulation), at most ~75 M parameters each. A unit's placement
(core.stream.residency) decides where its weights live; the byte arithmetic here is shared by the plan
(core.plan.planner) and the residency, so the memory the plan counts is the memory the residency takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from core.checkpoints import native_fp8
from core.plan.placement import Store, store

Q4_BLOCK, Q4_BLOCK_BYTES = 32, 18  # GGUF Q4_0 (core.stream.q4)


@dataclass(frozen=True)
class UnitSize:
    name: str
    numel: int  # all parameters of the unit
    fp8_numel: int  # the part stored as fp8 when the unit is F or Q (Linear weights)
    q4_numel: int = -1  # the part stored as 4-bit when R or N (Linear weights of rows of 32k); -1: as fp8
    fp8_file: bool = False  # its Linear weights are a file's float8_e4m3fn values: as fp8 they are exact

    @property
    def q4_part(self) -> int:
        return self.fp8_numel if self.q4_numel < 0 else self.q4_numel

    def compressed(self, fmt: str) -> int:
        """Elements stored compressed under a format (the rest stays in the compute dtype)."""
        return {"exact": 0, "fp8": self.fp8_numel, "q4": self.q4_part}[fmt]


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


def q4_params(module: nn.Module) -> set[int]:
    """Linear weights whose rows split into whole Q4_0 blocks (so no block spans two rows)."""
    return {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear) and m.in_features % Q4_BLOCK == 0}


def compressed_params(module: nn.Module, fmt: str) -> set[int]:
    """ids of the parameters a format stores compressed."""
    if fmt == "fp8":
        return fp8_params(module)
    return q4_params(module) if fmt == "q4" else set()


def unit_sizes(units) -> list[UnitSize]:
    out = []
    for name, m in units:
        params = list(m.parameters())
        f8, q4 = fp8_params(m), q4_params(m)
        n8 = sum(p.numel() for p in params if id(p) in f8)
        n4 = sum(p.numel() for p in params if id(p) in q4)
        native = bool(f8) and all(native_fp8(p) is not None for p in params if id(p) in f8)
        out.append(UnitSize(name, sum(p.numel() for p in params), n8, n4, native))
    return out


def align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


def part_bytes(n: int, fmt: str, es: int) -> int:
    """Bytes of `n` values stored in a format."""
    if fmt == "q4":
        return n // Q4_BLOCK * Q4_BLOCK_BYTES
    return n * (1 if fmt == "fp8" else es)


def packed_bytes(numel: int, compressed: int, es: int, fmt: str) -> int:
    """Bytes of one unit's pack: [compressed part (aligned) | compute-dtype part]."""
    if not compressed or fmt == "exact":
        return numel * es
    return align(part_bytes(compressed, fmt, es)) + (numel - compressed) * es


def stored_bytes(u: UnitSize, s: Store, es: int) -> int:
    """Bytes one unit takes where it is stored (GPU arena if resident, pinned host arena if streamed),
    as the residency lays it out: every pack starts aligned."""
    return align(packed_bytes(u.numel, u.compressed(s.fmt), es, s.fmt))


def gpu_bytes(u: UnitSize, s: Store, es: int) -> int:
    """GPU bytes of a unit between uses (buffers excluded): plain resident weights are parameters,
    compressed resident ones a pack in the arena."""
    if s.streamed:
        return 0
    return stored_bytes(u, s, es) if s.cast else u.numel * es


def host_bytes(u: UnitSize, s: Store, es: int) -> int:
    """Pinned host bytes of a streamed unit."""
    return stored_bytes(u, s, es) if s.streamed else 0


def ring_bytes(units: list[UnitSize], codes: str, es: int, ring: int) -> int:
    """The copy ring: `ring` (at least 2) times the largest streamed pack; 0 if nothing streams."""
    moved = [stored_bytes(u, s, es) for u, s in zip(units, map(store, codes)) if s.streamed]
    return max(moved) * max(ring, 2) if moved else 0


def work_slots(units: list[UnitSize], codes: str, slots: int) -> tuple[int, int]:
    """(count, elements each) of the compute-dtype work slots compressed units are cast into."""
    cast = [u.numel for u, c in zip(units, codes) if store(c).cast]
    return (min(max(slots, 1), len(cast)), max(cast)) if cast else (0, 0)


def buffer_bytes(units: list[UnitSize], codes: str, es: int, slots: int, ring: int) -> int:
    """GPU bytes of the streaming buffers: `slots` work slots of the largest cast unit (compute dtype)
    plus the copy ring. The plan sizes its memory with this, Residency its buffers with its parts."""
    n, numel = work_slots(units, codes, slots)
    return n * numel * es + ring_bytes(units, codes, es, ring)
