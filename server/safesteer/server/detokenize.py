"""Incremental detokenization with stop sequences, for streaming one row's text.

Text is only released once it cannot be part of a stop sequence and does not end in a
half-decoded character, so a client never sees text that a later stop would have cut.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class TextStream:
    """One row's generated text: push tokens, get back the text safe to emit."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = stops
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return newly emittable text. Sets `stopped` when a stop appears."""
        self._ids.append(token_id)
        self._text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        for stop in self._stops:
            start = max(0, self._emitted - len(stop) + 1)
            found = self._text.find(stop, start)
            if found != -1:
                self.stopped = True
                return self._release(found)
        end = len(self._text.rstrip(_REPLACEMENT))
        end -= self._held_for_stops(end)
        return self._release(end)

    def finish(self) -> str:
        """The rest of the text, once the row ends without a stop sequence."""
        return self._release(len(self._text))

    def _held_for_stops(self, end: int) -> int:
        """Length of the longest tail of text[:end] that begins some stop sequence."""
        for size in range(min(end, max((len(s) for s in self._stops), default=1) - 1), 0, -1):
            tail = self._text[end - size : end]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0

    def _release(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta
