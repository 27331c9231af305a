"""Host RAM as a plan sees it: the machine's RAM or its memory cgroup's limit, never the momentary
free memory (the same machine size gives the same plans)."""

import psutil

from core import device
from core.device import GiB, _cgroup_limits, host_ram_limit_gb


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_and_unlimited(tmp_path):
    write(tmp_path / "self", "0::/user.slice/app\n")
    write(tmp_path / "cg/user.slice/app/memory.max", f"{16 * GiB}\n")
    write(tmp_path / "cg/user.slice/memory.max", "max\n")
    assert _cgroup_limits(tmp_path / "cg", tmp_path / "self") == [16 * GiB]


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    write(tmp_path / "self", "4:memory:/docker/abc\n1:cpu:/\n")
    write(tmp_path / "cg/memory/docker/abc/memory.limit_in_bytes", f"{15 * GiB}\n")
    assert _cgroup_limits(tmp_path / "cg", tmp_path / "self") == [15 * GiB]
    write(tmp_path / "cg/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n")
    assert _cgroup_limits(tmp_path / "cg", tmp_path / "self") == []


def test_the_limit_is_the_smaller_of_ram_and_cgroup_and_ignores_free_memory(monkeypatch):
    total = psutil.virtual_memory().total
    monkeypatch.setattr(device, "_cgroup_limits", lambda: [])
    assert host_ram_limit_gb() == round(total / GiB, 1)
    monkeypatch.setattr(device, "_cgroup_limits", lambda: [8 * GiB])
    assert host_ram_limit_gb() == 8.0
    # another program taking memory changes nothing: `available` is not read
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), dict(total=total, available=1))())
    assert host_ram_limit_gb() == 8.0


def test_probes_are_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    """A second process reads the first one's figures: the same job gets the same placement (and the
    same image for a seed) whatever ran on the GPU while a probe measured."""
    calls = []
    monkeypatch.setattr(device, "_measure_h2d", lambda: calls.append("h2d") or 50.93)
    monkeypatch.setattr(device, "_measure_tflops", lambda: calls.append("mm") or 781.4)
    monkeypatch.setattr(device, "_measure_context_gb", lambda: calls.append("ctx") or 0.82)
    monkeypatch.setenv("FLUX_ANYVRAM_CACHE", str(tmp_path))
    path = device.probe_file("NVIDIA H200", 143771 * 2**20)
    assert path.parent == tmp_path / "device" and "H200" in path.name and " " not in path.name
    assert device._probes(path) == (50.9, 781.0, 0.82)
    assert len(calls) == 3
    monkeypatch.setattr(device, "_measure_tflops", lambda: 300.0)  # a later, noisy probe is not run
    assert device._probes(path) == (50.9, 781.0, 0.82) and len(calls) == 3
    path.write_text("{not json")  # a corrupt file is measured again and replaced
    assert device._probes(path) == (50.9, 300.0, 0.82)
    assert device._probes(path) == (50.9, 300.0, 0.82)
    assert device.probe_file("NVIDIA H100", 81559 * 2**20) != path  # another GPU: its own figures


def test_probes_measured_beside_another_process_are_replaced_when_the_gpu_is_free(tmp_path, monkeypatch):
    """Figures measured while another process shares the GPU are used, and kept marked, until a
    process that has the GPU to itself measures again."""
    rate = {"h2d": 13.9}
    shared = {"now": True}
    monkeypatch.setattr(device, "_measure_h2d", lambda: rate["h2d"])
    monkeypatch.setattr(device, "_measure_tflops", lambda: 746.0)
    monkeypatch.setattr(device, "_measure_context_gb", lambda: 0.82)
    monkeypatch.setattr(device, "_gpu_shared", lambda: shared["now"])
    monkeypatch.setenv("FLUX_ANYVRAM_CACHE", str(tmp_path))
    path = device.probe_file("NVIDIA H200", 143771 * 2**20)
    assert device._probes(path) == (13.9, 746.0, 0.82)
    rate["h2d"] = 30.0  # still shared: the kept figures hold (the same plan for every process)
    assert device._probes(path) == (13.9, 746.0, 0.82)
    shared["now"], rate["h2d"] = False, 50.3  # alone: measured again and kept for good
    assert device._probes(path) == (50.3, 746.0, 0.82)
    shared["now"], rate["h2d"] = True, 10.0
    assert device._probes(path) == (50.3, 746.0, 0.82)
