import openai
import pytest

from tests.support.servers import API_KEY, start_server, stop_server


@pytest.fixture(scope="package")
def server(redis_url):
    """One `specserve serve` (defaults, a real Redis as its response cache, an API key) for the package's
    tests of the API; tests with options of their own start their own."""
    proc, base, _ = start_server(
        "--max-batch", "8", "--max-queue", "48", "--cache-url", redis_url, "--api-key", API_KEY
    )
    yield base
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
