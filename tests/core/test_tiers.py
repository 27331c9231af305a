"""Which tiers a machine can run: a pure function of the DeviceInfo (and the model's sizes)."""

from core.device import DeviceInfo
from core.job import TIERS
from core.tiers import runnable_tiers


def test_a_cpu_machine_runs_auto_and_cpu_only():
    got = runnable_tiers(DeviceInfo("cpu", "CPU", 0.0, 0.0, True, 30.0))
    assert list(got) == list(TIERS)
    assert got["auto"] is None and got["cpu"] is None
    assert all("CUDA GPU" in got[t] for t in TIERS[2:])


def test_a_24_gb_card_runs_up_to_24():
    card = DeviceInfo("cuda", "RTX 4090", 23.6, 22.0, True, 64.0)
    got = runnable_tiers(card)
    assert [t for t, why in got.items() if why is None] == ["auto", "cpu", "4", "6", "8", "12", "16", "24"]
    assert got["48"] == "needs a 48 GB GPU; this one has 24 GB"


def test_with_the_model_sizes_a_roomy_machine_runs_every_tier(demo_engine):
    sizes = demo_engine.sizes
    roomy = runnable_tiers(DeviceInfo("cuda", "H100", 79.2, 78.0, True, 200.0), sizes)
    assert all(why is None for why in roomy.values())
