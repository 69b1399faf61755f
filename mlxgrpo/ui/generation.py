"""Output of `mlxgrpo infer` and `mlxgrpo chat`: streamed answers, speeds, prompt progress, the
chat prompt."""

from __future__ import annotations

from typing import Any

from mlxgrpo.ui import console
from mlxgrpo.ui.console import escape, human_size, note


def stream_piece(text: str) -> None:
    """A piece of a streamed answer, as is, flushed at once."""
    console.out.print(text, markup=False, highlight=False, soft_wrap=True, end="")
    console.out.file.flush()


def end_of_answer() -> None:
    console.out.print()
    console.out.file.flush()


def generation_stats(answer: Any, peak_bytes: int | None) -> None:
    """One dim stderr line: tokens, speed, finish reason, peak memory."""
    peak = f", peak memory {human_size(peak_bytes)}" if peak_bytes else ""
    console.err.print(
        f"[dim]{answer.prompt_tokens} prompt + {answer.completion_tokens} generated tokens "
        f"({answer.finish_reason}), {answer.tokens_per_second:.1f} tok/s{peak}[/]"
    )


def batch_stats(count: int, tokens: int, seconds: float, peak_bytes: int | None, path: Any) -> None:
    speed = tokens / seconds if seconds > 0 else 0.0
    peak = f", peak memory {human_size(peak_bytes)}" if peak_bytes else ""
    console.err.print(
        f"[green]✓[/] {count} answers, {tokens} tokens in {seconds:.1f}s "
        f"({speed:.1f} tok/s{peak}) → {escape(str(path))}"
    )


class BatchProgress:
    """A progress bar over prompts (stderr); `advance(done, total)` is the library callback.
    `quiet` shows nothing (the ranks after the first of a launched run)."""

    def __init__(self, label: str, total: int | None = None, quiet: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn(f"[bold]{escape(label)}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console.err,
            transient=True,
            disable=quiet,
        )
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> BatchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def advance(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def add(self, count: int) -> None:
        self.progress.advance(self.task, count)


# --- chat ------------------------------------------------------------------------------------

CHAT_HELP = (
    "/reset          forget the conversation\n"
    "/system TEXT    set the system message (and start over); /system alone clears it\n"
    "/help           this list\n"
    "/exit           leave (also Ctrl-D); Ctrl-C stops an answer"
)


def chat_banner(model: str, interactive: bool) -> None:
    if interactive:
        console.err.print(f"[bold]mlxgrpo chat[/] — {escape(model)}. Type /help for commands.")


def chat_help() -> None:
    console.err.print(escape(CHAT_HELP, keep_lines=True))


def chat_input(interactive: bool) -> str | None:
    """The next line the user typed; None at end of input (Ctrl-D or the end of a pipe)."""
    import sys

    if interactive:
        try:
            return _valid_text(console.out.input("[bold cyan]>>> [/]"))
        except EOFError:
            console.out.print()
            return None
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:  # read bytes: undecodable input is replaced, never a crash later
        data = buffer.readline()
        if data == b"":
            return None
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            _replaced_note()
            line = data.decode("utf-8", errors="replace")
        return line.rstrip("\n")
    line = sys.stdin.readline()
    return None if line == "" else _valid_text(line.rstrip("\n"))


def _valid_text(text: str) -> str:
    """`text` with the lone surrogates that stand for undecodable bytes made into U+FFFD, so
    tokenizers accept it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        _replaced_note()
        return text.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")


def _replaced_note() -> None:
    note("this line was not valid UTF-8; its undecodable bytes are replaced with \ufffd")


def chat_assistant_prefix(interactive: bool) -> None:
    if interactive:
        console.out.print("[bold green]assistant:[/] ", end="")
