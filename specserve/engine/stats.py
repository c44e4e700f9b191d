"""Per-request speculation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefix_reused: int = 0  # prompt tokens whose target KV came from an earlier sequence
    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0  # verify windows after the prefill
    drafted_at: list[int] = field(default_factory=list)  # per draft position: how often it was drafted
    accepted_at: list[int] = field(default_factory=list)  # ... and how often it was accepted
    chosen_k: list[int] = field(default_factory=list)  # draft length asked for at each step
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    windows: list[tuple[int, int]] = field(default_factory=list)  # drafted, accepted per verify window

    @property
    def last_window(self) -> tuple[int, int]:
        return self.windows[-1] if self.windows else (0, 0)

    def record_window(self, drafted: int, accepted: int) -> None:
        self.windows.append((drafted, accepted))
        self.target_passes += 1
        self.drafted += drafted
        self.accepted += accepted
        while len(self.drafted_at) < drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens emitted per target verify pass (1.0 is plain decoding)."""
        return (self.generated - 1) / self.target_passes if self.target_passes else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at, strict=True)]

    @property
    def decode_s(self) -> float:
        return self.total_s - self.prefill_s

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the prefill."""
        return (self.generated - 1) / self.decode_s if self.generated > 1 and self.decode_s > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.generated} tokens, {self.tokens_per_s:.1f} tok/s, drafted {self.drafted}, "
            f"accepted {self.accepted} ({self.acceptance_rate:.0%}), {self.tokens_per_pass:.2f} tokens/pass, "
            f"draft {self.draft_s * 1000:.0f} ms, verify {self.verify_s * 1000:.0f} ms, "
            f"prefill {self.prefill_s * 1000:.0f} ms"
        )
