"""Where a training run's weights live and in what precision: one function, `place`, over core's planner.

core.plan.plan_for gives the tier's budget and the inference transients of a validation image at
the training size (its calibrated memory model); this module adds what training keeps resident:
the frozen base, the trainable weights with their gradients and optimiser states, and the
activations of a training step. The first option whose predicted peak fits the budget wins:
AdamW, then 8-bit AdamW (bitsandbytes), then Adafactor, each with the frozen base in bf16 and then
in fp8 storage. On the CPU everything is plain.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, replace

from core.device import DeviceInfo, GiB
from core.plan import JobShape, plan_for
from core.plan.sizes import sizes_from_pipeline  # the one import of core's size counting

# Modules of the frozen transformer left in the compute dtype under fp8 storage: the embedders and the
# final norm and projection (64 M parameters). diffusers' default pattern also skips every module with
# "norm" in its name, which keeps the blocks' adaLN modulation Linears (norm1.linear, norm1_context.linear,
# norm.linear: 3.25 B parameters, 3.0 GiB more at full size) in bf16.
FP8_KEEP_PATTERNS = ("pos_embed", "x_embedder", "context_embedder", "time_text_embed", "norm_out", "^proj_out$")

__all__ = ["TrainPlacement", "place", "sizes_from_pipeline", "OPT_BYTES", "frozen_base_bytes", "FP8_KEEP_PATTERNS"]

# optimiser state bytes per trainable parameter (bf16 params on the GPU: AdamW keeps two bf16 moments)
OPT_BYTES = {"adamw": 4.0, "adamw8bit": 2.0, "adafactor": 0.1}
# One checkpointed block while it is recomputed and back-propagated, in bytes per token per hidden unit
# (bf16). Counted on the CPU at full width (3072, 24 heads), 768 and 1536 tokens, frozen weights: the
# tensors autograd saves are 28.5 B (double block) and 26.4 B (single block); the peak of recompute plus
# backward, inputs included, 35-37 B (double) and 46 B (single). Twice the larger figure leaves room
# for what the GPU's kernels add (flash attention's fp32 dq, cuBLAS workspaces); not yet measured there.
BLOCK_BACKWARD_BYTES = 96.0


@dataclass(frozen=True)
class TrainPlacement:
    device: str  # "cpu" | "cuda"
    dtype: str  # compute dtype
    base_storage: str  # frozen transformer: "float32", "bfloat16" or "float8_e4m3fn"
    trainable_dtype: str  # dtype of the trained weights (the engine validates them in place, unconverted)
    optimizer: str  # "adamw" | "adamw8bit" | "adafactor"
    budget_gb: float
    predicted_peak_gb: float  # training step
    predicted_validation_gb: float  # a validation image while the training state stays resident
    validation_plan: dict  # core's plan for a validation image at the training size
    notes: tuple[str, ...] = ()

    def summary(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def _activation_bytes(sizes, w: int, h: int, batch: int, checkpointing: bool, es: int) -> float:
    img = (w // 16) * (h // 16)
    tokens = img + sizes.max_seq
    n_blocks = sum(1 for u in sizes.units if u.name.endswith(".attn")) or len(sizes.units) // 3
    one_block = BLOCK_BACKWARD_BYTES * (es / 2) * sizes.hidden * tokens  # the block being back-propagated
    residuals = 30.0 * sizes.hidden * es * img  # the ControlNet's residuals, kept for the transformer
    kept = sizes.hidden * es * tokens * n_blocks * (1 if checkpointing else 12)  # block inputs (or all)
    return batch * (one_block + residuals + kept)


def _blocks(units) -> dict[str, int]:
    """Parameters per block ("transformer.transformer_blocks.3": its attention, feed-forwards, modulation)."""
    out: dict[str, int] = {}
    for u in units:
        block = u.name.rsplit(".", 1)[0]
        out[block] = out.get(block, 0) + u.numel
    return out


def frozen_base_bytes(sizes, base_params: int, storage_bytes: int, es: int) -> float:
    """Device bytes of the frozen transformer during a training step. Stored in fp8 (`storage_bytes` 1),
    every Linear layer of its blocks (the units: attention, feed-forwards and the adaLN modulation
    Linears, 3.25 B of the 11.9 B at full size) holds 1 byte per parameter and the rest (embedders,
    final norm and projection, 64 M) stays in `es`; and while a checkpointed block is recomputed and
    back-propagated, autograd keeps the compute-dtype copies of its weights that the casts made (the
    largest block: a double block, 340 M parameters)."""
    if storage_bytes >= es:
        return float(base_params * es)
    base_units = sizes.units[sizes.n_cn_units :]
    cast = min(base_params, sum(u.numel for u in base_units))
    upcast = max(_blocks(base_units).values(), default=0) * es
    return float(cast * storage_bytes + (base_params - cast) * es + upcast)


def _weights_gb(plan, sizes) -> float:
    """Weights core's plan counts as resident when every unit is resident."""
    es = 4 if plan.dtype == "float32" else 2
    n = sum(u.numel for u in sizes.units) + sizes.fixed_params + sizes.vae_params + sizes.clip_params
    n += sizes.t5_params if plan.text_encoders == "gpu" else sizes.t5_params - sizes.t5_unit_params
    return n * es / GiB


def place(
    tier: str,
    sizes,
    device: DeviceInfo,
    trainable: int,
    base_params: int,
    width: int,
    height: int,
    batch: int = 1,
    checkpointing: bool = True,
    optimizer: str = "auto",
    frozen_exact: int = 0,
) -> TrainPlacement:
    """The training placement for a tier, or ValueError in one sentence when nothing fits.
    `trainable`: trained parameters (the whole ControlNet, or a LoRA's); `base_params`: the frozen
    transformer's (stored in fp8 where the tier needs it); `frozen_exact`: frozen parameters kept in
    the compute dtype whatever the base's storage (the ControlNet's, under a LoRA)."""
    shape = JobShape(width, height, 1)
    vplan = plan_for(tier, shape, sizes, device)
    if vplan.device == "cpu":
        opt = "adamw" if optimizer == "auto" else optimizer
        return TrainPlacement(
            "cpu",
            vplan.dtype,
            vplan.dtype,
            vplan.dtype,
            opt,
            0.0,
            0.0,
            0.0,
            vplan.summary(),
            ("everything on the CPU",),
        )
    es = 4 if vplan.dtype == "float32" else 2
    # a validation image's transients (activations, VAE), from core's plan for a GPU that holds it all
    roomy = replace(device, total_gb=1e4, free_gb=1e4)
    ref = plan_for("auto", shape, sizes, roomy)
    transient = max(0.0, ref.predicted_peak_gb - _weights_gb(ref, sizes))
    act = _activation_bytes(sizes, width, height, batch, checkpointing, es)
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    opts = [optimizer] if optimizer != "auto" else ["adamw"] + (["adamw8bit"] if have_bnb else []) + ["adafactor"]
    storages = [(vplan.dtype, es), ("float8_e4m3fn", 1)] if es == 2 else [(vplan.dtype, es)]
    tried = []
    for storage, sb in storages:
        for opt in opts:
            frozen = frozen_base_bytes(sizes, base_params, sb, es)
            frozen += (frozen_exact + sizes.vae_params + sizes.clip_params) * es
            state = trainable * (es + OPT_BYTES[opt])
            peak = (frozen + state + trainable * es + act) / GiB + 0.3  # grads; CUDA workspaces
            val = (frozen + state) / GiB + transient + 0.3  # gradients are freed before validation
            tried.append(peak)
            if max(peak, val) <= vplan.budget_gb:
                notes = [f"trained weights in {vplan.dtype}: the engine validates them in place"]
                if storage.startswith("float8"):
                    notes.append("frozen transformer stored in fp8 (layerwise casting); validated as it is stored")
                return TrainPlacement(
                    "cuda",
                    vplan.dtype,
                    storage,
                    vplan.dtype,
                    opt,
                    vplan.budget_gb,
                    round(peak, 2),
                    round(val, 2),
                    vplan.summary(),
                    tuple(notes),
                )
    raise ValueError(
        f"Training needs at least {min(tried):.1f} GiB at {width}x{height} (batch {batch}) and the {tier} tier "
        f"allows {vplan.budget_gb:.1f} GiB; use a LoRA (--lora-rank) or a smaller rank, a smaller --resolution, or a larger tier."
    )
