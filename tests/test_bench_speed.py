"""bench/bench_speed.py's logic on the CPU (`--cpu-smoke`: the tiny model, compile with the eager
backend, fp8 emulated), in a subprocess because the smoke mode patches core.speed.fast for its process."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_speed_bench_runs_end_to_end_and_writes_its_report(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_speed",
            "--cpu-smoke",
            "--controls",
            "1",
            "--variants",
            "eager,ours_bf16,ours_fp8,diffusers_compile",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "speed_results.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "ours_bf16", "ours_fp8", "diffusers_compile"}
    # diffusers' variant after ours runs plain diffusers modules: the eager backend gives eager's pixels
    assert rows["diffusers_compile"]["mean_abs_diff_vs_eager"] < 0.5
    assert not [r["error"] for r in rows.values() if r.get("error")]
    assert all(r["image_s"] > 0 for r in rows.values())
    assert rows["ours_bf16"]["fast"]["compiled"] and rows["ours_bf16"]["compile_s"] > 0
    assert rows["ours_fp8"]["fast"]["fp8"] and rows["ours_fp8"]["mean_abs_diff_vs_eager"] >= 0
    assert "| ours_fp8 | 1 |" in (tmp_path / "SPEED.md").read_text()
    assert (tmp_path / "speed_side_by_side.png").stat().st_size > 0
