"""Why an 8 GB job that ran out of memory in denoise and completed at the 6 GB plan gives another image
than a fresh 6 GB run (bench/RECOVERY.md, 05b9e41): one engine over the model folder, as the CLI holds
it, under a 5.5 GiB cap.

  X  tier 8: out of memory in denoise, completed at the 6 plan
  Y  tier 6 on the same engine (the prompt cache as X left it)
  Z  tier 6 on the same engine after the prompt cache is emptied
  W  tier 6 on a new engine in this process
Each image's hash and the prompt embeddings' hashes per cache key tell which state carried over.

usage: python -m bench.probes.retry_image --model /tmp/flux-random [--out bench/probes/retry_image.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from bench.env import environment, write

GiB = 2**30


def digest(x) -> str:
    a = x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return hashlib.sha1(a.tobytes()).hexdigest()[:12]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cap", type=float, default=5.5)
    ap.add_argument("--out", type=Path, default=Path("bench/probes/retry_image.json"))
    a = ap.parse_args(argv)
    from bench.random_model import PROMPT, photo
    from core.engine import Engine
    from core.job import ControlSpec, Job
    from core.models import ModelSpec
    from core.speed.fast import FastConfig

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(a.cap * GiB / total)
    spec = ModelSpec(str(a.model / "flux"), str(a.model / "cn"))

    def job(tier):
        return Job(PROMPT, photo(1024), (ControlSpec("canny"),), 1024, 1024, steps=4, seed=7, tier=tier)

    def row(name, engine, res):
        cache = {str(k[-1]): [digest(t) for t in v] for k, v in engine.cache.data.items()}
        r = dict(run=name, ran=res.plan.tier, image=digest(res.image), events=list(res.events), cache=cache)
        r["placement"] = res.plan.summary()["placement"]
        print(json.dumps(r), flush=True)
        return r

    rows, images = [], {}
    e = Engine(spec, fast_config=FastConfig(compile="off"))
    for name, tier, clear in (("X", "8", False), ("Y", "6", False), ("Z", "6", True)):
        if clear:
            e.cache.data.clear()
        res = e.run(job(tier))
        images[name] = np.asarray(res.image)
        rows.append(row(name, e, res))
    e.release()
    del e
    w = Engine(spec, fast_config=FastConfig(compile="off"))
    res = w.run(job("6"))
    images["W"] = np.asarray(res.image)
    rows.append(row("W", w, res))
    equal = {f"{p}={q}": bool(np.array_equal(images[p], images[q])) for p, q in ("XY", "XZ", "XW", "YW", "ZW")}
    print(json.dumps(equal), flush=True)
    write(a.out, dict(env=environment(), command="python -m bench.probes.retry_image", runs=rows, equal=equal))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
