"""bench/bench_ram.py's bookkeeping on the CPU: run specs, and what one run's row says about its
memory (the cgroup and NVML parts are faked; the benchmark itself needs the GPU machine)."""

import json
import types

import pytest

from bench import bench_ram


def test_run_specs():
    assert bench_ram.parse_run("8x2@16") == dict(
        spec="8x2@16", tier="8", upscale=2.0, precision="auto", ram_gb=16.0, compile=False
    )
    r = bench_ram.parse_run("48c:exact@24")
    assert (r["tier"], r["compile"], r["precision"], r["ram_gb"]) == ("48", True, "exact", 24.0)
    args = bench_ram.cli_args(r, bench_ram.Path("/m"), bench_ram.Path("/o"), types.SimpleNamespace(steps=8, size=1024))
    assert args[-1] == "--compile" and args[args.index("--tier") + 1] == "48"


@pytest.mark.parametrize("parallel, pid_seen, ok", [(1, True, True), (3, True, False), (3, False, False)])
def test_a_row_judges_the_driver_figure_of_its_own_process(tmp_path, parallel, pid_seen, ok):
    g = tmp_path / "bench-run-0"
    g.mkdir()
    (g / "memory.events").write_text("oom_kill 0\n")
    (g / "memory.peak").write_text(str(12 * 2**30))
    summary = dict(
        plan=dict(tier="8", host_ram_gb=9.6, predicted_peak_gb=6.7, predicted_step_s=0.25, phase_peaks_gb={}),
        seconds=dict(denoise=2.0),
        measured_peak_reserved_gb=6.5,
        phase_peaks_gb={"denoise": 6.5},
    )
    proc = types.SimpleNamespace(pid=4242, returncode=0)
    mine = 7.2 if ok or parallel == 1 else 7.9  # over the 7.5 GiB promise when not ok
    poll = types.SimpleNamespace(
        pid_peak={4242: mine * 2**30, 1: 30 * 2**30} if pid_seen else {},
        peak=mine * 2**30,
        host_peak={g: 0},
        anon_peak={g: 11 * 2**30},
    )
    if parallel == 1:
        poll.pid_peak = {4242: mine * 2**30}
    row = bench_ram.one_row(
        bench_ram.parse_run("8@16"),
        g,
        proc,
        json.dumps(summary),
        "",
        poll,
        parallel,
        60.0,
        types.SimpleNamespace(steps=8),
    )
    assert row["driver_ok"] is ok and row["oom_killed"] is False and row["anon_peak_gb"] == 11.0
    if not pid_seen:
        assert row["driver_process_gb"] is None  # another run's figure is never taken for this one's
    assert row["step_s"] == 0.25 and row["peak_reserved_gb"] == 6.5
