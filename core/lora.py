"""LoRAs merged into the denoiser's weights on the CPU, before any placement.

A LoRA adds `scale · (alpha/rank) · B @ A` to a Linear's weight. Merging it into the weights (rather
than running it beside them, as PEFT does) is what lets it work on every tier: the plan's fp8 and
streamed packs are made from the merged weights, and a step costs what it costs without the LoRA.

Files are read by diffusers' Flux LoRA reader (`lora_state_dict`), which converts the kohya,
ComfyUI, xlabs and BFL layouts to diffusers' module names; keys prefixed `controlnet.` target the
Union ControlNet. Unmerging is exact: a touched weight is read again from the model's source file
when there is one, or restored from the copy taken before its first merge. A weight an fp8 file's
transformer keeps deferred (core.checkpoints.Fp8Source) is widened to the compute dtype to be
merged, and deferred to the file again when unmerged; fp8 stores then round the merged weights.

The merge runs where it is cheap: `set(..., device=)` computes each delta (B @ A, in full fp32) on
the placement's device and adds it there, wherever the weight lives (a resident weight changes in
place, a CPU one goes there and back). A fresh placement and a re-pack compute the same numbers on
the same device, so a LoRA switched in gives the image a placement made with it from the start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.checkpoints import deferred, placeholder
from core.limits import check

log = logging.getLogger(__name__)

TARGETS = ("transformer", "controlnet")  # the models a LoRA may change; text-encoder keys are skipped


@dataclass(frozen=True)
class LoraSpec:
    path: str  # a .safetensors LoRA file
    scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.path, (str, Path)) or not str(self.path).strip():
            raise ValueError("a LoRA needs the path of its .safetensors file.")
        p = Path(self.path).expanduser()
        if p.suffix.lower() != ".safetensors":
            raise ValueError(f"The LoRA '{self.path}' is not a .safetensors file; only safetensors LoRAs are loaded.")
        if not p.is_file():
            raise ValueError(f"The LoRA file '{self.path}' does not exist.")
        object.__setattr__(self, "path", str(p))
        object.__setattr__(self, "scale", check("lora_scale", self.scale, f"scale of LoRA '{p.name}'"))

    @property
    def name(self) -> str:
        return Path(self.path).name

    def describe(self) -> dict:
        return dict(name=self.name, path=self.path, scale=self.scale)


def parse_lora_arg(arg: str, lora_dir: str | Path | None = None) -> LoraSpec:
    """`FILE[=SCALE]` → LoraSpec; a FILE that is not a path is looked up in `lora_dir`."""
    path, sep, scale = str(arg).rpartition("=")
    if not sep:
        path, scale = arg, "1"
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"--lora takes FILE[=SCALE], got '{arg}'.") from None
    p, folder = Path(path).expanduser(), Path(lora_dir or default_lora_dir()).expanduser()
    if not p.exists() and (folder / path).is_file():
        p = folder / path
    return LoraSpec(str(p), value)


def default_lora_dir() -> Path:
    from core.demo_model import cache_root

    return cache_root() / "loras"


def list_loras(folder: str | Path | None = None) -> tuple[str, ...]:
    """The .safetensors files under `folder` (default: the cache root's loras/), as paths relative to it."""
    root = Path(folder).expanduser() if folder is not None else default_lora_dir()
    if not root.is_dir():
        return ()
    return tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*.safetensors") if p.is_file()))


def loras_from_params(items, lora_dir: str | Path | None = None) -> tuple[tuple[LoraSpec, ...], tuple[str, ...]]:
    """The LoRAs of settings read from a PNG (`job.loras`: [{name, path, scale}]): each at its path if
    it is still there, else by name in `lora_dir`; (specs, names of the ones found nowhere)."""
    from core.limits import clamp

    folder = Path(lora_dir or default_lora_dir()).expanduser()
    specs, missing = [], []
    for it in items if isinstance(items, list) else []:
        if not isinstance(it, dict):
            continue
        name, path = str(it.get("name", "")), str(it.get("path", ""))
        candidates = ([Path(path).expanduser()] if path else []) + ([folder / name] if name else [])
        found = next((p for p in candidates if p.is_file()), None)
        if found is None or found.suffix.lower() != ".safetensors":
            missing.append(name or path)
        else:
            specs.append(LoraSpec(str(found), clamp("lora_scale", it.get("scale", 1.0))))
    return tuple(specs), tuple(missing)


# -- few-step LoRAs: their recommended steps and guidance, offered as suggestions -------------------
@dataclass(frozen=True)
class Preset:
    word: str  # matched case-insensitively in the file name
    steps: int
    guidance: float


PRESETS = (Preset("turbo", 8, 3.5), Preset("hyper", 8, 3.5), Preset("schnell", 4, 0.0))


def suggest(loras) -> dict | None:
    """{"steps", "guidance", "lora"} for the first few-step LoRA among `loras`, else None. A step
    count written in the name ("16steps") wins over the table's."""
    for spec in loras:
        name = spec.name.lower()
        for p in PRESETS:
            if p.word in name:
                m = re.search(r"(\d+)[-_ ]?steps?", name)
                return dict(steps=int(m.group(1)) if m else p.steps, guidance=p.guidance, lora=spec.name)
    return None


# -- reading a file -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    """One Linear's change: weight += factor · up @ down (and bias += factor · bias)."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    factor: float  # alpha / rank (or alpha / sqrt(rank) for rsLoRA)
    bias: torch.Tensor | None = None


def _factor(module: str, rank: int, alphas: dict, meta: dict) -> float:
    if module + ".alpha" in alphas:  # network alphas (kohya-like files diffusers did not convert)
        return float(alphas[module + ".alpha"]) / rank
    if not meta:
        return 1.0  # diffusers' convention without alphas: alpha == rank
    rank = int(meta.get("rank_pattern", {}).get(module, rank))
    alpha = float(meta.get("alpha_pattern", {}).get(module, meta.get("lora_alpha", rank)))
    return alpha / (math.sqrt(rank) if meta.get("use_rslora") else rank)


def read_lora(path: str) -> dict[str, dict[str, Delta]]:
    """{"transformer" | "controlnet": {module name: Delta}} from a LoRA file, in diffusers' names."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    name = Path(path).name
    try:
        sd, alphas, meta = FluxLoraLoaderMixin.lora_state_dict(path, return_alphas=True, return_lora_metadata=True)
    except Exception as e:  # a damaged file or a layout diffusers does not know
        raise ValueError(f"The LoRA '{name}' could not be read ({type(e).__name__}: {str(e)[:80]}).") from e
    if any("lora_magnitude_vector" in k for k in sd):
        raise ValueError(f"The LoRA '{name}' is a DoRA, which cannot be merged here; use a plain LoRA.")
    if sd and "lora_A" not in next(iter(sd)):
        sd = convert_unet_state_dict_to_peft(sd)
    out: dict[str, dict[str, Delta]] = {t: {} for t in TARGETS}
    for key, down in sd.items():
        if ".lora_A." not in key or not key.endswith(".weight"):
            continue
        target, _, module = key.partition(".")
        if target not in TARGETS:
            if target.startswith("text_encoder"):
                continue
            target, module = "transformer", key  # no prefix: the transformer's own names
        module = module.split(".lora_A.")[0]
        up = sd.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            raise ValueError(f"The LoRA '{name}' has no up weight (lora_B) for {module}.")
        prefix = f"{target}."
        m = {k.removeprefix(prefix): v for k, v in (meta or {}).items() if k.startswith(prefix)}
        bias = sd.get(key.replace(".lora_A.weight", ".lora_B.bias"))
        out[target][module] = Delta(down, up, _factor(f"{prefix}{module}", down.shape[0], alphas or {}, m), bias)
    return out


# -- merging ------------------------------------------------------------------------------------
Source = Callable[[str], "torch.Tensor | None"]  # a model's parameter name → its weights as loaded


class Merger:
    """The LoRAs merged into `models` ({"transformer": ..., "controlnet": ...}) now, and how to take
    them out again. `source[model](param)` reads a parameter's original weights (the model's file);
    without one, a parameter is copied once before its first merge (host RAM: its size)."""

    def __init__(self, models: dict[str, nn.Module], sources: dict[str, Source] | None = None):
        self.models = models
        self.sources = sources or {}
        self.loras: tuple[LoraSpec, ...] = ()
        self.touched: frozenset[str] = frozenset()  # "transformer.transformer_blocks.0.attn.to_q.weight"
        self._saved: dict[str, torch.Tensor] = {}
        self._read: dict[str, tuple[tuple, list]] = {}  # path → (file stamp, matches): a scale change reads nothing

    def _param(self, name: str) -> torch.Tensor:
        target, _, pname = name.partition(".")
        return self.models[target].get_parameter(pname)

    def unmerge(self, restored=frozenset()) -> frozenset[str]:
        """Every touched parameter back to its original weights, exactly; returns their names.
        `restored`: parameters the caller already gave their source weights (not read again)."""
        with torch.no_grad():
            for name in self.touched - frozenset(restored):
                target, _, pname = name.partition(".")
                p = self._param(name)
                if getattr(p, "quant_source", None) is not None:  # a file's fp8 weight: deferred to it again
                    p.data = placeholder(p.shape, p.dtype)
                    continue
                src = self.sources.get(target)
                w = src(pname) if src is not None else None
                p.copy_(w if w is not None else self._saved[name])
        done, self.loras, self.touched = self.touched, (), frozenset()
        return done

    def prepare(self, loras) -> list[list[tuple[str, Delta, bool]]]:
        """Read and match every LoRA (raising the one-sentence ValueError of the first that cannot be
        merged) without changing any weight; kept for `set`, so a change of scale reads no file."""
        out, keep = [], {}
        for spec in loras:
            st = Path(spec.path).stat()
            stamp = (st.st_size, st.st_mtime_ns)
            got = self._read.get(spec.path)
            if got is None or got[0] != stamp:
                got = (stamp, self._matches(spec, read_lora(spec.path)))
            keep[spec.path] = got
            out.append(got[1])
        self._read = keep  # only the LoRAs asked for last stay in memory
        return out

    def set(self, loras, device=None, restored=frozenset()) -> frozenset[str]:
        """Merge exactly `loras` (replacing what was merged); returns the names of the parameters
        whose weights changed, the only ones a placement has to pack again. `device`: where the
        deltas are computed and added (default: where each weight is); `restored`: see unmerge."""
        loras = tuple(loras)
        if loras == self.loras:
            return frozenset()
        plan = self.prepare(loras)  # read and check all before changing any
        changed = self.unmerge(restored)
        touched = set()
        at = torch.device(device) if device is not None else None
        with torch.no_grad(), _full_fp32():
            for spec, matches in zip(loras, plan):
                for pname, delta, is_bias in matches:
                    p = self._param(pname)
                    src = deferred(p)
                    if src is not None:  # a file's fp8 weight, widened to take the LoRA (the file restores it)
                        p.data = src.dequantize("cpu", p.dtype)
                    elif getattr(p, "quant_source", None) is not None:
                        pass  # widened by an earlier LoRA of this merge
                    elif pname not in self._saved and self.sources.get(pname.partition(".")[0]) is None:
                        self._saved[pname] = p.detach().to("cpu", copy=True)  # in host RAM, wherever p is
                    _add(p, delta, spec.scale, is_bias, at if at is not None else p.device)
                    touched.add(pname)
        self.loras, self.touched = loras, frozenset(touched)
        log.info("merged %d LoRA(s) into %d parameters", len(loras), len(touched))
        return changed | self.touched

    def _matches(self, spec: LoraSpec, deltas: dict[str, dict[str, Delta]]) -> list[tuple[str, Delta, bool]]:
        """(parameter name, delta, is bias) for every module of `spec` found in the models; a LoRA
        that matches nothing, or whose shapes do not fit, is refused in one sentence."""
        out = []
        for target, mods in deltas.items():
            model = self.models.get(target)
            if model is None:
                continue
            for mod_name, d in mods.items():
                try:
                    lin = model.get_submodule(mod_name)
                except AttributeError:
                    continue
                if not isinstance(lin, nn.Linear):
                    continue
                want = (lin.out_features, lin.in_features)
                if (d.up.shape[0], d.down.shape[1]) != want or d.up.shape[1] != d.down.shape[0]:
                    raise ValueError(
                        f"The LoRA '{spec.name}' does not fit this model: {target}.{mod_name} is {want[0]}×{want[1]}, "
                        f"the LoRA gives {d.up.shape[0]}×{d.down.shape[1]}."
                    )
                out.append((f"{target}.{mod_name}.weight", d, False))
                if d.bias is not None and lin.bias is not None:
                    out.append((f"{target}.{mod_name}.bias", d, True))
        if not out:
            raise ValueError(
                f"The LoRA '{spec.name}' matches no layer of this FLUX transformer or ControlNet; "
                "it may be made for another model."
            )
        return out


def _merged(p: torch.Tensor, delta: Delta, scale: float, is_bias: bool, at: torch.device) -> torch.Tensor:
    """p + factor · scale · (B @ A) (or the bias's) on `at`, in fp32, rounded to p's dtype once; in
    place in one fp32 buffer (a weight's size) beside p's copy on `at`."""
    if is_bias:
        w = delta.bias.to(at).float() * (delta.factor * scale)
    else:
        w = delta.up.to(at).float() @ delta.down.to(at).float()
        w.mul_(delta.factor * scale)
    return w.add_(p.to(at)).to(p.dtype)


def _add(p: torch.Tensor, delta: Delta, scale: float, is_bias: bool, at: torch.device) -> None:
    """p += delta, computed on `at` (p goes there and back if it lives elsewhere): the same numbers
    wherever p lives. Out of memory on a GPU: on the CPU instead."""
    try:
        p.copy_(_merged(p, delta, scale, is_bias, at))
    except torch.OutOfMemoryError:
        if at.type == "cpu":
            raise
        log.warning("no GPU memory to merge a LoRA delta: merged on the CPU")
        p.copy_(_merged(p, delta, scale, is_bias, torch.device("cpu")))


@contextlib.contextmanager
def _full_fp32():
    """fp32 matmuls in full precision (no TF32) while deltas are computed: the merge is exact fp32."""
    was = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(was)


def folder_source(folder: str | Path) -> Source | None:
    """A reader of parameters from a folder's .safetensors files (lazily, one tensor at a time), or
    None where the folder has none."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            index.update(dict.fromkeys(fh.keys(), f))

    def read(name: str):  # a handle per read: tensors of one handle share its (writable) mapping
        f = index.get(name)
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as fh:
            return fh.get_tensor(name)

    return read


def model_sources(base: str, controlnet: str, transformer_file: str | None = None) -> dict[str, Source]:
    """Readers of the transformer's and the ControlNet's original weights: their diffusers folders
    (local, or in the Hub cache: nothing is downloaded). A transformer from a single file has none
    (its keys are converted on load): touched parameters are copied instead."""

    def folder(source: str, sub: str) -> Path | None:
        p = Path(source).expanduser()
        if p.is_dir():
            return p / sub if sub else p
        try:
            from huggingface_hub import snapshot_download

            pattern = f"{sub}/*" if sub else "*"
            local = snapshot_download(source, allow_patterns=[pattern], local_files_only=True)
            return Path(local) / sub if sub else Path(local)
        except Exception:  # noqa: BLE001 - not cached (or no hub at all): restore from copies
            return None

    out = {}
    for target, (source, sub) in dict(transformer=(base, "transformer"), controlnet=(controlnet, "")).items():
        if target == "transformer" and transformer_file:
            continue
        f = folder(source, sub)
        reader = folder_source(f) if f is not None and f.is_dir() else None
        if reader is not None:
            out[target] = reader
    return out
