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
