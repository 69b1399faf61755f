"""Host-side stop rules of the batched rollout: where each completion ends.

The rollout reads sampled tokens back in windows (or one step at a time with tools) and hands
them to a :class:`StopTracker`, which keeps each completion's tokens and cuts it at its first EOS
id, stop token sequence or stop string, or at ``max_new_tokens`` (truncated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

# A decoded stop string may start this many tokens before the first token not yet checked.
STOP_STRING_TOKEN_MARGIN = 16


class StopTracker:
    """Collects tokens per completion and decides where each one stops."""

    def __init__(
        self,
        count: int,
        max_new_tokens: int,
        eos_token_ids: set[int],
        stop_sequences: list[list[int]],
        stop_strings: list[str],
        decode: Callable[[list[int]], str] | None,
    ) -> None:
        self.ids: list[list[int]] = [[] for _ in range(count)]
        self.stats: list[list[list[float]]] = [[] for _ in range(count)]  # per token, if recorded
        self.reason: list[str | None] = [None] * count
        self.max_new_tokens = max_new_tokens
        self.eos = eos_token_ids
        self.stop_sequences = [s for s in stop_sequences if s]
        self.stop_strings = [s for s in stop_strings if s]
        self.decode = decode
        self.string_margin = STOP_STRING_TOKEN_MARGIN + max(
            (len(s) for s in self.stop_strings), default=0
        )

    def finished(self, row: int) -> bool:
        return self.reason[row] is not None

    def add(
        self,
        rows: Sequence[int],
        new_tokens: list[list[int]],
        new_stats: list[list[list[float]]] | None = None,
    ) -> None:
        """new_tokens[i] are the tokens sampled for completion rows[i] since the last call
        (new_stats[i] their recorded statistics, one list per token)."""
        for i, (row, tokens) in enumerate(zip(rows, new_tokens, strict=True)):
            if not self.finished(row):
                self._extend(row, tokens, None if new_stats is None else new_stats[i])

    def force(self, row: int, token: int, stats: list[float] | None) -> None:
        """A token the rollout put in (a tool's result): kept without stop checks, so an end
        token inside a chat template's tool turn does not end the completion."""
        if self.finished(row):
            return
        self.ids[row].append(token)
        if stats is not None:
            self.stats[row].append(stats)
        if len(self.ids[row]) >= self.max_new_tokens:
            self.reason[row] = FINISH_LENGTH

    def close(self) -> None:
        for row, reason in enumerate(self.reason):
            if reason is None:
                self.reason[row] = FINISH_LENGTH

    def _extend(self, row: int, tokens: list[int], stats: list[list[float]] | None) -> None:
        ids = self.ids[row]
        checked = len(ids)
        ids.extend(tokens[: self.max_new_tokens - checked])
        if stats is not None:
            self.stats[row].extend(stats[: self.max_new_tokens - checked])
        cut = self._token_stop(ids, checked)
        if self.stop_strings:
            cut = self._string_stop(ids, checked, len(ids) if cut is None else cut) or cut
        if cut is not None:
            del ids[cut:]
            del self.stats[row][cut:]
            self.reason[row] = FINISH_STOP
        elif len(ids) >= self.max_new_tokens:
            self.reason[row] = FINISH_LENGTH

    def _token_stop(self, ids: list[int], checked: int) -> int | None:
        """Length up to and including the first EOS or stop sequence ending after `checked`."""
        for end in range(checked + 1, len(ids) + 1):
            if ids[end - 1] in self.eos:
                return end
            for seq in self.stop_sequences:
                if len(seq) <= end and ids[end - len(seq) : end] == seq:
                    return end
        return None

    def _string_stop(self, ids: list[int], checked: int, limit: int) -> int | None:
        """Shortest length <= limit whose decoded tail contains a stop string."""
        assert self.decode is not None
        begin = max(0, checked - self.string_margin)
        if not any(s in self.decode(ids[begin:limit]) for s in self.stop_strings):
            return None
        for end in range(max(begin, checked) + 1, limit + 1):
            text = self.decode(ids[begin:end])
            if any(s in text for s in self.stop_strings):
                return end
        return limit
