"""`scripts/step`, which runs each set-up step of `make`: one line with the step's time, its output in a log,
and on failure the log's last lines, its path and the command's exit status."""

import subprocess
from pathlib import Path

STEP = Path(__file__).parents[1] / "scripts" / "step"


def test_a_step_that_succeeds_prints_one_line_and_keeps_its_output_in_the_log(tmp_path):
    log = tmp_path / "logs" / "ok.log"
    done = subprocess.run([STEP, "a build", log, "sh", "-c", "echo compiler noise"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("== a build ... ") and done.stdout.endswith("s\n") and "noise" not in done.stdout
    assert log.read_text() == "compiler noise\n"


def test_a_step_that_fails_shows_the_end_of_its_log_names_it_and_keeps_the_exit_status(tmp_path):
    log = tmp_path / "fail.log"
    command = "for i in $(seq 100); do echo line $i; done; echo 'error: no compiler' >&2; exit 3"
    done = subprocess.run([STEP, "a build", log, "sh", "-c", command], capture_output=True, text=True)
    assert done.returncode == 3
    assert "== a build FAILED after" in done.stderr and "(exit 3)" in done.stderr
    assert "error: no compiler" in done.stderr and "line 100" in done.stderr and "line 1\n" not in done.stderr
    assert f"== the whole output of a build: {log}" in done.stderr
    assert "line 1\n" in log.read_text()


def test_a_shown_step_passes_its_output_through():
    done = subprocess.run([STEP, "models", "-", "echo", "progress"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.splitlines()[:2] == ["== models", "progress"] and "== models done in" in done.stdout
