"""bench/bench_first.py on the CPU: `--cpu-smoke` runs every part's children (diffusers, the CLI, the
CLI twice on one compile cache, the app's engine over four jobs) on the tiny model and writes its JSON
and Markdown; the bars' bookkeeping, the time budget and a failing child are checked on their own."""

import json
import time
import types
from pathlib import Path

from bench import bench_first

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_mode_runs_every_part_and_writes_its_results(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the children import bench and core from the working directory
    assert bench_first.main(["--cpu-smoke", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "first.json").read_text())
    assert data["smoke"] and data["bars"] is None and data["job"]["tier"] == "cpu"
    rows = {r["part"]: r for r in data["rows"]}
    assert list(rows) == ["diffusers", "cli", "direct", "cache_cold", "cache_warm", "app"]
    for name, r in rows.items():
        assert r["rc"] == 0, (name, r.get("stderr_tail"))
        assert 0 < r["to_image_s"] <= r["wall_s"], name  # the image was written before the child ended
    d = rows["diffusers"]
    assert d["load_s"] > 0 and d["image_s"] > 0 and d["startup_s"] > 0
    for name in ("cli", "direct", "cache_cold", "cache_warm"):
        r = rows[name]
        assert r["total_s"] > 0 and r["image_s"] > 0 and r["startup_s"] > 0 and "denoise" in r["seconds"]
        assert r["compile_s"] == 0.0 and r["peak_reserved_gb"] is not None  # the CPU compiles nothing
    app = rows["app"]
    assert app["policy"] == "later" and app["load_s"] > 0
    jobs = app["app_jobs"]
    assert [j["job"] for j in jobs] == [1, 2, 3, 4] and [j["seed"] for j in jobs] == [7, 8, 9, 10]
    assert all(j["image_s"] > 0 and isinstance(j["events"], list) for j in jobs)
    assert len(list((tmp_path / "runs" / "app").glob("*.png"))) == 4
    md = (tmp_path / "FIRST.md").read_text()
    assert "| part | rc | wall_s | to_image_s" in md and "| cache_warm | 0 |" in md and "App engine" in md


def test_parts_past_the_budget_are_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(bench_first, "child_environment", lambda: {"device": "cpu"})
    argv = ["--cpu-smoke", "--out-dir", str(tmp_path), "--budget-s", "0", "--parts", "cli,app"]
    assert bench_first.main(argv) == 0
    rows = json.loads((tmp_path / "first.json").read_text())["rows"]
    assert rows == [dict(part="cli", skipped="time budget"), dict(part="app", skipped="time budget")]


def test_a_failing_child_records_its_exit_code_and_stderr(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    a = types.SimpleNamespace(runs=tmp_path, cap_gb=0.0)
    row, objs, _ = bench_first.spawn("bad", "bench.bench_first", ["--child", "nonsense"], a, time.time() + 60)
    assert row["rc"] == 2 and objs == [] and not row["timed_out"]
    assert any("invalid choice" in line for line in row["stderr_tail"])


def job(k, s, compiled=None, peak=40.0, predicted=42.0):
    return dict(job=k, image_s=s, compiled=compiled, peak_reserved_gb=peak, predicted_peak_gb=predicted)


def test_the_bars():
    jobs = [job(1, 9.0), job(2, 12.0, compiled=True), job(3, 4.8, compiled=True), job(4, 4.9, compiled=True)]
    assert bench_first.steady(jobs) == jobs[2:]  # from after the job that paid the compile
    assert bench_first.steady([job(1, 9.0), job(2, 5.0)]) == [job(2, 5.0)]  # none compiled: from job 2
    rows = [
        dict(part="diffusers", rc=0, to_image_s=50.0),
        dict(part="cli", rc=0, to_image_s=45.0),
        dict(part="cache_warm", rc=0, compile_s=3.2, compiled=True),
        dict(part="app", rc=0, app_jobs=jobs),
    ]
    bars = bench_first.judge(rows, 47.5)
    assert {k: v["ok"] for k, v in bars.items()} == {
        "cli_first_image_le_diffusers": True,
        "warm_compile_le_5s": True,
        "app_steady_le_5s": True,
        "app_peak_le_predicted_le_8pct_over": True,  # 42 ≤ 40 × 1.08
    }
    rows[3] = dict(part="app", rc=0, app_jobs=[job(1, 4.0), job(2, 4.0, predicted=39.0)])  # under-predicted
    rows[2] = dict(part="cache_warm", rc=0, compile_s=7.5, compiled=True)
    bars = bench_first.judge(rows, 47.5)
    assert not bars["warm_compile_le_5s"]["ok"] and not bars["app_peak_le_predicted_le_8pct_over"]["ok"]
    assert bars["app_steady_le_5s"]["ok"]
    assert bench_first.judge([dict(part="cli", rc=2)], 47.5) == {}  # nothing to judge without completed runs
