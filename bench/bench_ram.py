"""GPU benchmark of the tier promise on the host and in the driver: fresh CLI processes under a memory
cgroup (host RAM, no swap) and an allocator cap, with the driver's figure for the whole process.

Each run is `python -m core generate --tier N [--upscale U] [--precision P]` on the full-size
random-weight model read from a local folder (the real loading code), in its own memory cgroup v2
with memory.max = RAM GiB and memory.swap.max = 0, its allocator capped at N - 0.5 GiB. The page
cache is dropped before each run, so the checkpoint's pages are charged to the run that reads them.
Recorded: exit code and whether the kernel killed it (memory.events oom_kill), the cgroup's peak
(memory.peak), the device memory the driver counts for the process (NVML, polled every 20 ms: used
memory of the device less its use before the run), the plan (pinned host RAM, formats), peak
reserved, s/step and wall time.

usage: python -m bench.bench_ram --model /tmp/flux-random --runs 8@16,6@16,12@16+16@16,8x2@16,8@8
                                 [--steps 8] [--size 1024] [--budget-s 540] [--out-dir bench/ram]
  a run is TIER[c][xUPSCALE][:PRECISION]@RAM_GiB, e.g. 8x2@16, 8:exact@24 or 48c@24 (c: --compile); runs joined by + start
  together (memory figures per process; their s/step shares the bus), groups run one after another.
  The model folder is written (bench.bench_recovery.write_model, in a child process) if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from subprocess import PIPE

from bench.bench_recovery import CAPPED  # a CLI process with its allocator capped
from bench.env import child_environment, ensure_model, md_table, write

GiB = 2**30
ROOT = Path("/sys/fs/cgroup")


def parse_run(spec: str) -> dict:
    head, _, ram = spec.partition("@")
    head, _, precision = head.partition(":")
    tier, _, up = head.partition("x")
    compile_ = tier.endswith("c")  # 48c: the compiled fast path (--compile)
    tier = tier.removesuffix("c")
    return dict(
        spec=spec, tier=tier, upscale=float(up or 1), precision=precision or "auto", ram_gb=float(ram), compile=compile_
    )


def cgroup(name: str, ram_gb: float) -> Path:
    """A memory cgroup v2 of `ram_gb` GiB without swap. Our own processes move to a leaf first: cgroup
    v2 delegates controllers only from a cgroup with no processes of its own."""
    if not (ROOT / "cgroup.controllers").exists():
        raise RuntimeError("no cgroup v2 at /sys/fs/cgroup")
    if "memory" not in (ROOT / "cgroup.subtree_control").read_text():
        leaf = ROOT / "bench-self"
        leaf.mkdir(exist_ok=True)
        for pid in (ROOT / "cgroup.procs").read_text().split():
            try:
                (leaf / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # kernel threads and exited processes stay
        (ROOT / "cgroup.subtree_control").write_text("+memory")
    g = ROOT / name
    if g.exists():
        g.rmdir()
    g.mkdir()
    (g / "memory.max").write_text(str(int(ram_gb * GiB)))
    if (g / "memory.swap.max").exists():
        (g / "memory.swap.max").write_text("0")
    return g


class Poller:
    """Polled every 20 ms while a group of children runs: the device memory the driver counts (the
    whole device's used memory less its use before, and each process's own NVML figure, by pid: the
    parent holds no CUDA context) and each child cgroup's memory and anonymous memory (what cannot be
    dropped: the checkpoint's page cache can)."""

    def __init__(self, groups: list[Path]):
        import pynvml

        self.groups = groups
        self.host_peak = dict.fromkeys(groups, 0)
        self.anon_peak = dict.fromkeys(groups, 0)
        pynvml.nvmlInit()
        self.nv, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.base = pynvml.nvmlDeviceGetMemoryInfo(self.h).used
        self.peak, self.pid_peak = 0, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.nv.nvmlDeviceGetMemoryInfo(self.h).used - self.base)
            for pr in self.nv.nvmlDeviceGetComputeRunningProcesses(self.h):
                self.pid_peak[pr.pid] = max(self.pid_peak.get(pr.pid, 0), pr.usedGpuMemory or 0)
            for g in self.groups:
                try:  # memory.peak is missing before Linux 5.19: poll memory.current too
                    self.host_peak[g] = max(self.host_peak[g], int((g / "memory.current").read_text()))
                    stat = dict(line.split() for line in (g / "memory.stat").read_text().splitlines())
                    anon = int(stat.get("anon", 0)) + int(stat.get("shmem", 0))
                    self.anon_peak[g] = max(self.anon_peak[g], anon)
                except (OSError, ValueError):
                    pass
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def cli_args(r: dict, model: Path, out_dir: Path, a) -> list[str]:
    out = out_dir / f"ram_{r['spec'].replace('@', '_at_').replace(':', '_')}.png"
    return [
        "generate", "--model", str(model / "flux"), "--controlnet", str(model / "cn"), "--image",
        str(out_dir / "input.png"), "--control", "canny", "--prompt", "a photo", "--tier", r["tier"],
        "--upscale", str(r["upscale"]), "--precision", r["precision"], "--steps", str(a.steps), "--seed", "7",
        "--max-side", str(a.size), "--out", str(out), *(["--compile"] if r.get("compile") else []),
    ]  # fmt: skip


def run_group(runs: list[dict], model: Path, out_dir: Path, a) -> list[dict]:
    """Runs started together, each in its own cgroup with its own allocator cap. Memory figures are
    per process (its cgroup, its NVML pid); a group of several shares the bus and the disk, so its
    s/step is not a speed figure (`parallel` says how many ran at once)."""
    subprocess.run(["sync"], check=False)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    groups = [cgroup(f"bench-run-{i}", r["ram_gb"]) for i, r in enumerate(runs)]
    poll = Poller(groups)
    procs, t0 = [], time.time()
    for r, g in zip(runs, groups):
        cap = float(r["tier"]) - 0.5
        cmd = ["sh", "-c", f'echo $$ > {g}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c", CAPPED, str(cap)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        procs.append(
            subprocess.Popen(cmd + cli_args(r, model, out_dir, a), stdout=PIPE, stderr=PIPE, text=True, env=env)
        )
    outs = [p.communicate() for p in procs]
    poll.stop()
    rows = []
    for r, g, p, (stdout, stderr) in zip(runs, groups, procs, outs):
        rows.append(one_row(r, g, p, stdout, stderr, poll, len(runs), round(time.time() - t0, 1), a))
        g.rmdir()
    return rows


def one_row(r, g, p, stdout, stderr, poll, parallel, wall_s, a) -> dict:
    cap = float(r["tier"]) - 0.5
    events = dict(line.split() for line in (g / "memory.events").read_text().splitlines())
    peak = (g / "memory.peak").read_text().strip() if (g / "memory.peak").exists() else str(poll.host_peak[g])
    row = dict(r, rc=p.returncode, parallel=parallel, wall_s=wall_s, oom_killed=int(events.get("oom_kill", 0)) > 0)
    row.update(cgroup_peak_gb=round(int(peak) / GiB, 2), anon_peak_gb=round(poll.anon_peak[g] / GiB, 2))
    proc = poll.pid_peak.get(p.pid)
    if proc is None and parallel == 1:  # NVML reports host pids: without a match the device's figure
        proc = sum(poll.pid_peak.values())
    row.update(driver_process_gb=None if proc is None else round(proc / GiB, 3))
    if parallel == 1:
        row.update(driver_gb=round(poll.peak / GiB, 3))
    figures = [x for x in (row.get("driver_gb"), row["driver_process_gb"]) if x is not None]
    row["driver_ok"] = bool(figures) and max(figures) <= cap
    row["traceback"] = "Traceback" in stderr
    row["stderr_tail"] = stderr.strip().splitlines()[-2:] if p.returncode else []
    if p.returncode == 0:
        s = json.loads(stdout.strip().splitlines()[-1])
        plan = s["plan"]
        row.update(
            ran_tier=plan["tier"],
            precision_used=plan.get("precision"),
            formats=plan.get("formats"),
            host_ram_gb=plan["host_ram_gb"],
            predicted_peak_gb=plan["predicted_peak_gb"],
            peak_reserved_gb=s.get("measured_peak_reserved_gb"),
            predicted_phase_peaks_gb=plan.get("phase_peaks_gb"),
            phase_peaks_gb=s.get("phase_peaks_gb"),
            placement=plan.get("placement"),
            vae_tiling=plan.get("vae_tiling"),
            tile=plan.get("tile"),
            predicted_step_s=plan["predicted_step_s"],
            seconds=s["seconds"],
            step_s=round(s["seconds"]["denoise"] / a.steps, 3)
            if r["upscale"] == 1 and "denoise" in s["seconds"]
            else None,
            events=[e for e in s.get("events", []) if "memory" in e or "RAM" in e or "4-bit" in e],
        )
    print(json.dumps(row), flush=True)
    return row


def nvml_sees_our_pids(timeout_s: float = 30.0) -> bool:
    """Whether NVML reports a child's CUDA context under the pid we know it by (not so in some pid
    namespaces); without that, runs of a group cannot be told apart and go one after another."""
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    code = "import time, torch; torch.zeros(1, device='cuda'); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        t_end = time.time() + timeout_s
        while time.time() < t_end:
            if child.pid in {pr.pid for pr in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}:
                return True
            time.sleep(0.2)
        return False
    finally:
        child.kill()
        child.wait()


def _head() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def probe_alone() -> None:
    """The device probes (core.device) measured by one process with the GPU to itself, before runs
    start together: measured beside each other they read a quarter of the bus (13.9 GiB/s on the
    H200), and the plans of every later run streamed as if the bus were that slow."""
    code = "from core.device import detect; print(detect())"
    subprocess.run([sys.executable, "-c", code], check=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--runs", default="8@16,6@16,12@16,16@16,8x2@16,8@8")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/ram"))
    ap.add_argument("--code", default=_head(), help="the code version the rows are recorded under")
    a = ap.parse_args(argv)
    deadline = time.time() + a.budget_s
    a.out_dir.mkdir(parents=True, exist_ok=True)
    data_file = a.out_dir / "ram.json"
    data = json.loads(data_file.read_text()) if data_file.exists() else dict(runs=[])
    data.update(env=child_environment(), command="python -m bench.bench_ram " + " ".join(argv or sys.argv[1:]))
    ensure_model(a.model)
    from bench.random_model import photo

    photo(a.size).save(a.out_dir / "input.png")
    groups = [g.split("+") for g in filter(None, a.runs.split(","))]
    probe_alone()
    if any(len(g) > 1 for g in groups) and not nvml_sees_our_pids():
        print("NVML does not report our pids: every run on its own", flush=True)
        groups = [[spec] for g in groups for spec in g]
    for group in groups:
        if time.time() > deadline:
            print("skipped (time budget):", group, flush=True)
            continue
        for row in run_group([parse_run(spec) for spec in group], a.model, a.out_dir, a):
            row["code"] = a.code
            data["runs"] = [x for x in data["runs"] if (x["spec"], x.get("code")) != (row["spec"], a.code)] + [row]
        write(data_file, data)
    cols = ["spec", "code", "rc", "oom_killed", "ran_tier", "precision_used", "host_ram_gb", "anon_peak_gb"]
    cols += ["predicted_peak_gb", "peak_reserved_gb", "driver_gb", "driver_process_gb", "driver_ok", "parallel"]
    cols += ["step_s", "wall_s"]
    md = "# Tiers under host-RAM limits, with the driver's figure\n\n"
    md += f"{data['env'].get('device', '')}; `{data['command']}`\n\n" + md_table(data["runs"], cols) + "\n"
    (a.out_dir / "RAM.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
