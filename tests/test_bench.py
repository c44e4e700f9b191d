"""`specserve bench` end to end on a tiny budget: the seed table's rows (including the quantized draft
and the cascade), a lossy tolerance row with its quality columns, JSON and PNG written."""

import json
import subprocess
import sys

import pytest

from specserve.models.registry import DEFAULT_DRAFT

pytestmark = pytest.mark.models


def test_seed_table_with_tolerance_row(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "specserve.cli", "bench", "--table", "seed", "--prompts", "project"]
    command += [
        "--limit",
        "1",
        "--max-tokens",
        "12",
        "-k",
        "4",
        "--modes",
        "greedy",
        "--tolerance",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["summary"]["greedy/all"]
    labels = list(rows)
    assert labels[0] == "target-only llama.cpp" and any("quantized:Q4_0" in label for label in labels)
    assert any(f"{DEFAULT_DRAFT} (torch-int8)" in label for label in labels)  # the seed's plain draft row
    assert any(DEFAULT_DRAFT in name for name in report["cost_table"])
    assert any("cascade" in label for label in labels) and any("tolerance" in label for label in labels)
    exact = [r for label, r in rows.items() if "tolerance" not in label and "target_logprob" in r]
    assert exact and all(r["same_as_target"] == 1.0 for r in exact)  # exact speculation: the target's output
    lossy = next(r for label, r in rows.items() if "tolerance" in label)
    assert lossy["target_logprob"] < 0 and lossy["acceptance_rate"] is not None
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "speedup" in done.stdout


def test_default_table_names_every_drafter_and_its_cost(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "specserve.cli", "bench", "--prompts", "public", "--limit", "1"]
    command += ["--max-tokens", "8", "--modes", "greedy", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    labels = list(report["summary"]["greedy/all"])
    assert labels[:2] == ["target-only llama.cpp", "target-only torch-int8"]
    assert any("n-gram" in label for label in labels) and any("k=4" in label for label in labels)
    assert any("quantized:Q4_0/Q4_0 (llama.cpp)" in label for label in labels)  # the default draft
    assert any("Q4_0-head-Q4_0" in name for name in report["cost_table"])  # and its cost row
