"""The full-size FLUX.1-dev + Union architecture with random bf16 weights, built fast:
meta device → to_empty on the GPU → random fill there → moved to the CPU, where plans start from.
Speed and memory do not depend on weight values."""

from __future__ import annotations

import time

import torch

from core.configs import FULL, SCHEDULER, TINY


def _random(make, device, dtype, gen):
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = make()
    m = m.to(dtype).to_empty(device=device)  # cast on the meta device: no fp32 copy on the GPU
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 1 and ("norm" in n or n.endswith("scale")):
                p.fill_(1.0) if ("weight" in n or n.endswith("scale")) else p.zero_()
            else:
                p.normal_(0, 0.02, generator=gen)
        for n, b in m.named_buffers():
            if n.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
    return m.eval()


def build_random_pipeline(size: str = "full", device: str = "cuda", to_cpu: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline, FluxMultiControlNetModel

    from core.configs import constructors
    from core.demo_model import _tokenizers

    cfg = FULL if size == "full" else TINY
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16
    parts = {name: _random(make, device, dt, gen) for name, make in constructors(cfg).items()}
    if to_cpu:
        for m in parts.values():
            m.to("cpu")
        torch.cuda.empty_cache()
    clip_tok, t5_tok = _tokenizers(cfg["max_sequence_length"])
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=clip_tok,
        text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=t5_tok,
        transformer=parts["transformer"],
        controlnet=FluxMultiControlNetModel([parts["controlnet"]]),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, round(time.time() - t0, 1)


PROMPT = "a photo of an astronaut on the moon, detailed, sharp"


def photo(size: int):
    """The benchmarks' input: scikit-image's astronaut, size × size."""
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.LANCZOS)


def random_engine(size: str = "full", device: str = "cuda", info=None):
    """(Engine over the random-weight pipeline, its build seconds): what every benchmark starts from."""
    from core.device import detect
    from core.engine import Engine
    from core.models import ModelSpec

    pipe, build_s = build_random_pipeline(size, device=device)
    return Engine(
        ModelSpec(f"random {size}-size FLUX.1-dev", f"random {size}-size Union"), info or detect(), pipe=pipe
    ), build_s
