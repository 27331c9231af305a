"""The plan line under the tier: formats, GPU peak, pinned host RAM and seconds before any run."""

from types import SimpleNamespace

from core.device import DeviceInfo
from core.placed import PlacedPipeline
from core.plan.sizes import sizes_from_config
from ui.plan_view import plan_preview


def engine(ram_gb, q4_file=False):
    dev = DeviceInfo("cuda", "test GPU", 24.0, 23.5, True, ram_gb, 25.0, 150.0, 0.5)
    state = SimpleNamespace(q4_file=q4_file)
    state.precision = lambda asked: PlacedPipeline.precision(state, asked)  # the real rule
    return SimpleNamespace(sizes=sizes_from_config("full"), device=dev, state=state)


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
