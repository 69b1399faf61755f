"""The layered config resolver: precedence, provenance, legacy keys, interpolation, errors."""

from __future__ import annotations

import tomllib

import pytest

from mlxgrpo.config import ConfigProblems, resolve_config
from mlxgrpo.config.legacy import LEGACY_KEYS
from mlxgrpo.config.schema import Config, field_specs
from mlxgrpo.errors import ConfigError


def resolve(*files, sets=(), flags=None, environ=None):
    return resolve_config(files, sets, flags, environ=environ or {}, check_paths=False)


def problems_of(excinfo) -> str:
    return "\n".join(getattr(excinfo.value, "problems", None) or [str(excinfo.value)])


# --- precedence: each adjacent pair of layers -------------------------------------------------


def test_defaults_when_nothing_is_given():
    r = resolve()
    assert r.config == Config()
    assert all(s.layer == "default" for s in r.sources.values())


def test_file_beats_default(write_toml):
    path = write_toml("a.toml", "[rollout]\ntemperature = 0.3\n")
    r = resolve(path)
    assert r.config.rollout.temperature == 0.3
    assert r.sources["rollout.temperature"].layer == "file"
    assert str(path) in str(r.sources["rollout.temperature"])
    assert r.sources["rollout.top_p"].layer == "default"


def test_later_file_beats_earlier_file(write_toml):
    a = write_toml("a.toml", "[rollout]\ntemperature = 0.3\ntop_k = 5\n")
    b = write_toml("b.toml", "[rollout]\ntemperature = 0.6\n")
    r = resolve(a, b)
    assert r.config.rollout.temperature == 0.6
    assert r.config.rollout.top_k == 5
    assert str(b) in str(r.sources["rollout.temperature"])


def test_env_file_used_only_without_config_flag(write_toml):
    env_file = write_toml("env.toml", "[run]\nseed = 7\n")
    cli_file = write_toml("cli.toml", "[run]\nnum_epochs = 2\n")
    environ = {"MLX_GRPO_CONFIG": str(env_file)}
    r = resolve(environ=environ)
    assert r.config.run.seed == 7
    assert r.sources["run.seed"].layer == "env"
    r = resolve(cli_file, environ=environ)
    assert r.config.run.seed == 0 and r.config.run.num_epochs == 2


def test_extends_base_is_overridden_by_child(write_toml):
    write_toml("base.toml", "[rollout]\ntemperature = 0.3\nnum_generations = 4\n")
    child = write_toml("child.toml", 'extends = "base.toml"\n[rollout]\ntemperature = 0.9\n')
    r = resolve(child)
    assert r.config.rollout.temperature == 0.9
    assert r.config.rollout.num_generations == 4
    assert "extended by child.toml" in str(r.sources["rollout.num_generations"])


def test_extends_chain_and_loop(write_toml):
    write_toml("a.toml", "[run]\nseed = 1\nnum_epochs = 3\n")
    write_toml("b.toml", 'extends = "a.toml"\n[run]\nseed = 2\n')
    c = write_toml("c.toml", 'extends = "b.toml"\n[run]\nmax_steps = 9\n')
    cfg = resolve(c).config
    assert (cfg.run.seed, cfg.run.num_epochs, cfg.run.max_steps) == (2, 3, 9)
    loop = write_toml("loop.toml", 'extends = "loop2.toml"\n')
    write_toml("loop2.toml", 'extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="extends` loop"):
        resolve(loop)


def test_set_beats_file(write_toml):
    path = write_toml("a.toml", "[rollout]\ntemperature = 0.3\n")
    r = resolve(path, sets=["rollout.temperature=0.8"])
    assert r.config.rollout.temperature == 0.8
    assert r.sources["rollout.temperature"].layer == "--set"


def test_flag_beats_set():
    flags = {"model.path": ("--model", "org/b"), "run.seed": ("--seed", None)}
    r = resolve(sets=["model.path=org/a"], flags=flags)
    assert r.config.model.path == "org/b"
    assert str(r.sources["model.path"]) == "flag --model"
    assert r.sources["run.seed"].layer == "default"  # a flag left as None is "not given"


def test_later_set_wins_over_earlier_set_including_legacy_names():
    r = resolve(sets=["temperature=0.9", "rollout.temperature=0.5"])
    assert r.config.rollout.temperature == 0.5
    r = resolve(sets=["rollout.temperature=0.5", "temperature=0.9"])
    assert r.config.rollout.temperature == 0.9


# --- legacy keys -------------------------------------------------------------------------------

LEGACY_SAMPLE = {
    "model_name": ("org/model", "model.path", "org/model"),
    "output_dir": ("out", "run.output_dir", "out"),
    "run_name": ("r1", "run.run_name", "r1"),
    "learning_rate": (3e-6, "optim.learning_rate", 3e-6),
    "num_epochs": (2, "run.num_epochs", 2),
    "max_train_samples": (50, "run.max_train_samples", 50),
    "warmup_ratio": (0.2, "optim.warmup_ratio", 0.2),
    "max_grad_norm": (0.5, "optim.max_grad_norm", 0.5),
    "logging_steps": (3, "logging.logging_steps", 3),
    "num_generations": (4, "rollout.num_generations", 4),
    "max_prompt_length": (128, "rollout.max_prompt_length", 128),
    "max_completion_length": (99, "rollout.max_new_tokens", 99),
    "max_new_tokens": (64, "rollout.max_new_tokens", 64),
    "temperature": (0.9, "rollout.temperature", 0.9),
    "clip_eps": (0.1, "algorithm.clip_eps", 0.1),
    "kl_coeff": (0.02, "algorithm.kl_coeff", 0.02),
    "adam_beta1": (0.8, "optim.adam_beta1", 0.8),
    "adam_beta2": (0.99, "optim.adam_beta2", 0.99),
    "weight_decay": (0.01, "optim.weight_decay", 0.01),
    "lr_scheduler_type": ("linear", "optim.lr_scheduler_type", "linear"),
    "save_steps": (10, "checkpoint.save_steps", 10),
    "eval_steps": (5, "eval.every_updates", 5),
    "eval_samples": (20, "eval.samples", 20),
    "seed": (42, "run.seed", 42),
    "use_compile": (False, "run.compile", False),
    "quantize_for_rollouts": (True, "rollout.quantize_bits", 4),
    "eval_every_updates": (6, "eval.every_updates", 6),
    "eval_subset_size": (30, "eval.samples", 30),
    "eval_max_new_tokens": (48, "eval.max_new_tokens", 48),
    "log_jsonl": (False, "logging.jsonl", False),
    "algorithm_type": ("sft", "algorithm.type", "sft"),
    "batch_size": (2, "optim.batch_size", 8),  # 2 prompts x the old default 4 micro-batches
    "gradient_accumulation_steps": (2, "optim.gradient_accumulation_steps", 2),
}


def test_sample_covers_every_legacy_key():
    assert set(LEGACY_SAMPLE) == set(LEGACY_KEYS)


@pytest.mark.parametrize("name", sorted(LEGACY_SAMPLE))
@pytest.mark.parametrize("style", ["flat", "table"])
def test_each_legacy_key_loads(name, style, write_toml):
    value, target, expected = LEGACY_SAMPLE[name]
    line = f"{name} = {tomllib_literal(value)}\n"
    text = line if style == "flat" else "[mlx_grpo]\n" + line
    r = resolve(write_toml("legacy.toml", text))
    assert r.config.get(target) == expected
    assert f"legacy key {name}" in str(r.sources[target]) or name in str(r.sources[target])


def tomllib_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_legacy_batch_pair_becomes_prompts_per_update(write_toml):
    path = write_toml(
        "old.toml", "batch_size = 2\ngradient_accumulation_steps = 3\nnum_generations = 2\n"
    )
    cfg = resolve(path).config
    assert cfg.optim.batch_size == 6  # 2 prompts per micro-batch x 3 micro-batches
    assert cfg.optim.gradient_accumulation_steps == 3
    assert (cfg.optim.batch_size * cfg.rollout.num_generations) % 3 == 0


def test_specific_legacy_key_beats_its_alias_in_one_file(write_toml):
    path = write_toml("old.toml", "max_new_tokens = 64\nmax_completion_length = 1024\n")
    assert resolve(path).config.rollout.max_new_tokens == 64


def test_sections_and_legacy_keys_mix(write_toml):
    path = write_toml("mix.toml", "num_generations = 4\n[rollout]\nnum_generations = 6\n")
    assert resolve(path).config.rollout.num_generations == 6


# --- interpolation ------------------------------------------------------------------------------


def test_env_interpolation_with_default_and_type(write_toml):
    path = write_toml("i.toml", '[run]\nseed = "${env:SEED,5}"\noutput_dir = "${env:BASE}/runs"\n')
    cfg = resolve(path, environ={"BASE": "/data"}).config
    assert cfg.run.seed == 5 and cfg.run.output_dir == "/data/runs"
    cfg = resolve(path, environ={"BASE": "/x", "SEED": "11"}).config
    assert cfg.run.seed == 11


def test_missing_env_without_default_is_an_error(write_toml):
    path = write_toml("i.toml", '[run]\noutput_dir = "${env:NOPE_NOT_SET}/runs"\n')
    with pytest.raises(ConfigProblems) as exc:
        resolve(path)
    assert "NOPE_NOT_SET is not set" in problems_of(exc)


def test_section_reference_keeps_type_and_follows_overrides(write_toml):
    path = write_toml(
        "i.toml",
        '[eval]\nmax_new_tokens = "${rollout.max_new_tokens}"\n'
        '[run]\nrun_name = "g${rollout.num_generations}-t${rollout.temperature}"\n',
    )
    cfg = resolve(path, sets=["rollout.max_new_tokens=77", "rollout.num_generations=4"]).config
    assert cfg.eval.max_new_tokens == 77
    assert cfg.run.run_name == "g4-t0.7"


def test_reference_loop_and_unknown_reference(write_toml):
    path = write_toml(
        "i.toml", '[run]\noutput_dir = "${run.run_name}"\nrun_name = "${run.output_dir}"\n'
    )
    with pytest.raises(ConfigProblems, match="config problems") as exc:
        resolve(path)
    assert "reference loop" in problems_of(exc)
    bad = write_toml("j.toml", '[run]\noutput_dir = "${run.outptu_dir}"\n')
    with pytest.raises(ConfigProblems) as exc:
        resolve(bad)
    assert "did you mean 'run.output_dir'" in problems_of(exc)


# --- errors -------------------------------------------------------------------------------------


def test_unknown_keys_get_suggestions(write_toml):
    path = write_toml(
        "u.toml", "temprature = 1.0\n[rollout]\nlearning_rate = 1.0\n[rolout]\nx = 1\n"
    )
    with pytest.raises(ConfigProblems) as exc:
        resolve(path)
    text = problems_of(exc)
    assert f"{path}: unknown key 'temprature' — did you mean 'temperature'?" in text
    assert "[rollout] 'learning_rate' — did you mean 'optim.learning_rate'?" in text
    assert "unknown section [rolout] — did you mean [rollout]?" in text
    assert len(exc.value.problems) == 3  # every problem is reported, not just the first


def test_unknown_set_key_suggests_dotted_key():
    with pytest.raises(ConfigProblems) as exc:
        resolve(sets=["rollout.num_generation=4"])
    assert "did you mean 'rollout.num_generations'" in problems_of(exc)


@pytest.mark.parametrize(
    ("assignment", "fragment"),
    [
        ("optim.learning_rate=fast", "expected a number, got 'fast'"),
        ("rollout.num_generations=2.5", "expected an integer"),
        ("logging.jsonl=maybe", "expected a boolean (true/false, 1/0, yes/no, on/off)"),
        ("algorithm.loss_type=ppo", "must be one of grpo, bnpo, dr_grpo, dapo, gspo, cispo, sapo"),
        ("rollout.top_p=1.5", "must be at most 1"),
        ("rollout.temperature=0", "must be greater than 0"),
        ("rollout.num_generations=1", "must be at least 2"),
        ("novalue", "expected KEY=VALUE"),
    ],
)
def test_bad_set_values_name_key_value_type_and_layer(assignment, fragment):
    with pytest.raises(ConfigProblems) as exc:
        resolve(sets=[assignment])
    text = problems_of(exc)
    assert fragment in text
    if "=" in assignment:
        assert assignment.split("=")[0] in text and "--set" in text


@pytest.mark.parametrize(
    "word,expected", [("yes", True), ("off", False), ("1", True), ("FALSE", False)]
)
def test_bool_words(word, expected):
    assert resolve(sets=[f"logging.jsonl={word}"]).config.logging.jsonl is expected


def test_wrong_type_in_file_names_the_file(write_toml):
    path = write_toml("t.toml", '[rollout]\nnum_generations = "many"\n')
    with pytest.raises(ConfigProblems) as exc:
        resolve(path)
    assert "rollout.num_generations = 'many'" in problems_of(exc) and str(path) in problems_of(exc)


def test_bad_toml_syntax(write_toml):
    path = write_toml("bad.toml", "[rollout\ntemperature = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve(path)


def test_missing_file_is_an_error_never_a_fallback(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"MLX_GRPO_CONFIG.*not found"):
        resolve(environ={"MLX_GRPO_CONFIG": str(tmp_path / "nope.toml")})


def test_set_values_parse_lists_and_strings():
    cfg = resolve(
        sets=[
            "rewards.functions=correctness,int",
            "rewards.weights=[2.0, 0.5]",
            "run.run_name=2024",
            "model.adapter_path=none",
        ]
    ).config
    assert cfg.rewards.functions == ["correctness", "int"]
    assert cfg.rewards.weights == [2.0, 0.5]
    assert cfg.run.run_name == "2024"
    assert cfg.model.adapter_path is None


# --- cross-field rules --------------------------------------------------------------------------


def check(*sets):
    return resolve_config((), sets, None, environ={}, check_paths=True)


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (
            ["algorithm.clip_eps=0.2", "algorithm.clip_eps_high=0.1"],
            "clip_eps_high (0.1) must be >=",
        ),
        (["rewards.functions=correctness,int", "rewards.weights=1.0"], "one weight per function"),
        (
            [
                "optim.batch_size=3",
                "rollout.num_generations=2",
                "optim.gradient_accumulation_steps=4",
            ],
            "do not split into",
        ),
        (["eval.pass_k=4", "eval.temperature=0"], "pass_k > 1 needs eval.temperature"),
        (["model.path=./no/such/dir"], "directory not found"),
        (["rewards.functions=no_such_reward"], "rewards.functions"),
        (["data.dataset=synthetic:nope"], "Unknown synthetic task"),
        (["model.path=builtin:nope"], "no such built-in model"),
    ],
)
def test_cross_field_rules(sets, fragment):
    with pytest.raises(ConfigProblems) as exc:
        check(*sets)
    assert fragment in problems_of(exc)


def test_hub_ids_are_not_checked_as_paths():
    assert check("model.path=Qwen/Qwen2.5-0.5B-Instruct").config.model.path.startswith("Qwen/")


def test_every_field_has_help_text():
    missing = [k for k, s in field_specs().items() if not s.help]
    assert missing == []


def test_resolved_toml_round_trips(write_toml, tmp_path):
    import tomli_w

    source = write_toml("s.toml", "num_generations = 4\n[rollout]\nstop = ['###']\n")
    first = resolve(source, sets=["optim.learning_rate=2e-5"])
    text = tomli_w.dumps(first.config.to_dict(drop_none=True))
    again = resolve(write_toml("resolved.toml", text))
    assert again.config == first.config
    assert tomllib.loads(text)["rollout"]["stop"] == ["###"]
