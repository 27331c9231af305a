"""bench/bench_byo.py on the CPU: its LoRA files as core.lora reads them, and `--cpu-smoke` end to end
(the tiny model, in a subprocess as the GPU machine runs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import bench_byo
from core.configs import TINY, constructors
from core.lora import read_lora

ROOT = Path(__file__).resolve().parents[1]


def test_a_lora_file_is_read_by_core_lora_with_every_target(tmp_path):
    tr = constructors(TINY)["transformer"]()
    info = bench_byo.write_lora(tmp_path / "A.safetensors", tr, rank=8, seed=3)
    deltas = read_lora(str(tmp_path / "A.safetensors"))["transformer"]
    assert info["modules"] == len(deltas) == 2 * 12 + 2 * 3  # double blocks: 12 targets, single: q, k, v
    d = deltas["transformer_blocks.0.attn.to_q"]
    assert d.down.shape == (8, 32) and d.up.shape == (32, 8) and d.factor == 1.0  # alpha == rank


def test_the_smoke_mode_runs_every_part_and_writes_its_report(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "bench.bench_byo", "--cpu-smoke", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "byo.json").read_text())
    assert data["errors"] == {} and data["env"]["device"] == "cpu" and data["build_s"] >= 0
    rows = {(r["part"], r["tier"] if "tier" in r else None, r["name"]): r for r in data["rows"]}
    assert not [(k, r.get("error") or r.get("skipped")) for k, r in rows.items() if "error" in r or "skipped" in r]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == len(data["rows"])  # one JSON line per row as it goes

    files = rows[("lora", None, "write LoRA files")]
    assert files["A"]["rank"] == 64 and files["A"]["modules"] == files["B"]["modules"] == 30
    for t in ("48", "8"):
        base = rows[("lora", t, "no LoRA")]
        assert base["ran"] == "cpu" and base["steps"] == 2 and base["loras"] == [] and base["step_s"] > 0
        for name, loras, switch in [
            ("LoRA A", ["A@0.8"], "none → A@0.8"),
            ("LoRA B", ["B@0.8"], "A@0.8 → B@0.8"),
            ("LoRA B, scale 0.5", ["B@0.5"], "B@0.8 → B@0.5"),
        ]:
            r = rows[("lora", t, name)]
            assert r["loras"] == loras and r["switch"] == switch and r["step_s"] > 0
            assert r["switch_s"] == round(r["outside_denoise_s"] - base["outside_denoise_s"], 2)
    assert rows[("steps", "48", "3 steps")]["steps"] == 3

    for qt in ("Q8_0", "Q4_0"):
        assert rows[("gguf", "8", f"write {qt}")]["write_s"] >= 0
        load, job = rows[("gguf", "8", f"{qt} load + warm-up")], rows[("gguf", "8", qt)]
        assert load["load_file_s"] >= 0 and "file_gb" in load and "file_gb" in job
        assert job["formats"]["denoiser"] == "exact" and job["placement"] and job["step_s"] > 0
        assert job["pinned_gb"] == 0 and job["rss_peak_gb"] >= job["rss_gb"] > 0 and job["peak_reserved_gb"] > 0
    md = (tmp_path / "BYO.md").read_text()
    assert "## LoRA (rank 64)" in md and "| Q4_0 |" in md and "| 3 steps | 3 |" in md
