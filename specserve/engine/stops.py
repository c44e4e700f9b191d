"""Tokens to text deltas, with stop strings: no text past a stop string is ever released.

Text is held back while it is an incomplete UTF-8 sequence or could still grow into a stop string, so a
stop string spread over several tokens of one accepted draft run is cut exactly where it starts.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class TextStream:
    def __init__(self, token_bytes: Callable[[list[int]], bytes], stop: tuple[str, ...] = ()):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # everything decoded so far (may run past a stop string)
        self.released = 0  # characters of `text` handed out
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to release (possibly empty)."""
        self.text += self._decoder.decode(self._token_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release whatever was held back (unless a stop string already ended it)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self._stop:
            search_from = max(0, self.released - max(map(len, self._stop)))
            hits = [(i, s) for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                end, self.matched = min(hits)
            elif not final:
                end -= self._partial_stop_suffix()
        delta = self.text[self.released : end]
        self.released = end
        return delta

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    @property
    def released_text(self) -> str:
        return self.text[: self.released]
