"""`mlxgrpo infer`: answer one prompt (optionally streamed) or a JSONL file of prompts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mlxgrpo import parsing
from mlxgrpo.cli import generation as g
from mlxgrpo.cli.common import ConfigFiles, Overrides
from mlxgrpo.errors import ConfigError
from mlxgrpo.safe_io import atomic_write


def infer(
    prompt: Annotated[str | None, typer.Argument(help="The prompt.", show_default=False)] = None,
    config: ConfigFiles = None,
    set_: Overrides = None,
    model: g.Model = None,
    adapter: g.Adapter = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="JSONL prompts: strings or objects with 'prompt' or 'messages'."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Answers for --file (default: FILE.answers.jsonl)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per batch.")] = 8,
    system: g.System = None,
    max_tokens: g.MaxTokens = None,
    temperature: g.Temperature = None,
    top_p: g.TopP = None,
    top_k: g.TopK = None,
    min_p: g.MinP = None,
    repetition_penalty: g.RepetitionPenalty = None,
    seed: g.Seed = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print the answer as it is made.")
    ] = False,
    no_chat_template: g.NoChatTemplate = False,
    tool: g.Tools = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> int:
    """Generate answers with a model (and adapters): one PROMPT, or --file prompts.jsonl."""
    if (prompt is None) == (file is None):
        raise ConfigError(
            "give either a PROMPT or --file prompts.jsonl",
            hint='e.g. mlxgrpo infer -m MODEL "What is 17*3?"',
        )
    if stream and json_output:
        raise ConfigError("--stream and --json do not mix", hint="drop one of them")
    if prompt is not None and not _is_utf8(prompt):  # undecodable argv bytes arrive as surrogates
        raise ConfigError("the PROMPT is not valid UTF-8 text", hint="pass it as UTF-8")
    prompts = _read_prompts(file) if file is not None else None
    target = _output_path(file, output, force) if file is not None else None
    flags = g.generation_flags(locals())
    loaded = g.load_for_generation(config, set_, flags, adapter)
    resolved, model_, tokenizer, options, tools = loaded
    gen = resolved.config.generate
    common = dict(system=gen.system_prompt, chat_template=gen.chat_template, tools=tools)
    if prompts is not None:
        return _answer_file(model_, tokenizer, options, prompts, target, batch_size, common)
    return _answer_one(model_, tokenizer, options, prompt, stream, json_output, common)


def _answer_one(model, tokenizer, options, prompt, stream, json_output, common) -> int:
    from mlxgrpo import ui
    from mlxgrpo.inference import StreamState, encode_prompt, peak_memory_bytes, stream_answer

    if not stream:
        from mlxgrpo.inference import generate_answers

        answer = generate_answers(model, tokenizer, [prompt], options, **common)[0]
        if json_output:
            record = {"prompt": prompt, **_answer_record(answer)}
            record["peak_memory_bytes"] = peak_memory_bytes()
            ui.raw(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            ui.stream_piece(answer.text)
            ui.end_of_answer()
            ui.generation_stats(answer, peak_memory_bytes())
        return 0
    ids = encode_prompt(tokenizer, prompt, **common)
    state = StreamState()
    for piece in stream_answer(model, tokenizer, ids, options, state=state, tools=common["tools"]):
        ui.stream_piece(piece)
    ui.end_of_answer()
    ui.generation_stats(state.answer, peak_memory_bytes())
    return 0


def _answer_file(model, tokenizer, options, prompts, target, batch_size, common) -> int:
    """Answers batch by batch into a fresh temporary, renamed to TARGET when complete; if
    stopped, to TARGET.partial (a rename, so a symlink planted there is replaced, not followed)."""
    from mlxgrpo import ui
    from mlxgrpo.inference import generate_answers, peak_memory_bytes

    started = time.perf_counter()
    partial = target.with_name(target.name + ".partial")
    written = [0]
    try:
        with (
            ui.BatchProgress("infer", len(prompts)) as progress,
            atomic_write(target, keep_partial=partial) as fh,
        ):

            def write(batch: list[Any], done: int, total: int) -> None:
                for record, answer in zip(prompts[done - len(batch) : done], batch, strict=True):
                    line = json.dumps({**record, **_answer_record(answer)}, ensure_ascii=False)
                    fh.write(line + "\n")
                fh.flush()
                written[0] = done
                progress.advance(done, total)

            answers = generate_answers(
                model,
                tokenizer,
                [record.get("messages", record.get("prompt")) for record in prompts],
                options,
                batch_size=batch_size,
                on_batch=write,
                **common,
            )
    except KeyboardInterrupt:
        if partial.exists():
            done = f"{written[0]} of {len(prompts)}"
            ui.note(f"stopped: the {done} answers finished are in {partial}")
        else:
            ui.note(f"stopped before the first answer was finished; {target} was not written")
        raise
    seconds = time.perf_counter() - started
    tokens = sum(answer.completion_tokens for answer in answers)
    ui.batch_stats(len(prompts), tokens, seconds, peak_memory_bytes(), target)
    return 0


def _answer_record(answer: Any) -> dict[str, Any]:
    return {
        "completion": answer.text,
        "finish_reason": answer.finish_reason,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        **({"tool_calls": answer.tool_calls} if answer.tool_calls else {}),
    }


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_prompts(path: Path) -> list[dict[str, Any]]:
    """Every line as a dict with 'prompt' (text) or 'messages' (a chat); errors name the line."""
    if not path.is_file():
        raise ConfigError(f"prompts file '{path}' not found", hint="check the path")
    records = []
    # Bytes first, decoded line by line, so a bad byte is reported with its line number.
    for number, data in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{where} is not valid UTF-8 (byte 0x{data[err.start]:02x} at column "
                f"{err.start + 1})",
                hint="save the prompts file as UTF-8",
            ) from None
        if not line.strip():
            continue
        try:
            value = parsing.json_text(line, where)
        except parsing.ParseError as err:
            raise ConfigError(
                f"{where} {err.problem}",
                hint='write one JSON value per line, e.g. {"prompt": "What is 2+2?"}',
            ) from None
        records.append(_prompt_record(value, where))
    if not records:
        raise ConfigError(f"prompts file '{path}' has no prompts", hint="add one JSON line each")
    return records


def _prompt_record(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str) and value.strip():
        return {"prompt": value}
    if isinstance(value, dict):
        if isinstance(value.get("prompt"), str) and value["prompt"].strip():
            return value
        messages = value.get("messages")
        if (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        ):
            return value
    raise ConfigError(
        f"{where} has no prompt",
        hint='each line needs a non-empty string, {"prompt": "..."} or '
        '{"messages": [{"role": "user", "content": "..."}]}',
    )


def _output_path(file: Path, output: Path | None, force: bool) -> Path:
    target = output if output is not None else file.with_name(file.stem + ".answers.jsonl")
    if target.exists() and not force:
        raise ConfigError(f"output '{target}' already exists", hint="pass --force to replace it")
    if target.resolve() == file.resolve():
        raise ConfigError(
            "the output would overwrite the prompts file", hint="choose another --output"
        )
    return target
