"""Loading the FLUX base and the Union ControlNet: a Hub id or a local folder, safetensors only.

Offline (`HF_HUB_OFFLINE=1`), without network, or for the gated FLUX.1-dev without an accepted
licence, the user gets one sentence that says what is missing and what to do, not a traceback.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from core.configs import FLUX_DEV, UNION_PRO

log = logging.getLogger(__name__)


class ModelUnavailableError(RuntimeError):
    """The model could not be loaded; the message is one sentence meant for a person."""


@dataclass(frozen=True)
class ModelSpec:
    base: str = FLUX_DEV  # Hub id or local folder of a diffusers FLUX pipeline
    controlnet: str = UNION_PRO  # Hub id or local folder of a FluxControlNetModel (Union)
    demo: bool = False  # the tiny random-weight model
    transformer: str | None = None  # a single .safetensors or .gguf file replacing the base's transformer

    @staticmethod
    def demo_spec(pro2: bool = False) -> ModelSpec:
        from core.demo_model import ensure_demo_model

        root = ensure_demo_model()
        cn = "controlnet-union-pro2" if pro2 else "controlnet-union"
        return ModelSpec(base=str(root / "flux"), controlnet=str(root / cn), demo=True)


def _is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def _explain(source: str, what: str, err: Exception) -> ModelUnavailableError:
    """Turn a hub/OS error into one actionable sentence."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if _is_local(source):
        return ModelUnavailableError(
            f"The {what} folder '{source}' could not be loaded ({type(err).__name__}); check that it holds a "
            f"complete diffusers {what} with .safetensors weights."
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (
        f"download it once with `hf download {source}` on a machine with network, "
        f"or pass a local folder with `--{what} /path/to/folder`"
    )
    if isinstance(err, GatedRepoError) or "gated" in str(err).lower() or "401" in str(err):
        msg = (
            f"The {what} '{source}' is gated: accept its licence on huggingface.co, log in with "
            f"`hf auth login` (or set HF_TOKEN), or pass a local folder with `--{what} /path/to/folder`."
        )
    elif isinstance(err, RepositoryNotFoundError):
        msg = f"The {what} '{source}' is neither a local folder nor a model on the Hugging Face Hub; check the name or the path."
    elif offline:
        msg = f"The {what} '{source}' is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it: {hint}."
    else:
        msg = f"The {what} '{source}' could not be loaded ({type(err).__name__}): {hint}."
    return ModelUnavailableError(msg)


def _check_local(source: str, what: str) -> None:
    p = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not p.is_dir():
        raise ModelUnavailableError(f"The {what} folder '{source}' does not exist.")
    if p.is_dir() and not any(p.rglob("*.safetensors")):
        raise ModelUnavailableError(
            f"The {what} folder '{source}' holds no .safetensors weights; only safetensors are loaded."
        )


def load_or_explain(source: str, what: str, load):
    """load() for a Hub id or local folder; any failure becomes one sentence for the user."""
    from core.monitor import is_oom

    _check_local(source, what)
    try:
        return load()
    except Exception as e:  # hub, network, missing files; out of GPU memory is the caller's to handle
        if is_oom(e):
            raise
        raise _explain(source, what, e) from e


def _onto(device: str) -> dict:
    """from_pretrained's keywords to read the weights onto `device` (the CPU: none, as before)."""
    return {} if device == "cpu" else {"device_map": device}


def load_controlnet(source: str, dtype: torch.dtype, device: str = "cpu"):
    from diffusers import FluxControlNetModel

    on = _onto(device)
    return load_or_explain(
        source,
        "controlnet",
        lambda: FluxControlNetModel.from_pretrained(source, dtype=dtype, use_safetensors=True, **on),
    )


def load_pipeline(spec: ModelSpec, dtype: torch.dtype, device: str = "cpu"):
    """FluxControlNetPipeline in `dtype`, its ControlNet wrapped in a FluxMultiControlNetModel so one
    or several controls take the same path. On the CPU, unless the caller's plan keeps every weight
    on the GPU as it is stored (`device="cuda"`: read straight there, one pass over the files, no
    copy in host RAM); placement is the plan's business (core.placed, core.stream)."""
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    if device != "cpu" and spec.transformer:
        raise ValueError("a transformer file is loaded on the CPU (its weights are converted there)")
    on = _onto(device)
    parts = dict(transformer=load_transformer_file(spec, dtype)) if spec.transformer else {}  # a bad file: at once
    parts["controlnet"] = FluxMultiControlNetModel([load_controlnet(spec.controlnet, dtype, device)])
    pipe = load_or_explain(
        spec.base,
        "model",
        lambda: FluxControlNetPipeline.from_pretrained(spec.base, **parts, dtype=dtype, use_safetensors=True, **on),
    )
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "loaded %s%s + %s in %s on %s%s",
        spec.base,
        f" (transformer from {spec.transformer})" if spec.transformer else "",
        spec.controlnet,
        dtype,
        device,
        " (demo model)" if spec.demo else "",
    )
    return pipe


def load_transformer_file(spec: ModelSpec, dtype: torch.dtype):
    """The transformer from `spec.transformer` (core.checkpoints), with the base model's config."""
    from core.checkpoints import CheckpointError, load_transformer

    _check_local(spec.base, "model")
    try:
        return load_transformer(spec.transformer, spec.base, dtype)
    except CheckpointError as e:
        raise ModelUnavailableError(str(e)) from e
    except OSError as e:  # the base's config is not at hand
        raise _explain(spec.base, "model", e) from e


def union_net(pipe):
    """The single Union ControlNet inside the multi wrapper."""
    return pipe.controlnet.nets[0]


def has_mode_ids(pipe) -> bool:
    """InstantX / Union-Pro take a mode id per control; Union-Pro-2.0 has no mode embedding."""
    return union_net(pipe).config.num_mode is not None
