"""The plan line under the tier: formats, GPU peak, pinned host RAM and seconds before any run."""

from types import SimpleNamespace

from core.device import DeviceInfo
from core.engine import Engine
from core.placed import PlacedPipeline
from core.plan.sizes import sizes_from_config
from core.speed.fast import FastConfig
from ui.plan_view import plan_preview


def engine(ram_gb, q4_file=False, gpu_gb=24.0, placed=None):
    dev = DeviceInfo("cuda", "test GPU", gpu_gb, gpu_gb - 0.5, True, ram_gb, 25.0, 150.0, 0.5)
    state = SimpleNamespace(q4_file=q4_file, placed=placed)
    state.precision = lambda asked: PlacedPipeline.precision(state, asked)  # the real rule
    fake = SimpleNamespace(sizes=sizes_from_config("full"), device=dev, state=state)
    fake.fast = FastConfig(compile="later")  # the web app's policy, by the engine's own rule
    fake.fast_in_use = fake.fast
    fake.compile_args = lambda choice="auto": Engine.compile_args(fake, choice)
    return fake


def test_the_line_names_formats_memory_ram_and_seconds():
    line = plan_preview(engine(64.0), "8", "auto", (1024, 1024), 1, "1", 28)
    assert line.startswith("**Plan:** denoiser ") and "4-bit" not in line
    assert "GPU peak" in line and "of 7.0 GiB" in line and "pinned RAM" in line and "s/step" in line
    small = plan_preview(engine(16.0), "8", "auto", (1024, 1024), 1, "1", 28)
    assert "4-bit" in small and "of 11.4 GiB allowed" in small  # a 16 GB machine: 4-bit where exact does not fit


def test_exact_on_a_small_machine_is_the_planner_sentence():
    line = plan_preview(engine(16.0), "8", "exact", (1024, 1024), 1, "1", 28)
    assert line.startswith("⚠️ The 8 tier") and "host RAM" in line


def test_a_q4_0_gguf_previews_in_4_bit_and_the_cpu_says_so(demo_engine):
    assert "4-bit" in plan_preview(engine(64.0, q4_file=True), "8", "auto", (1024, 1024), 1, "1", 28)
    assert "on the CPU" in plan_preview(demo_engine, "auto", "auto", (512, 512), 1, "1", 4)


def test_before_the_first_job_the_line_says_how_long_the_first_image_takes(monkeypatch, tmp_path):
    import re

    from core.plan.first_job import COMPILE_COLD_S

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold compile cache
    big = engine(128.0, gpu_gb=80.0)  # the whole model resident: the fast path
    auto = plan_preview(big, "auto", "auto", (1024, 1024), 1, "1", 28)
    first = re.search(r"first image ~(\d+) s \(weights read and placed ~(\d+) s\)", auto)
    assert first and int(first[1]) > int(first[2]) > 0, auto  # the first job runs eager: no compile
    always = plan_preview(big, "auto", "auto", (1024, 1024), 1, "1", 28, compile="always")
    cold = round(COMPILE_COLD_S)  # the plan's cold compile (core.plan.first_job)
    got = re.search(rf"first image ~(\d+) s \(weights read and placed ~\d+ s, compiling ~{cold} s\)", always)
    assert got and int(got[1]) == int(first[1]) + cold, always
    streamed = plan_preview(engine(64.0), "8", "auto", (1024, 1024), 1, "1", 28, compile="always")
    assert "first image" in streamed and "compiling" not in streamed  # a streamed plan never compiles
    placed = plan_preview(engine(128.0, gpu_gb=80.0, placed=object()), "auto", "auto", (1024, 1024), 1, "1", 28)
    assert "first image" not in placed  # the weights are on the GPU already
