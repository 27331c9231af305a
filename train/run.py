"""One training run: load, place, cache the data, find unused parameters, train, validate, checkpoint,
export. The same code on one process or several (`accelerate launch -m train ...`): only the
ControlNet is wrapped for data parallelism; the frozen base runs locally on every process.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.device import detect
from core.engine import OutOfMemory
from core.models import union_net

from . import checkpoint, data, modules
from .config import TrainConfig
from .loss import flow_matching_loss, sample_noise
from .placement import FP8_KEEP_PATTERNS, place, sizes_from_pipeline
from .precision import check_changed, check_finite, check_skips, fingerprint, training_attention
from .validate import Validator, loss_curve

CHANGE_CHECK_STEPS = 2  # weights must have moved after this many optimiser steps


@dataclass
class Faults:
    """Test hooks: a NaN loss at a step; a process that dies after a step (as if killed); infinite
    gradients at some steps."""

    nan_at: int = 0
    kill_after: int = 0
    inf_grad_at: tuple[int, ...] = ()  # steps whose gradient is made infinite


class Killed(BaseException):
    """Raised by Faults.kill_after: nothing is saved or cleaned up, as after a real kill."""


def _log(msg: str, main: bool) -> None:
    if main:
        print(msg, file=sys.stderr, flush=True)


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 131 + rank


def _optimizer(name: str, params, lr: float):
    if name == "adamw8bit":
        import bitsandbytes as bnb  # optional: only the tiers that need it

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    # no weight decay: Union mode rows the run never uses get zero gradients and must stay as they are
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def unused_parameters(transformer, cn, batch, cfg, mode, dtype) -> list[str]:
    """Names of trainable parameters that get no gradient in this job (blocks whose output the
    transformer never reads, e.g. the last double block's text path in a ControlNet without single
    blocks): DDP would wait for them forever ("Expected to have finished reduction...")."""
    sig, noise = sample_noise(batch["latents"], torch.Generator().manual_seed(0))
    with training_attention():
        flow_matching_loss(transformer, cn, batch, sig, noise, cfg.guidance, mode, dtype).backward()
    names = [n for n, p in cn.named_parameters() if p.requires_grad and p.grad is None]
    for p in cn.parameters():
        p.grad = None
    return names


def _place(module, dev, dtype) -> None:
    """Move, and cast only where the dtype differs (diffusers warns about every cast)."""
    module.to(dev)
    if module.dtype != dtype:
        module.to(dtype)


def place_frozen(transformer, dev, dtype, storage: str) -> None:
    """The frozen transformer onto the device, stored as the placement says. fp8 storage is applied on
    the CPU first: moved in bf16 and cast there, the whole bf16 copy (22 GiB at full size) would pass
    through the GPU of a tier that holds only the fp8 one. Every Linear of the blocks is stored in fp8,
    the adaLN modulation ones too (diffusers' default pattern keeps those in bf16: 3 GiB at full size
    that the plan does not hold); the embedders and the final norm and projection stay in bf16."""
    if not storage.startswith("float8"):
        _place(transformer, dev, dtype)
        return
    if transformer.dtype != dtype:
        transformer.to(dtype)
    from diffusers.hooks import apply_layerwise_casting  # the model's method always adds "norm" to the skips

    apply_layerwise_casting(transformer, torch.float8_e4m3fn, dtype, FP8_KEEP_PATTERNS)
    transformer.to(dev)  # no dtype: it would undo the storage


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux


def run(cfg: TrainConfig, faults: Faults | None = None) -> dict:
    from accelerate import Accelerator

    faults = faults or Faults()
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser()
    acc = Accelerator(cpu=cfg.tier == "cpu" or not torch.cuda.is_available())
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    last = checkpoint.latest(out)
    if cfg.resume and last is None:
        raise ValueError(f"--resume found no checkpoint in '{out / 'checkpoints'}'.")
    if not cfg.resume and last is not None:
        raise ValueError(f"'{out}' already holds checkpoints; pass --resume to continue, or choose another --out.")
    if cfg.resume:
        checkpoint.check_same(last, cfg.describe())
    dev_info = detect()
    cuda = acc.device.type == "cuda"
    load_dtype = (
        (torch.bfloat16 if dev_info.bf16 else torch.float32) if cuda else torch.float32 if cfg.demo else torch.bfloat16
    )
    spec, pipe = modules.load(cfg, load_dtype)
    cn = union_net(pipe)
    max_seq = min(512, pipe.tokenizer_2.model_max_length)
    mode = cfg.union_mode if cn.config.num_mode is not None else None
    params = modules.make_trainable(pipe, cfg.lora_rank, cfg.seed)
    n_train = sum(p.numel() for p in params)
    base_n = sum(p.numel() for p in pipe.transformer.parameters())
    cn_frozen = sum(p.numel() for p in cn.parameters()) - n_train  # a LoRA's ControlNet: kept as it is
    placement = place(
        cfg.tier,
        sizes_from_pipeline(pipe, max_seq),
        dev_info,
        n_train,
        base_n,
        cfg.resolution,
        cfg.resolution,
        cfg.batch_size,
        cfg.gradient_checkpointing,
        cfg.optimizer,
        frozen_exact=cn_frozen,
    )
    dtype = getattr(torch, placement.dtype)
    dev = acc.device

    # data: latents and prompt embeddings once (the main process writes the cache, the others read it)
    samples = data.scan(cfg.data)
    params_d = dict(cfg.control_params)
    key = data.fingerprint(samples, cfg.control, params_d, cfg.resolution, f"{spec.base}:{load_dtype}")
    cache = out / "cache" / "latents.safetensors"
    with acc.main_process_first():
        items = data.load_cache(cache, key)
        if items is None:
            for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
                m.to(dev)
            items = data.encode(pipe, samples, cfg.control, params_d, cfg.resolution, cfg.demo, dev, max_seq)
            if main:
                data.save_cache(cache, items, key)
    # the text encoders are not needed for training: off the GPU (the engine encodes validation prompts)
    for m in (pipe.text_encoder, pipe.text_encoder_2):
        m.to("cpu")

    place_frozen(pipe.transformer, dev, dtype, placement.base_storage)
    _place(cn, dev, getattr(torch, placement.trainable_dtype))
    pipe.vae.to(dev)
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
        cn.enable_gradient_checkpointing()

    first = data.collate(items, data.batches(items, cfg.batch_size, cfg.seed, 0)[0])
    first = {k: v.to(dev) for k, v in first.items()}
    unused = unused_parameters(pipe.transformer, cn, first, cfg, mode, dtype)
    for n, p in cn.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    if unused:
        _log(f"frozen {len(unused)} parameters that get no gradient in this job (e.g. {unused[0]})", main)
    named = {n: p for n, p in cn.named_parameters() if p.requires_grad}
    params = list(named.values())
    if not params:
        raise ValueError("No ControlNet parameter receives a gradient in this job; nothing can be trained.")
    optimizer = _optimizer(placement.optimizer, params, cfg.learning_rate)
    ddp_cn, optimizer = acc.prepare(cn, optimizer)

    start, losses, val_log = 0, [], []
    if cfg.resume:
        state = checkpoint.load(last, named, optimizer)
        start, losses, val_log = state["step"], list(state["losses"]), list(state.get("validation", []))
        _log(f"resumed from {last} at step {start}", main)
    validator = None
    if main and cfg.validation_images > 0:
        validator = Validator(spec, pipe, samples, cfg, dev_info)

    def meta() -> dict:
        return dict(config=cfg.describe(), world=world, validation=val_log, unused=unused)

    def save(step: int) -> Path | None:
        acc.wait_for_everyone()
        path = checkpoint.save(out, step, named, optimizer, losses, meta()) if main else None
        acc.wait_for_everyone()
        return path

    def validate(step: int) -> None:
        if validator is not None:
            for p in cn.parameters():
                p.grad = None  # validation runs within what training leaves free
            try:
                val_log.append(dict(step=step, images=validator.run(step, out)))
            except (ValueError, OutOfMemory) as e:  # the engine's sentence; training goes on
                val_log.append(dict(step=step, skipped=str(e)))
                _log(f"validation at step {step} skipped: {e}", main)
        acc.wait_for_everyone()

    before = fingerprint(params)
    epoch_len = len(data.batches(items, cfg.batch_size, cfg.seed, 0, rank, world))
    last_ckpt = str(last) if last else None
    t_loop, done_here = time.perf_counter(), 0
    applied, skipped, skipped_run = 0, [], 0  # optimiser updates made and skipped
    for step in range(start + 1, cfg.steps + 1):
        epoch, pos = divmod(step - 1, epoch_len)
        idx = data.batches(items, cfg.batch_size, cfg.seed, epoch, rank, world)[pos]
        batch = {k: v.to(dev) for k, v in data.collate(items, idx).items()}
        sig, noise = sample_noise(batch["latents"], torch.Generator().manual_seed(_step_seed(cfg.seed, step, rank)))
        with training_attention():
            loss = flow_matching_loss(pipe.transformer, ddp_cn, batch, sig, noise, cfg.guidance, mode, dtype)
            if step == faults.nan_at:
                loss = loss * math.nan
            mean = acc.reduce(loss.detach().clone(), reduction="mean")  # every process stops on a NaN together
            check_finite(mean, step, last_ckpt)
            acc.backward(loss)
        if step in faults.inf_grad_at:
            next(q for q in params if q.grad is not None).grad.fill_(math.inf)
        norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
        if torch.isfinite(torch.as_tensor(norm)).all():
            optimizer.step()
            applied, skipped_run = applied + 1, 0
            if applied == min(CHANGE_CHECK_STEPS, cfg.steps - start):
                check_changed(before, params, applied)
        else:  # clipping by an infinite norm would make every weight NaN: this update is skipped
            skipped.append(step)
            skipped_run += 1
            _log(f"step {step}: the gradient is not finite ({float(norm)}), so its update was skipped", main)
            check_skips(skipped_run, step, last_ckpt)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(mean))
        done_here += 1
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
            per = (time.perf_counter() - t_loop) / done_here
            _log(
                f"step {step}/{cfg.steps} loss {losses[-1]:.4f} {per:.2f} s/step ETA {_eta(per * (cfg.steps - step))}",
                main,
            )
        if faults.kill_after and step == faults.kill_after:
            raise Killed(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            last_ckpt = str(save(step))
        if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.steps:
            validate(step)

    if start < cfg.steps or not (out / "controlnet").is_dir():
        validate(cfg.steps)
        last_ckpt = str(save(cfg.steps))
    exported = out / "controlnet"
    if main:
        modules.export(cn, exported, bool(cfg.lora_rank))
        loss_curve(losses, out / "loss.png")
    n = min(10, len(losses))
    summary = dict(
        steps=cfg.steps,
        resumed_from=start if cfg.resume else None,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        first10_mean=sum(losses[:n]) / n if n else None,
        last10_mean=sum(losses[-n:]) / n if n else None,
        peak_memory_gb=peak_memory_gb(dev.type),
        peak_memory_kind="GPU reserved (GiB)" if cuda else "process RSS (GiB)",
        out=str(exported),
        lora=str(out / "lora.safetensors") if cfg.lora_rank else None,
        checkpoint=last_ckpt,
        trainable_params=sum(p.numel() for p in params),
        skipped_updates=skipped,  # steps whose gradient was not finite
        frozen_unused=unused,
        processes=world,
        placement=placement.summary(),
        validation=val_log,
        seconds=round(time.perf_counter() - t0, 2),
        demo=cfg.demo,
    )
    if main:
        (out / "log.json").write_text(json.dumps(dict(summary, losses=losses, config=cfg.describe()), indent=1))
    acc.wait_for_everyone()
    return summary
