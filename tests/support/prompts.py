"""The project's own prompt set, as the bench reads it."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PROMPTS = ROOT / "specserve" / "bench" / "prompts.jsonl"  # ships with the project: no ../shared needed


def project_prompts(per_kind: int | None = None) -> list[dict]:
    """The project's prompt set (code, prose, random words, code edits), the first `per_kind` of each kind."""
    prompts = [json.loads(line) for line in PROJECT_PROMPTS.read_text().splitlines() if line.strip()]
    if per_kind is None:
        return prompts
    kept: dict[str, list[dict]] = {}
    for prompt in prompts:
        kept.setdefault(prompt["kind"], [])
        if len(kept[prompt["kind"]]) < per_kind:
            kept[prompt["kind"]].append(prompt)
    return [p for group in kept.values() for p in group]
