"""`mlxgrpo chat`: an interactive conversation; also scriptable through a pipe."""

from __future__ import annotations

import sys

from mlxgrpo.cli import generation as g
from mlxgrpo.cli.common import ConfigFiles, Overrides


def chat(
    config: ConfigFiles = None,
    set_: Overrides = None,
    model: g.Model = None,
    adapter: g.Adapter = None,
    system: g.System = None,
    max_tokens: g.MaxTokens = None,
    temperature: g.Temperature = None,
    top_p: g.TopP = None,
    top_k: g.TopK = None,
    min_p: g.MinP = None,
    repetition_penalty: g.RepetitionPenalty = None,
    seed: g.Seed = None,
    no_chat_template: g.NoChatTemplate = False,
    tool: g.Tools = None,
) -> int:
    """Chat with a model (and adapters). Commands: /reset, /system TEXT, /help, /exit.

    Reads one message per line from a pipe as well, e.g. `printf 'hi\\n/reset\\n' | mlxgrpo chat`.
    """
    from mlxgrpo import ui
    from mlxgrpo.inference import ChatSession

    flags = g.generation_flags(locals())
    loaded = g.load_for_generation(config, set_, flags, adapter)
    resolved, model_, tokenizer, options, tools = loaded
    gen = resolved.config.generate
    session = ChatSession(
        model_,
        tokenizer,
        options,
        system=gen.system_prompt,
        chat_template=gen.chat_template,
        tools=tools,
    )
    interactive = sys.stdin.isatty()
    ui.chat_banner(resolved.config.model.path, interactive)
    while True:
        try:
            line = ui.chat_input(interactive)
        except KeyboardInterrupt:  # at the prompt, Ctrl-C only clears the line
            ui.end_of_answer()
            ui.note("(/exit or Ctrl-D leaves)")
            continue
        if line is None:
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, line.strip()):
                return 0
            continue
        _answer(session, line, interactive)


def _command(session, line: str) -> bool:
    """Run a /command; False means leave the chat."""
    from mlxgrpo import ui

    name, _, argument = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        ui.note("conversation cleared")
    elif name == "/system":
        session.set_system(argument.strip() or None)
        ui.note(
            "system message set; conversation cleared" if argument.strip() else "system cleared"
        )
    elif name == "/help":
        ui.chat_help()
    else:
        ui.note(f"unknown command {name}; /help lists the commands")
    return True


def _answer(session, text: str, interactive: bool) -> None:
    from mlxgrpo import ui
    from mlxgrpo.inference import StreamState

    state = StreamState()
    ui.chat_assistant_prefix(interactive)
    try:
        for piece in session.send(text, state):
            ui.stream_piece(piece)
    except KeyboardInterrupt:  # stop this answer, keep the chat
        ui.end_of_answer()
        ui.note("answer stopped")
        return
    ui.end_of_answer()
    if interactive and state.answer is not None:
        ui.generation_stats(state.answer, None)
