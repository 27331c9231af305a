"""GPU benchmark of the files a user brings (LoRAs, GGUF transformers) on the full-size model.

Full-size FLUX.1-dev + Union-Pro architecture, random bf16 weights, built once; 1024², one canny
control, one process, compile off. Each tier runs under a cap of N - 0.5 GiB and each new placement
gets a short warm-up job first; s/step is the engine's denoise phase over the steps. Every row is
guarded: a failure records its error (a row past --budget-s: "skipped") and the rest still runs.

  lora   per --lora-tiers tier: s/step without and with a rank-64 random LoRA (diffusers' trainer
         layout), and the switches none → A@0.8 → B@0.8 → B@0.5; switch_s: the job's seconds outside
         denoising less the no-LoRA job's (merge + re-pack; `repack`: units packed again, of all, s)
  steps  tier 48: seconds per image of a --steps job against a --long-steps one
  gguf   the transformer written as GGUF Q8_0 and Q4_0 (quantized on the GPU), loaded by core.checkpoints,
         at --gguf-tier beside the bf16 pipeline's plan: s/step, peak reserved GiB, host RSS (now and
         peak within the row) and pinned GiB, file size, weight formats

usage: python -m bench.bench_byo [--parts lora,steps,gguf] [--lora-tiers 48,8] [--gguf-tier 8] [--steps 8]
                                 [--long-steps 28] [--budget-s 540] [--out-dir bench/byo] [--work-dir DIR]
                                 [--model /tmp/flux-random]   (read from folders, as a user's model is)
       python -m bench.bench_byo --cpu-smoke    # the same code paths on the tiny model, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import FluxControlNetPipeline
from peft import LoraConfig

from bench.env import ensure_model, environment, md_table, write
from bench.random_model import PROMPT, photo, random_engine
from core.checkpoints import load_transformer, write_gguf
from core.denoise.runtime import PromptCache
from core.engine import Engine
from core.job import ControlSpec, Job
from core.lora import LoraSpec
from core.models import ModelSpec
from core.stream.packs import registered_bytes

GiB = 2**30
# the target modules of diffusers' FLUX LoRA trainer (examples/dreambooth/train_dreambooth_lora_flux.py)
LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip


def write_lora(path: Path, transformer, rank: int = 64, seed: int = 0, std: float = 0.01) -> dict:
    """A LoRA trained by nobody: random A and B for every Linear LORA_TARGETS names, saved the way
    diffusers' trainers save one (`transformer.` keys, peft's adapter metadata), which core.lora reads."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS):
            sd[f"{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=g) * std).bfloat16()
            sd[f"{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * std).bfloat16()
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    FluxControlNetPipeline.save_lora_weights(
        path.parent, transformer_lora_layers=sd, transformer_lora_adapter_metadata=cfg.to_dict(), weight_name=path.name
    )
    return dict(file=path.name, rank=rank, modules=len(sd) // 2, file_gb=round(path.stat().st_size / GiB, 3))


# -- host memory ----------------------------------------------------------------------------------
def host_memory() -> dict:
    """GiB of RSS now and at its peak (Linux's VmRSS, VmHWM), and of host memory pinned for CUDA."""
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    gb = lambda k: round(int(kb[k]) / 2**20, 2) if k in kb else None
    return dict(rss_gb=gb("VmRSS"), rss_peak_gb=gb("VmHWM"), pinned_gb=round(registered_bytes() / GiB, 2))


def error(e: BaseException) -> str:
    traceback.print_exc()
    return f"{type(e).__name__}: {str(e)[:300]}"


# -- the benchmark --------------------------------------------------------------------------------
class Bench:
    def __init__(self, a, data: dict, work: Path):
        self.a, self.data, self.work, self.cuda = a, data, work, not a.cpu_smoke
        self.deadline = time.time() + a.budget_s
        if a.model is not None:  # the user's path: read from diffusers folders (a LoRA switch re-reads
            # touched fp8/4-bit units from these files instead of re-placing everything)
            t0 = time.perf_counter()
            if self.cuda:
                ensure_model(a.model)
            self.engine = Engine(ModelSpec(str(a.model / "flux"), str(a.model / "cn")))
            self.engine.load()
            data["build_s"] = round(time.perf_counter() - t0, 1)
        else:
            self.engine, data["build_s"] = random_engine(
                "full" if self.cuda else "tiny", "cuda" if self.cuda else "cpu"
            )
        self.engine.fast = replace(self.engine.fast, compile="off")  # a compile would dwarf every switch
        self.info, self.sync = self.engine.device, torch.cuda.synchronize if self.cuda else lambda: None
        self.job = Job(PROMPT, photo(a.size), (ControlSpec("canny", 0.7, end=0.8),), a.size, a.size, steps=a.steps)

    def cap(self, t: str | None) -> None:
        if self.cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(1.0 if t is None else (float(t) - 0.5) * GiB / total)

    def row(self, part: str, name: str, fn, **info) -> dict:
        """One guarded row: fn() → measurements; a failure is recorded and the benchmark goes on."""
        r = dict(part=part, name=name, **info)
        if time.time() > self.deadline:
            r["skipped"] = f"time budget ({self.a.budget_s:.0f} s)"
        else:
            try:
                with contextlib.suppress(OSError):  # the RSS high-water mark (VmHWM) from now: the row's own
                    Path("/proc/self/clear_refs").write_text("5")
                r.update(fn())
            except Exception as e:  # noqa: BLE001 - a benchmark records failures
                r["error"] = error(e)
        print(json.dumps(r, default=str), flush=True)
        self.data["rows"].append(r)
        report(self.a.out_dir, self.data, self.a)  # both files current after every row
        return r

    def run(self, part, name, tier, base=None, before=None, info=None, **changes) -> dict:
        """A row of one engine job at `tier` (after `before()`, whose dict joins the row); with `base`
        (the no-LoRA job's row), switch_s: what this job spent outside denoising beyond that job."""

        def fn():
            r = before() if before is not None else {}
            self.sync()
            t0 = time.perf_counter()
            res = self.engine.run(self.job.with_(tier=tier if self.cuda else "cpu", **changes))
            self.sync()
            wall, s = time.perf_counter() - t0, res.report["seconds"]
            den, steps = s.get("denoise", 0.0), res.job.steps
            r.update(ran=res.plan.tier, steps=steps, loras=[f"{Path(x.path).stem}@{x.scale}" for x in res.job.loras])
            r.update(wall_s=round(wall, 2), load_s=s.get("load"), denoise_s=den, step_s=round(den / steps, 4))
            r.update(outside_denoise_s=round(wall - den, 2), peak_reserved_gb=res.report["peak_reserved_gb"])
            r.update(formats=res.plan.placement.formats(), repack=self.engine.state.last_repack, events=res.events)
            r.update(placement={k: v for k, v in res.plan.placement.counts().items() if v}, **host_memory())
            if base is not None and "outside_denoise_s" in base:
                r["switch_s"] = round(r["outside_denoise_s"] - base["outside_denoise_s"], 2)
            return r

        return self.row(part, name, fn, tier=tier, **(info or {}))

    def warm(self, part: str, t: str, name: str = "warm-up", before=None) -> dict:
        """A short job from a clean device under tier t's cap (placing is the first job's), the prompt
        encoded again under it; `before()` runs first, inside the row."""

        def prep():
            r = before() if before is not None else {}
            self.engine.release()
            self.cap(t)
            self.engine.cache = PromptCache()
            return r

        return self.run(part, name, t, before=prep, steps=min(2, self.a.steps), loras=())

    def tiers(self, parts: set[str]) -> None:
        """The lora and steps parts: per tier a warm-up, the no-LoRA job, then the LoRA jobs."""
        a, files = self.a, {k: self.work / f"{k}.safetensors" for k in "AB"}
        tiers = a.lora_tiers if "lora" in parts else []
        if "steps" in parts and "48" not in tiers:
            tiers = ["48", *tiers]
        if "lora" in parts:
            tr = self.engine.pipe.transformer
            write = lambda: {k: write_lora(p, tr, a.lora_rank, i) for i, (k, p) in enumerate(files.items())}
            self.row("lora", "write LoRA files", write)
        for t in tiers:
            self.warm("lora", t)
            base = self.run("lora", "no LoRA", t, loras=())
            if "steps" in parts and t == "48":
                self.run("steps", f"{a.long_steps} steps", t, steps=a.long_steps, loras=())
            if "lora" not in parts or t not in a.lora_tiers or not all(p.is_file() for p in files.values()):
                continue
            for name, f, scale, switch in (
                ("LoRA A", "A", 0.8, "none → A@0.8"),
                ("LoRA B", "B", 0.8, "A@0.8 → B@0.8"),
                ("LoRA B, scale 0.5", "B", 0.5, "B@0.8 → B@0.5"),
            ):
                self.run("lora", name, t, base, info=dict(switch=switch), loras=(LoraSpec(str(files[f]), scale),))

    def gguf(self, parts: set[str]) -> None:
        """GGUF transformers at --gguf-tier beside the bf16 pipeline's plan there. Runs last: the
        pipeline's own transformer is dropped once the files are written, so host RAM is the GGUF's."""
        a, t, files = self.a, self.a.gguf_tier, {}
        if "gguf" not in parts:
            return
        if not any(r["name"] == "no LoRA" and r["tier"] == t and "step_s" in r for r in self.data["rows"]):
            self.warm("lora", t)
            self.run("lora", "no LoRA", t, loras=())
        self.engine.release()
        self.cap(None)
        for qt in a.gguf_types:

            def write_file(qt=qt, path=self.work / f"transformer-{qt}.gguf"):
                t0 = time.perf_counter()  # values do not matter for speed: LoRAs merged or not
                write_gguf(self.engine.pipe.transformer.state_dict(), path, qt, device="cuda" if self.cuda else "cpu")
                files[qt] = path
                return dict(write_s=round(time.perf_counter() - t0, 1), file_gb=round(path.stat().st_size / GiB, 3))

            self.row("gguf", f"write {qt}", write_file, tier=t)
        base = self.work / "base"  # the base model's transformer config: all the loader reads of it
        self.engine.pipe.transformer.save_config(base / "transformer")
        parts = {k: v for k, v in self.engine.pipe.components.items() if k != "transformer"}
        self.engine = None  # the bf16 transformer, its LoRA copies and pinned packs go
        gc.collect()
        for qt, path in files.items():
            self.warm("gguf", t, f"{qt} load + warm-up", before=lambda p=path: self.load_gguf(p, base, parts))
            if self.engine is not None:
                self.run("gguf", qt, t, info=dict(file_gb=round(path.stat().st_size / GiB, 3)), loras=())
                self.engine.release()
            self.engine = None
            gc.collect()
            path.unlink(missing_ok=True)  # up to 13 GB

    def load_gguf(self, path: Path, base: Path, parts: dict) -> dict:
        """An engine over the pipeline with its transformer from `path`, read by the loader behind
        `--transformer FILE` (core.models.load_transformer_file calls it once the base folder checks)."""
        t0 = time.perf_counter()
        pipe = FluxControlNetPipeline(**parts, transformer=load_transformer(str(path), str(base), torch.bfloat16))
        pipe.set_progress_bar_config(disable=True)
        self.engine = Engine(ModelSpec(str(base), "random Union", transformer=str(path)), self.info, pipe=pipe)
        self.engine.fast = replace(self.engine.fast, compile="off")
        return dict(load_file_s=round(time.perf_counter() - t0, 1), file_gb=round(path.stat().st_size / GiB, 3))


# -- report ---------------------------------------------------------------------------------------
LORA_COLS = ["tier", "name", "switch", "step_s", "wall_s", "load_s", "switch_s", "repack", "peak_reserved_gb", "note"]
GGUF_COLS = ["name", "step_s", "wall_s", "peak_reserved_gb", "rss_gb", "rss_peak_gb", "pinned_gb", "file_gb",
             "write_s", "load_file_s", "formats", "placement", "note"]  # fmt: skip


def table(rows: list[dict], cols: list[str]) -> str:
    """md_table of `rows` with dicts flattened and an error or a skip in the `note` column."""
    flat = lambda v: ", ".join(f"{k}: {x}" for k, x in v.items()) if isinstance(v, dict) else v
    cells = [{k: flat(v) for k, v in r.items()} | {"note": r.get("error") or r.get("skipped")} for r in rows]
    return md_table(cells, cols)


def report(out_dir: Path, data: dict, a) -> None:
    write(out_dir / "byo.json", data)
    rows, env = data["rows"], data["env"]
    base = lambda t: [r for r in rows if r["name"] == "no LoRA" and r["tier"] == t]
    md = [
        "# Bring your own model: LoRAs and GGUF transformers\n",
        f"- device: {env.get('device')} ({env.get('device_memory_gib')} GiB); torch {env['torch']}, "
        f"diffusers {env['diffusers']}, transformers {env['transformers']}",
        f"- job: {a.size}², one canny control, {a.steps} steps unless said; random-weight model built in "
        f"{data.get('build_s')} s; compile off; each tier under a cap of N - 0.5 GiB; wall {data.get('wall_s')} s",
        f"- command: `{data['command']}`" + "".join(f"; {k}: {v}" for k, v in data["errors"].items()),
        f"\n## LoRA (rank {a.lora_rank}): s/step, and the seconds a switch adds to a job\n",
        table([r for r in rows if r["part"] == "lora"], LORA_COLS),
        "\n## Seconds per image (tier 48, no LoRA)\n",
        table(base("48") + [r for r in rows if r["part"] == "steps"], ["name", "steps", "wall_s", "step_s", "note"]),
        f"\n## GGUF transformers at tier {a.gguf_tier}; `no LoRA`: the bf16 pipeline's plan\n",
        table(base(a.gguf_tier) + [r for r in rows if r["part"] == "gguf"], GGUF_COLS),
        "\nrss_peak_gb: the process's peak RSS since the row began (a load row includes reading the file).",
    ]
    (out_dir / "BYO.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in dict(parts="lora,steps,gguf", lora_tiers="48,8", gguf_tier="8", gguf_types="Q8_0,Q4_0",
                              lora_rank=64, steps=8, long_steps=28, size=1024).items():  # fmt: skip
        ap.add_argument("--" + flag.replace("_", "-"), type=type(default), default=default)
    ap.add_argument("--budget-s", type=float, default=540, help="rows that would start later are skipped")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/byo"))
    ap.add_argument("--model", type=Path, help="read the model from DIR/flux and DIR/cn (written if missing)")
    ap.add_argument("--work-dir", type=Path, help="where the LoRA and GGUF files go (default: a temporary folder)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script, not speed")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        a.size, a.steps, a.long_steps = min(a.size, 64), min(a.steps, 2), min(a.long_steps, 3)
        torch.set_num_threads(1)  # tiny matmuls: threads only spin against each other
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --cpu-smoke)")
    parts = set(a.parts.split(","))
    a.lora_tiers, a.gguf_types = a.lora_tiers.split(","), a.gguf_types.split(",")
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="bench-byo-"))
    for d in (a.out_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    t0, cmd = time.time(), "python -m bench.bench_byo " + " ".join(map(str, sys.argv[1:] if argv is None else argv))
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    data = dict(env=environment(), command=cmd, args=args, rows=[], errors={})
    try:
        b = Bench(a, data, work)
        for part, fn in (("lora+steps", b.tiers), ("gguf", b.gguf)):
            try:
                fn(parts)
            except Exception as e:  # noqa: BLE001 - the next part still runs
                data["errors"][part] = error(e)
    except Exception as e:  # noqa: BLE001 - building the model failed: still write what there is
        data["errors"]["build"] = error(e)
    finally:
        data["wall_s"] = round(time.time() - t0, 1)
        report(a.out_dir, data, a)
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print((a.out_dir / "BYO.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
