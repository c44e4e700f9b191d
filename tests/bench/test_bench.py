"""`specserve bench` end to end on a tiny budget: the seed table's rows (including the quantized draft
and the cascade), a lossy tolerance row with its quality columns, JSON and PNG written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specserve.bench.run import BASELINE, PROJECT_PROMPTS
from specserve.models.registry import DEFAULT_DRAFT

pytestmark = pytest.mark.models


def test_seed_table_with_tolerance_row(tmp_path):
    """One prompt of the project's set: what is checked here is the table's rows, each run once (the default
    table's test runs one prompt of each kind)."""
    out = tmp_path / "bench.json"
    one_prompt = tmp_path / "prompt.jsonl"
    one_prompt.write_text(PROJECT_PROMPTS.read_text().splitlines()[0] + "\n")
    command = [sys.executable, "-m", "specserve.cli", "bench", "--table", "seed", "--prompts", str(one_prompt)]
    command += [
        "--max-tokens",
        "12",
        "-k",
        "4",
        "--modes",
        "greedy",
        "--tolerance",
        "2",
        "--no-fidelity",  # the default table's test checks it
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["summary"]["greedy/all"]
    labels = list(rows)
    assert labels[0] == BASELINE and any("quantized:Q4_0" in label for label in labels)
    assert any(f"{DEFAULT_DRAFT} (torch-int8)" in label for label in labels)  # the seed's plain draft row
    assert any(DEFAULT_DRAFT in name for name in report["cost_table"])
    assert any("cascade" in label for label in labels) and any("tolerance" in label for label in labels)
    exact = [r for label, r in rows.items() if "tolerance" not in label and "target_logprob" in r]
    assert exact and all(r["same_as_target"] == 1.0 for r in exact)  # exact speculation: the target's output
    lossy = next(r for label, r in rows.items() if "tolerance" in label)
    assert lossy["target_logprob"] < 0 and lossy["acceptance_rate"] is not None
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "vs llama.cpp" in done.stdout


def test_default_table_names_every_drafter_its_cost_the_machine_and_the_fidelity(tmp_path, runtime):
    """Runs on the project's own prompt set: no ../shared needed. With an ablation row per drafter asked for."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "specserve.cli", "bench", "--limit", "1"]
    command += ["--max-tokens", "8", "--modes", "greedy", "--constrained", "--out", str(out)]
    command += ["--ablate", "row-cost", "--ablate-methods", "draft,suffix"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["summary"]["greedy/all"]
    labels = list(rows)
    target = runtime.target.name
    assert labels[:3] == [BASELINE, "plain llama.cpp, Q4_0 requantized", f"target-only {target}"]
    assert rows[BASELINE]["speedup_vs_llamacpp"] == 1.0
    assert any("n-gram" in label for label in labels) and any("k=4" in label for label in labels)
    assert any("+ suffix trees k=" in label for label in labels) and any("suffix trees, else" in x for x in labels)
    assert any(name.startswith("suffix trees") for name in report["memory_bytes"])
    assert sum("JSON grammar" in label for label in labels) == 2  # target-only and speculative, constrained
    ablated = [label for label in labels if label.endswith("without row-cost")]  # one per drafter asked for
    assert len(ablated) == 2 and any("suffix trees" in label for label in ablated)
    assert any(f"quantized:Q4_0/Q4_0 ({runtime.draft.name})" in label for label in labels)  # the default draft
    assert any("Q4_0-head-Q4_0" in name for name in report["cost_table"])  # and its cost row
    assert {p.rsplit("/", 1)[-1] for p in report["prompts"]} == {"prompts.jsonl"}
    assert report["machine"]["cpu"]["isa"] and report["machine"]["choice"]["target"]["backend"] == target
    assert report["backends"]["target"].startswith(target)
    # every target variant measured here, with its agreement with llama.cpp on the model's file
    variants = {
        f"{m['backend']} {Path(m['model']).name}" for m in report["machine"]["choice"]["targets"] if m["error"] is None
    }
    assert set(report["fidelity"]) == variants
    assert all(0.5 < row["top1_agreement"] <= 1.0 for row in report["fidelity"].values())
    assert "Fidelity" in done.stdout


def test_served_bench_against_llama_server_keeps_the_targets_own_replies(tmp_path):
    """The headline bench on a tiny budget: `specserve serve` with its defaults beside llama-server (built by
    `make llama-server`, which `make test` runs), plain and with its draft and n-gram modes, every row asked
    through the openai client; greedy replies through the server are the target's own."""
    from specserve.bench.served import BASELINE as PLAIN_LLAMA_SERVER
    from specserve.bench.served import COPY, TARGET_OWN, default_llama_server

    assert default_llama_server().is_file(), "run `make llama-server` (`make test` does)"
    out = tmp_path / "served.json"
    command = [sys.executable, "-m", "specserve.cli", "bench", "--served", "--limit", "1", "--max-tokens", "12"]
    command += ["--modes", "greedy,sampled", "--served-methods", "suffix-draft", "--served-requantized"]
    command += ["--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["summary"]["greedy/all"]
    default = report["specserve"]["speculation"]
    llama_servers = ["llama-server draft-simple", "llama-server ngram-simple", "llama-server ngram-map-k"]
    assert list(rows)[:4] == [PLAIN_LLAMA_SERVER, *llama_servers]
    assert rows[PLAIN_LLAMA_SERVER]["speedup"] == 1.0
    assert rows["llama-server draft-simple"]["acceptance"] is not None  # it did speculate
    ours = [label for label in rows if label.startswith(("specserve serve", "engine in-process")) and COPY not in label]
    assert f"specserve serve ({default})" in ours and "specserve serve (suffix-draft)" in ours
    assert "specserve serve, plain" in ours and TARGET_OWN in ours
    requests = rows[TARGET_OWN]["requests"]
    assert requests == 4  # one prompt of each kind of the project set
    for label in ours:  # exact, through HTTP as in process
        assert rows[label]["same_as_target"] == requests, (label, rows[label])
    assert rows[f"{COPY} ({default})"]["requests"] == requests  # another model: its replies may differ
    assert all(r["ttft_ms_p50"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert set(report["summary"]) >= {"sampled/all", "greedy/code", "greedy/prose"}
    assert report["machine"]["cpu"]["family_model"] and report["cost_table"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "vs llama-server" in done.stdout
