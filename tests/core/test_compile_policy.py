"""The CLI's one job is not delayed by a compile it cannot earn back (off unless --compile), and
compiled kernels are cached on disk under the app's cache root."""

import os

from core import __main__ as cli
from core.speed import compile_cache


def test_cli_generate_compiles_only_when_asked(monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    class FakeEngine:
        def __init__(self, spec, fast_config=None):
            seen["compile"] = fast_config.compile
            raise Stop

    import core.engine

    monkeypatch.setattr(core.engine, "Engine", FakeEngine)
    args = ["generate", "--demo", "--image", "assets/astronaut.png", "--prompt", "x", "--out", str(tmp_path / "o.png")]
    for extra, want in (([], False), (["--compile"], True), (["--no-compile"], False)):
        try:
            cli.main(args + extra)
        except Stop:
            pass
        assert seen.pop("compile") is want, extra


def test_compile_cache_lives_under_the_cache_root_unless_set(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_ANYVRAM_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_cache.use_persistent_cache() == tmp_path / "torch-compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.use_persistent_cache() == tmp_path / "mine"
