"""The demo model: a tiny FLUX pipeline and Union ControlNets with random weights.

Built offline from configs (the way diffusers' tests build dummy components), written once as
safetensors to a cache folder and then loaded through the same code as a real model. Its images are
noise: it exists so that the whole app runs and is tested without a GPU or a model hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from core.configs import SCHEDULER, TINY, constructors

DEMO_VERSION = "v1"  # bump when the demo architecture changes: a new folder is built
_lock = threading.Lock()


def cache_root() -> Path:
    return Path(os.environ.get("FLUX_ANYVRAM_CACHE", "~/.cache/flux-anyvram")).expanduser()


def demo_dir() -> Path:
    return cache_root() / "demo" / DEMO_VERSION


def _tokenizers(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [
        "a photo of a cat on a mat with a red hat under a blue sky",
        "an astronaut portrait, a cup of coffee, a rocket on the launch pad, detailed, sharp",
    ]
    tok.train_from_iterator(
        corpus * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    )
    clip = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=77,
    )
    t5 = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_len
    )
    return clip, t5


def build_demo_components(seed: int = 0) -> dict:
    """Random-weight tiny components (fp32, CPU), deterministic for a seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel

    torch.manual_seed(seed)
    clip_tok, t5_tok = _tokenizers(TINY["max_sequence_length"])
    make = constructors(TINY)
    comps = dict(  # built in this order: the weights follow the seed
        transformer=make["transformer"](),
        controlnet=make["controlnet"](),
        controlnet_pro2=FluxControlNetModel(**TINY["controlnet_pro2"]),
        text_encoder=make["text_encoder"](),
        text_encoder_2=make["text_encoder_2"](),
        vae=make["vae"](),
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    )
    # ControlNet blocks are zero-initialised in diffusers; give them weights so that the control
    # visibly changes the demo output (tests rely on it).
    with torch.no_grad():
        for name in ("controlnet", "controlnet_pro2"):
            for n, p in comps[name].named_parameters():
                if "controlnet_blocks" in n or "controlnet_single_blocks" in n or "controlnet_x_embedder" in n:
                    p.normal_(0, 0.3)
    return comps


def ensure_demo_model() -> Path:
    """Write the demo model once (atomically) and return its folder:
    `flux/` (a diffusers FluxPipeline folder), `controlnet-union/` and `controlnet-union-pro2/`."""
    target = demo_dir()
    if (target / "done").exists():
        return target
    with _lock:
        if (target / "done").exists():
            return target
        from diffusers import FluxPipeline

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
        c = build_demo_components()
        FluxPipeline(
            scheduler=c["scheduler"],
            vae=c["vae"],
            text_encoder=c["text_encoder"],
            tokenizer=c["tokenizer"],
            text_encoder_2=c["text_encoder_2"],
            tokenizer_2=c["tokenizer_2"],
            transformer=c["transformer"],
        ).save_pretrained(tmp / "flux", safe_serialization=True)
        c["controlnet"].save_pretrained(tmp / "controlnet-union", safe_serialization=True)
        c["controlnet_pro2"].save_pretrained(tmp / "controlnet-union-pro2", safe_serialization=True)
        (tmp / "done").write_text("random weights: outputs are noise\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        return target
