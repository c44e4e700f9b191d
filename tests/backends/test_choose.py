"""`auto`: the pick among measured backends, and measuring a backend in a process of its own."""

import subprocess
import sys
from subprocess import PIPE

import pytest

from specserve.backends.choose import Choice, Measured, choose, measure_in_child
from specserve.backends.choose.pick import (
    BUSY_WHEN_MEASURED,
    mean_ms_per_token,
    measured_while_busy,
    pick_draft,
    pick_target,
)
from specserve.engine.costs import DRAFT_ROWS


def table(one_ms, *ratios):
    return {n: one_ms / 1000 * r for n, r in enumerate((1.0, *ratios), start=1)}


DRAFT = Measured("torch-q4", "draft.gguf", seconds={1: 0.018, 2: 0.019, 32: 0.2})
# shapes as measured on the AMD kind (AVX2, 2 cores)
LLAMA_FILE = Measured("llama.cpp", "t.gguf", table(85, 1.55, 2.2, 2.3, 3.0, 3.3, 3.7, 5.6, 5.9), exact=[1, 2, 3])
LLAMA_Q4_0 = Measured(
    "llama.cpp", "t-Q4_0.gguf", table(75, 1.6, 2.3, 2.2, 3.0, 3.5, 4.1, 4.1, 4.8), exact=list(range(1, 10))
)
Q4 = Measured("torch-q4", "t.gguf", table(60, 1.05, 1.1, 1.25, 1.5, 1.7, 1.9, 2.1, 2.4), exact=list(range(1, 10)))
INT8 = Measured(
    "torch-int8", "t.gguf", table(104, 1.0, 1.03, 1.1, 1.15, 1.16, 1.1, 1.24, 1.39), exact=list(range(1, 10))
)


def test_the_target_with_cheap_exact_windows_and_fast_single_rows_wins():
    best, reason, scores = pick_target([LLAMA_FILE, LLAMA_Q4_0, Q4, INT8], 8, LLAMA_FILE)
    assert best is Q4, scores
    assert "torch-q4" in reason and "llama.cpp on the model's file: 85.0" in reason


def scaled(m: Measured, model: str, factor: float) -> Measured:
    return Measured(m.backend, model, {n: v * factor for n, v in m.seconds.items()}, m.exact)


def test_the_models_own_weights_win_unless_a_requantization_is_clearly_faster():
    """A requantized file is another model (the bench's fidelity table): worth it only for real speed."""
    slightly = scaled(Q4, "t-Q4_0.gguf", 0.97)
    assert pick_target([LLAMA_FILE, Q4, slightly], 8, LLAMA_FILE)[0] is Q4
    clearly = scaled(Q4, "t-Q4_0.gguf", 0.85)
    assert pick_target([LLAMA_FILE, Q4, clearly], 8, LLAMA_FILE)[0] is clearly


def test_a_target_slower_than_plain_llamacpp_on_plain_decoding_is_not_picked():
    """int8's windows are nearly free, but every reply drafting cannot help runs 104 ms/token instead of 85."""
    assert mean_ms_per_token(INT8, 8) < mean_ms_per_token(LLAMA_FILE, 8)
    best, _, _ = pick_target([LLAMA_FILE, INT8], 8, LLAMA_FILE)
    assert best is LLAMA_FILE


def test_inexact_windows_are_not_counted():
    """Windows beyond the exact ones would be cheap here, but speculation may not use them."""
    fake_cheap = Measured("llama.cpp", "t.gguf", table(85, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), exact=[1])
    assert mean_ms_per_token(fake_cheap, 8) == pytest.approx(85.0)


def test_broken_candidates_are_skipped():
    crashed = Measured("llama.cpp", "t.gguf", error="crashed with SIGSEGV")
    best, _, scores = pick_target([crashed, Q4], 8, crashed)
    assert best is Q4 and crashed.label not in scores
    assert pick_target([crashed], 8, crashed)[0] is None


def test_the_draft_that_drafts_a_window_fastest_wins():
    llama_draft = Measured("llama.cpp", "d.gguf", seconds={1: 0.022, 2: 0.039, 32: 0.33})
    best, reason = pick_draft([llama_draft, DRAFT, Measured("torch-int8", "d.gguf", error="no")])
    assert best is DRAFT and "73 ms" in reason  # 19 + 3 x 18


@pytest.mark.small_model
def test_a_backend_that_cannot_run_a_model_is_reported_not_fatal(yarn_model):
    """YaRN rope scaling: the torch backends do not compute it, llama.cpp does."""
    refused = measure_in_child("torch-q4", yarn_model, (1, 2), exact=True)
    assert not refused.usable and "'yarn'" in refused.error
    measured = measure_in_child("llama.cpp", yarn_model, (1, 2, 3), exact=True)
    assert measured.usable and set(measured.seconds) == {1, 2, 3} and 1 in measured.exact


@pytest.mark.small_model
def test_a_target_runs_on_the_files_own_weights_unless_the_user_allows_a_copy(smollm2_path, isolated_cache):
    """Lossless to the file the user chose: `auto` measures the backends that run it as it is; its
    requantized copies (another model) and int8 conversions only with `--requantize`. torch-q4 refuses a
    file whose types its kernels lack, in one line that names both ways to run it."""
    from specserve.backends import load_backend
    from specserve.backends.choose import target_candidates
    from specserve.models.fetch import ModelError
    from specserve.models.quantize import quantized_model

    assert target_candidates(smollm2_path, requantize=False, show_progress=False) == [
        ("llama.cpp", smollm2_path),
        ("torch-q4", smollm2_path),
    ]
    allowed = target_candidates(smollm2_path, requantize=True, show_progress=False)
    copies = {file for _, file in allowed} - {smollm2_path}
    assert [file.name for file in copies] == [f"{smollm2_path.stem}-Q4_0-head-Q4_0.gguf"]
    assert {"torch-int8", "llama.cpp", "torch-q4"} <= {backend for backend, _ in allowed}

    q2_k = quantized_model(smollm2_path, "Q2_K", show_progress=False)  # Q3_K (ffn_down; Q4_0 elsewhere): no kernel
    with pytest.raises(ModelError, match=r"do not take .*Q3_K weights.*--target-backend llama.cpp"):
        load_backend("torch-q4", q2_k, n_ctx=64, show_progress=False)
    refused = measure_in_child("torch-q4", q2_k, (1,), exact=True)  # as `auto` sees it: not usable here
    assert not refused.usable and "--requantize" in refused.error
    model = load_backend("torch-q4", q2_k, n_ctx=64, show_progress=False, requantize=True)
    assert model.converted_to == "Q4_0/Q4_0" and model.model_path == q2_k


@pytest.mark.small_model
def test_every_candidate_is_timed_in_two_rounds_and_the_result_cached(yarn_model, isolated_cache, capsys):
    """A front-end's draft pick (no target) on SmolLM2 with YaRN scaling: only llama.cpp runs it. It is timed
    once per round, in turn with the others, and a second start reads the measurements from the cache."""
    first = choose(None, yarn_model, k_max=2, show_progress=True)
    said = capsys.readouterr().err
    assert not first.cached and first.draft is not None and first.draft.backend == "llama.cpp"
    assert said.count("draft llama.cpp") == 2 and "timing them all again" in said
    assert set(first.draft.seconds) == set(DRAFT_ROWS) and all(s > 0 for s in first.draft.seconds.values())
    assert [m.usable for m in first.drafts] == [True, False, False]  # the torch backends refuse YaRN
    again = choose(None, yarn_model, k_max=2, show_progress=False)
    assert again.cached and again.draft.seconds == first.draft.seconds
    # `specserve info --remeasure`, or a table found to be measured while the machine was busy: anew, and kept
    anew = choose(None, yarn_model, k_max=2, show_progress=True, again=True)
    assert not anew.cached and "measuring the draft backends" in capsys.readouterr().err
    later = choose(None, yarn_model, k_max=2, show_progress=False)
    assert later.cached and later.draft.seconds == anew.draft.seconds != first.draft.seconds


def test_a_table_is_measured_again_only_when_the_machine_runs_clearly_faster_now():
    """A table measured while something else ran is slower than the machine: a faster pass now says so. A
    slower one says the machine is busy now, no time to measure; a fresh measurement is never re-checked."""
    cached = Choice(Q4, DRAFT, "", [Q4], [DRAFT], {}, cached=True)
    one_row = Q4.seconds[1]
    assert measured_while_busy(cached, one_row / (BUSY_WHEN_MEASURED + 0.05))
    assert not measured_while_busy(cached, one_row / (BUSY_WHEN_MEASURED - 0.05))
    assert not measured_while_busy(cached, one_row * 2)
    fresh = Choice(Q4, DRAFT, "", [Q4], [DRAFT], {}, cached=False)
    assert not measured_while_busy(fresh, one_row / 2)


@pytest.mark.small_model
def test_processes_started_together_measure_the_target_once_and_pick_alike(yarn_model, isolated_cache):
    """A verifier (no draft) and a local server (with one) started together on one machine: one measures the
    target candidates while the other waits, and both pick the target from that one measurement, so a
    remote verifier's greedy output is the local server's."""
    pick = (
        "import sys; from pathlib import Path; from specserve.backends.choose import choose; "
        "model = Path(sys.argv[1]); c = choose(model, model if sys.argv[2] == 'draft' else None, 2); "
        "print(c.target.label, sorted(c.target.seconds.items()))"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", pick, str(yarn_model), role], stdout=PIPE, stderr=PIPE, text=True)
        for role in ("draft", "none")
    ]
    outputs = [process.communicate(timeout=900) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    said = "".join(err for _, err in outputs)
    assert said.count("measuring the target backends") == 1 and "waiting for its result" in said, said
    assert said.count("measuring the draft backends") == 1
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].startswith("llama.cpp")


@pytest.mark.small_model
def test_a_runtime_measures_again_when_its_cached_table_was_taken_on_a_busy_machine(yarn_model, isolated_cache, caplog):
    """The cached table says every candidate ran 3x slower than the loaded target runs now (as if measured
    while a compile ran beside it): the runtime measures the candidates again, says so, and caches the new
    table, so the next start picks from it."""
    import json
    import logging

    from specserve.config import EngineConfig
    from specserve.runtime import LocalRuntime

    config = EngineConfig(target=str(yarn_model), draft=None, n_ctx=512)
    first = LocalRuntime(config, show_progress=False)
    assert not first.choice.cached
    (table,) = (isolated_cache / "auto").glob("*.json")
    measured = json.loads(table.read_text())
    for candidate in measured:
        candidate["seconds"] = {rows: 3 * s for rows, s in candidate["seconds"].items()}
    table.write_text(json.dumps(measured))
    with caplog.at_level(logging.WARNING, logger="specserve.runtime"):
        second = LocalRuntime(config, show_progress=False)
    assert "look taken while it was busy" in caplog.text and not second.choice.cached
    remeasured = json.loads(table.read_text())
    usable = [m for m in remeasured if m["seconds"]]
    assert usable and all(m["seconds"]["1"] < 2 * first.choice.target.seconds[1] for m in usable)
