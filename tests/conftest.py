import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def runtime():
    """The default pair on the default backends (`auto`: what this machine measured fastest)."""
    from specserve.config import EngineConfig
    from specserve.runtime import LocalRuntime

    return LocalRuntime(EngineConfig(), show_progress=False)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from specserve.models.fetch import ensure_model

    return ensure_model("smollm2-135m", show_progress=False)


@pytest.fixture(scope="session")
def yarn_model(smollm2_path, tmp_path_factory) -> Path:
    """SmolLM2 with YaRN rope scaling in its metadata: llama.cpp runs it, the torch backends do not."""
    from tests.support.gguf_files import with_metadata

    fields = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 2.0}
    return with_metadata(smollm2_path, tmp_path_factory.mktemp("yarn") / "smollm2-yarn.gguf", fields)


@pytest.fixture(scope="session")
def target_path() -> Path:
    from specserve.models.fetch import ensure_model

    return ensure_model("qwen2.5-coder-1.5b", show_progress=False)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A fresh specserve cache dir for tests of fetching, requantizing and `auto`'s measurements: no models,
    no requantized files, no measurements. The compiled kernels and the choice among their builds are the
    machine's (a link to its cache): keyed by source, compiler and CPU, they are what a fresh cache would
    compile and time again, minutes that test nothing here."""
    from specserve.models.fetch import cache_dir

    kernels = cache_dir() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(kernels, target_is_directory=True)
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def pytest_report_header(config):
    return f"specserve cache: {os.environ.get('SPECSERVE_CACHE', '~/.cache/specserve')}"


@pytest.fixture(scope="session")
def redis_url():
    """URL of a real redis-server shared by the session (fails, not skips, if redis-server is missing)."""
    from tests.support.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def redis_server():
    """A private redis-server for one test, which the test may stop (to simulate Redis going away)."""
    from tests.support.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()
