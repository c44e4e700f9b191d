"""Tokenizer and chat template from a GGUF file (llama.cpp's vocab-only load: no weights in memory)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2.sandbox
import llama_cpp

from specserve.models.fetch import ModelError

if TYPE_CHECKING:
    from llguidance import LLTokenizer


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp prints its load log on fd 2; keep a user's terminal clean."""
    if os.environ.get("SPECSERVE_LLAMA_LOG"):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass(frozen=True, kw_only=True)
class FimTokens:
    """A code model's fill-in-the-middle control tokens (from the GGUF's vocabulary); the repository and
    file separators are optional (Qwen2.5-Coder has them, most FIM models do not)."""

    prefix: int
    suffix: int
    middle: int
    repo: int | None = None
    file_sep: int | None = None


class Tokenizer:
    def __init__(self, model_path: Path):
        self.path = Path(model_path)
        try:
            with quiet_stderr():
                self._llama = llama_cpp.Llama(str(self.path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load tokenizer from {self.path}: {exc}") from None
        self.metadata: dict[str, str] = dict(self._llama.metadata)
        self.n_vocab: int = self._llama.n_vocab()
        vocab = self._llama._model.vocab
        self.eos_id: int = llama_cpp.llama_vocab_eos(vocab)
        eot = llama_cpp.llama_vocab_eot(vocab)
        # llama.cpp's end-of-generation set, where llama-server stops too: EOS, EOT (a chat turn's end), and a
        # code model's file separators (a fill-in-the-middle reply ends with <|endoftext|> or <|file_sep|>).
        eog = {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self.stop_ids: frozenset[int] = frozenset(eog | {t for t in (self.eos_id, eot) if t >= 0})
        self.chat_template: str | None = self.metadata.get("tokenizer.chat_template")

    def encode(self, text: str, special: bool = True, *, add_special: bool = False) -> list[int]:
        """`special`: parse control tokens such as <|im_start|> in the text (needed for chat prompts);
        `add_special`: add the tokens the model wants around a text (BOS), when it wants any."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=special)

    def decode_bytes(self, tokens: list[int], *, special: bool = False) -> bytes:
        """`special`: control tokens come out as their text (<|im_end|>) instead of nothing."""
        return self._llama.detokenize(tokens, special=special)

    def token_bytes(self, token: int) -> bytes:
        """One token's bytes: a piece of UTF-8 text, perhaps not a whole character."""
        return self.decode_bytes([token])

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    @cached_property
    def fim(self) -> FimTokens | None:
        """The FIM tokens, or None for a model that was not trained to fill in the middle."""
        vocab = self._llama._model.vocab
        ids = {
            name: getattr(llama_cpp, f"llama_vocab_fim_{name}")(vocab) for name in ("pre", "suf", "mid", "rep", "sep")
        }
        if min(ids["pre"], ids["suf"], ids["mid"]) < 0:
            return None
        optional = {name: ids[name] if ids[name] >= 0 else None for name in ("rep", "sep")}
        return FimTokens(
            prefix=ids["pre"], suffix=ids["suf"], middle=ids["mid"], repo=optional["rep"], file_sep=optional["sep"]
        )

    @cached_property
    def fingerprint(self) -> tuple[int, int]:
        """(vocab size, hash of every token string): equal fingerprints mean interchangeable token ids."""
        return self.n_vocab, hash(tuple(self._llama._model.token_get_text(i) for i in range(self.n_vocab)))

    @cached_property
    def digest(self) -> str:
        """sha256 over every token string: like `fingerprint`, but stable across processes (str hashes are
        salted per process), so a front-end and a remote verifier can compare vocabularies."""
        h = hashlib.sha256(str(self.n_vocab).encode())
        for i in range(self.n_vocab):
            h.update(self._llama._model.token_get_text(i).encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    @cached_property
    def guidance(self) -> LLTokenizer:
        """The vocabulary as llguidance's grammar matcher reads it (~1 s to build, once)."""
        from llguidance.llamacpp import lltokenizer_from_vocab

        # It reads each token through llama_token_get_attr, which llama-cpp-python deprecates with one warning
        # per call: 151,936 of them for Qwen's vocabulary.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "llama_token_get_attr is deprecated", DeprecationWarning)
            return lltokenizer_from_vocab(
                self._llama._model.vocab, n_vocab=self.n_vocab, eos_token=sorted(self.stop_ids)
            )

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The model's own chat template (Jinja in the GGUF metadata), ending with the assistant prompt;
        `tools` (OpenAI tool objects) are listed where the template lists them."""
        if not self.chat_template:
            raise ModelError(f"{self.path.name} has no chat template in its metadata; use a plain prompt")
        if tools and "tools" not in self.chat_template:
            raise ModelError(f"{self.path.name}'s chat template has no place for tools")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = _tojson
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=True, tools=tools)


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, **_) -> str:
    """Hugging Face's `tojson` for chat templates (Jinja's own escapes <, > and & for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


_PAIR_FIX = "give --draft a model of the target's family (or self:Q4_0, the target requantized), or --draft none"


def check_compatible(target: Tokenizer, draft: Tokenizer) -> None:
    """Speculation compares token ids, so draft and target must share a vocabulary exactly."""
    if target.n_vocab != draft.n_vocab:
        raise ModelError(
            f"draft {draft.path.name} and target {target.path.name} have different tokenizers "
            f"(vocab sizes {draft.n_vocab} vs {target.n_vocab}): {_PAIR_FIX}"
        )
    if target.fingerprint != draft.fingerprint:
        raise ModelError(
            f"draft {draft.path.name} and target {target.path.name} have different tokenizers (token strings "
            f"differ): {_PAIR_FIX}"
        )
