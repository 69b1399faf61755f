"""Embedded synthetic tasks, generated in-process from a seed: every command has an offline default.

Spec syntax: ``synthetic:NAME`` or ``synthetic:NAME?n=500&seed=3&letters=abc``.
The same spec, split and seed always give the same examples.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlxgrpo.data.example import GSM8K_SYSTEM_PROMPT, Example
from mlxgrpo.errors import ConfigError
from mlxgrpo.rewards.gsm8k import GSM8K_REWARDS

SYNTHETIC_PREFIX = "synthetic:"
DEFAULT_TRAIN_SIZE = 1000
DEFAULT_EVAL_SIZE = 200
REPEAT_DEMO_LENGTH = 8  # characters in a demonstration of synthetic:repeat
_COMMON_OPTIONS = {"n": "number of examples", "seed": "generation seed (default 0)"}

Generator = Callable[[random.Random, int, Mapping[str, str]], list[Example]]


@dataclass(frozen=True)
class SyntheticTask:
    """A generator plus what a run needs to train on it without further configuration."""

    name: str
    description: str
    generate: Generator
    default_rewards: tuple[str, ...]
    system_prompt: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    tool_rewards: tuple[str, ...] = ()  # with the option tool=...: rewards for tool use
    # An example's ideal completion, for supervised fine-tuning (None: the task has none).
    demonstrate: Callable[[Example, Mapping[str, str]], str | None] | None = None

    def rewards(self, options: Mapping[str, str]) -> tuple[str, ...]:
        return self.tool_rewards if options.get("tool") else self.default_rewards

    def system(self, options: Mapping[str, str]) -> str | None:
        return None if options.get("tool") else self.system_prompt


_NAMES = ["Tom", "Mia", "Sam", "Ana", "Leo", "Ivy", "Ben", "Zoe"]


def _arithmetic_problem(rng: random.Random) -> tuple[str, int, str]:
    """One word problem: (question, answer, worked solution)."""
    name = rng.choice(_NAMES)
    kind = rng.randrange(5)
    if kind == 0:
        count, price = rng.randint(2, 9), rng.randint(1, 9)
        total = count * price
        question = (
            f"{name} buys {count} pencils at ${price} each. How many dollars does {name} spend?"
        )
        steps = f"{count} pencils cost {count} * {price} = {total} dollars."
    elif kind == 1:
        have, give, pick = rng.randint(5, 20), rng.randint(1, 5), rng.randint(1, 9)
        total = have - give + pick
        question = (
            f"{name} has {have} apples, gives {give} to a friend and then picks {pick} more. "
            f"How many apples does {name} have now?"
        )
        steps = f"{have} - {give} = {have - give}, then {have - give} + {pick} = {total}."
    elif kind == 2:
        speed, hours = rng.randint(2, 12) * 5, rng.randint(1, 6)
        total = speed * hours
        question = (
            f"A train travels at {speed} miles per hour for {hours} hours. "
            "How many miles does it travel?"
        )
        steps = f"Distance is {speed} * {hours} = {total} miles."
    elif kind == 3:
        friends, each = rng.randint(2, 6), rng.randint(2, 9)
        cookies = friends * each
        total = each
        question = (
            f"{name} shares {cookies} cookies equally among {friends} friends. "
            "How many cookies does each friend get?"
        )
        steps = f"Each friend gets {cookies} / {friends} = {each} cookies."
    else:
        weekly, weeks = rng.randint(2, 10), rng.randint(2, 8)
        saved = weekly * weeks
        spent = rng.randint(1, saved - 1)
        total = saved - spent
        question = (
            f"{name} saves ${weekly} each week for {weeks} weeks and then spends ${spent}. "
            "How many dollars are left?"
        )
        steps = f"Saved {weekly} * {weeks} = {saved}; {saved} - {spent} = {total} dollars left."
    return question, total, f"{steps}\n#### {total}"


def _tool_problems(rng: random.Random, n: int, options: Mapping[str, str]) -> list[Example]:
    """Products of two `digits`-digit numbers: beyond a small model, one calculator call away.
    With prefill=call the prompt ends inside the call (its expression written), so even a
    random-init model can learn the rest: close the call, keep the result, stop."""
    if options["tool"] != "calculator":
        raise ConfigError(
            f"synthetic:arithmetic: tool={options['tool']!r} is not a built-in tool",
            hint="use tool=calculator",
        )
    digits = _int_option(options, "digits", 4, "arithmetic")
    prefill = options.get("prefill", "none")
    if not 1 <= digits <= 12 or prefill not in ("none", "call"):
        raise ConfigError(
            f"synthetic:arithmetic: need 1 <= digits <= 12 and prefill none|call, got "
            f"digits={digits}, prefill={prefill}"
        )
    low, high = 10 ** (digits - 1), 10**digits - 1
    examples = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        call = ("calculator", f"{a}*{b}") if prefill == "call" else None
        examples.append(Example(f"What is {a} * {b}?", str(a * b), prefill_call=call))
    return examples


def _generate_arithmetic(rng: random.Random, n: int, options: Mapping[str, str]) -> list[Example]:
    if options.get("tool"):
        return _tool_problems(rng, n, options)
    examples = []
    for _ in range(n):
        question, answer, solution = _arithmetic_problem(rng)
        examples.append(Example(question, str(answer), {"solution": solution}))
    return examples


def _demonstrate_arithmetic(example: Example, options: Mapping[str, str]) -> str | None:
    """The answer in the system prompt's format, its worked steps as the reasoning (the tool
    form of the task has none: its demonstrations would need the tool's call format)."""
    if options.get("tool"):
        return None
    steps = str(example.extra["solution"]).split("\n####")[0]
    return f"<reasoning>\n{steps}\n</reasoning>\n<answer>\n{example.answer}\n</answer>"


def _letters_option(options: Mapping[str, str], task: str) -> str:
    letters = options.get("letters", string.ascii_lowercase)
    if not letters or any(ch not in string.printable or ch.isspace() for ch in letters):
        raise ConfigError(
            f"synthetic:{task}: option letters={letters!r} must be non-empty printable "
            "characters without spaces."
        )
    return letters


def _generate_repeat(rng: random.Random, n: int, options: Mapping[str, str]) -> list[Example]:
    letters = _letters_option(options, "repeat")
    examples = []
    for _ in range(n):
        letter = rng.choice(letters)
        examples.append(Example(f"Repeat the letter {letter}:", letter, {"target": letter}))
    return examples


def _generate_copy(rng: random.Random, n: int, options: Mapping[str, str]) -> list[Example]:
    letters = _letters_option(options, "copy")
    min_len = _int_option(options, "min_len", 2, "copy")
    max_len = _int_option(options, "max_len", 5, "copy")
    if not 1 <= min_len <= max_len:
        raise ConfigError(
            f"synthetic:copy: need 1 <= min_len <= max_len, got {min_len}, {max_len}."
        )
    examples = []
    for _ in range(n):
        text = "".join(rng.choice(letters) for _ in range(rng.randint(min_len, max_len)))
        examples.append(Example(f"Copy: {text}", text, {"target": text}))
    return examples


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    task.name: task
    for task in (
        SyntheticTask(
            name="arithmetic",
            description="small arithmetic word problems in GSM8K format (answer after ####)",
            generate=_generate_arithmetic,
            default_rewards=GSM8K_REWARDS,
            system_prompt=GSM8K_SYSTEM_PROMPT,
            options={
                "tool": "calculator: products of large numbers, for runs with rollout.tools",
                "digits": "with tool: digits of each factor (default 4)",
                "prefill": "with tool: call = the prompt opens the call (none = it does not)",
            },
            tool_rewards=("final_number",),
            demonstrate=_demonstrate_arithmetic,
        ),
        SyntheticTask(
            name="repeat",
            description="'Repeat the letter x:' — dense reward: share of characters equal to x",
            generate=_generate_repeat,
            default_rewards=("char_match",),
            options={"letters": "letters to draw targets from (default a-z)"},
            demonstrate=lambda example, options: str(example.answer) * REPEAT_DEMO_LENGTH,
        ),
        SyntheticTask(
            name="copy",
            description="'Copy: abc' — dense reward: position-wise character overlap",
            generate=_generate_copy,
            default_rewards=("char_overlap",),
            demonstrate=lambda example, options: str(example.answer),
            options={
                "letters": "alphabet of the strings (default a-z)",
                "min_len": "shortest string (default 2)",
                "max_len": "longest string (default 5)",
            },
        ),
    )
}


def is_synthetic(dataset: str) -> bool:
    return dataset.startswith(SYNTHETIC_PREFIX)


def parse_synthetic_spec(dataset: str) -> tuple[SyntheticTask, dict[str, str]]:
    """``synthetic:NAME?key=value&…`` → (task, options); ConfigError for unknown names/options."""
    body = dataset[len(SYNTHETIC_PREFIX) :] if is_synthetic(dataset) else dataset
    name, _, query = body.partition("?")
    task = SYNTHETIC_TASKS.get(name.strip())
    if task is None:
        raise ConfigError(
            f"Unknown synthetic task {name!r}.",
            hint="available: " + ", ".join(f"synthetic:{t}" for t in SYNTHETIC_TASKS),
        )
    options: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        allowed = {**_COMMON_OPTIONS, **task.options}
        if not sep or key not in allowed:
            raise ConfigError(
                f"Bad option {pair!r} for synthetic:{task.name}.",
                hint="options (key=value joined by &): " + ", ".join(sorted(allowed)),
            )
        options[key] = value
    return task, options


def generate_synthetic(dataset: str, split: str = "train") -> list[Example]:
    """Examples of a synthetic task; each split gets its own stream of the same generator."""
    task, options = parse_synthetic_spec(dataset)
    default_size = DEFAULT_TRAIN_SIZE if split == "train" else DEFAULT_EVAL_SIZE
    n = _int_option(options, "n", default_size, task.name)
    seed = _int_option(options, "seed", 0, task.name)
    if n < 1:
        raise ConfigError(f"synthetic:{task.name}: n must be at least 1, got {n}.")
    # A string seed is hashed with SHA-512 by random.Random: stable across processes.
    rng = random.Random(f"{task.name}/{split}/{seed}")
    return task.generate(rng, n, options)


def synthetic_demonstrations(dataset: str, examples: list[Example]) -> list[str]:
    """The ideal completion of each of a synthetic task's examples."""
    task, options = parse_synthetic_spec(dataset)
    completions = [task.demonstrate(ex, options) if task.demonstrate else None for ex in examples]
    if any(c is None for c in completions):
        raise ConfigError(
            f"{dataset} has no demonstrations to train on",
            hint="use a task that writes them (synthetic:arithmetic without tool, "
            "synthetic:repeat, synthetic:copy) or a data file of demonstrations",
        )
    return [c for c in completions if c is not None]


def _int_option(options: Mapping[str, str], key: str, default: int, task: str) -> int:
    if key not in options:
        return default
    try:
        return int(options[key])
    except ValueError:
        raise ConfigError(
            f"synthetic:{task}: option {key}={options[key]!r} is not an integer."
        ) from None


def call_prefill(example: Example, tools: Any) -> list[int]:
    """Token ids a prompt ends with when its example pre-fills a tool call (none otherwise)."""
    call = example.prefill_call if tools is not None else None
    if not call:
        return []
    name, argument = call
    return tools.format.prefill_ids(name, argument)
