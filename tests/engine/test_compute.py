"""engine/compute.py: every model pass on one thread, so the engine runs alike whichever thread steps it."""

import json
import os
import subprocess
import sys
import threading

import pytest

from specserve.engine import compute


def test_calls_run_on_one_thread_nested_ones_inline_and_errors_come_back():
    seen = []

    def where(depth: int) -> int:
        seen.append(threading.get_ident())
        return where(depth - 1) + 1 if depth else 0  # nested: must not wait for itself

    assert compute.run(where, 2) == 2
    threads = [threading.Thread(target=compute.run, args=(where, 0)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 1 and threading.get_ident() not in seen

    @compute.on_compute_thread
    def fails():
        raise ValueError("from the compute thread")

    with pytest.raises(ValueError, match="from the compute thread"):
        fails()


# Loads the default pair on the main thread, runs passes there, then steps a generation on the main thread
# and on a new one: voluntary context switches per generated token of each, as JSON.
_SWITCHES = """
import json, resource, sys, threading
from specserve.config import EngineConfig
from specserve.engine.sampling import SamplingParams
from specserve.runtime import LocalRuntime

runtime = LocalRuntime(EngineConfig(), show_progress=False)
ids = runtime.encode_prompt(messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}])
runtime.target.new_sequence().eval(ids[:8])
counts = {}

def generate(label):
    generation = runtime.generate(ids, SamplingParams(max_tokens=24), method="none")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    for _ in generation:
        pass
    counts[label] = (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before) / generation.stats.generated

generate("main")
thread = threading.Thread(target=generate, args=("thread",))
thread.start()
thread.join()
print(json.dumps(counts))
"""


@pytest.mark.models
def test_a_generation_stepped_from_a_new_thread_does_not_sleep_between_kernels():
    """libgomp gives every thread that calls into OpenMP a team of its own, and with more threads than CPUs
    its workers sleep after every parallel region: hundreds of futex sleeps per token (the server's
    scheduler thread ran 0.6x as fast as the thread that loaded the models). In a process of its own (this
    one's threads have run kernels of their own), the models loaded and run from the main thread, a
    generation stepped from another thread must not pay that. Voluntary context switches count the sleeps,
    whatever the machine's speed."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # libgomp's default, as users run it
    done = subprocess.run([sys.executable, "-c", _SWITCHES], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    # each pass handed to the compute thread costs ~2 switches; libgomp's sleeps cost hundreds per token
    assert counts["thread"] < 30 and counts["main"] < 30, counts
