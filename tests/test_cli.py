"""The `mlxgrpo` entry point: fast start, config commands, presets, errors and exit codes."""

from __future__ import annotations

import json
import sys
import tomllib

from conftest import REPO, run_subprocess

from mlxgrpo import __version__

HEAVY = ("mlx", "mlx.core", "mlx_lm", "transformers", "datasets")


def _imported_after(args: list[str]) -> set[str]:
    code = (
        "import sys\n"
        "from mlxgrpo.cli.app import main\n"
        f"code = main({args!r})\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    line = [x for x in result.stdout.splitlines() if x.startswith("HEAVY")][-1]
    return set(eval(line.split(" ", 1)[1]))  # noqa: S307 - our own printed list


def test_help_and_config_commands_import_no_mlx():
    assert _imported_after(["--help"]) == set()
    assert _imported_after(["config", "show", "--resolved", "-c", "prod"]) == set()
    assert _imported_after(["config", "validate", str(REPO / "configs" / "prod.toml")]) == set()
    assert _imported_after(["config", "keys"]) == set()
    for command in (["infer"], ["chat"], ["eval"], ["convert"], ["convert", "hf-model"]):
        assert _imported_after([*command, "--help"]) == set(), command


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"mlxgrpo {__version__}"


def test_version_module_matches_pyproject():
    """pyproject.toml states the version statically; mlxgrpo/version.py must say the same."""
    from mlxgrpo import version

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert version.__version__ == pyproject["project"]["version"] == __version__


def test_every_preset_validates(cli):
    presets = sorted((REPO / "configs").glob("*.toml"))
    assert {p.stem for p in presets} >= {
        "demo",
        "smoke_test",
        "ultra_light",
        "medium",
        "prod",
        "nanochat_grpo",
        "nanochat_d32",
        "nanochat_d32_test",
        "nanochat_test",
    }
    code, _, err = cli("config", "validate", *presets)
    assert code == 0, err
    assert err.count(": ok") == len(presets)


def test_preset_values_follow_the_original(cli):
    expected = {  # name: (max_train_samples, G, max_new_tokens)
        "smoke_test": (50, 2, 32),
        "ultra_light": (50, 2, 32),
        "medium": (200, 2, 32),
        "nanochat_grpo": (500, 4, 64),
        "nanochat_d32": (500, 4, 128),
        "nanochat_d32_test": (20, 2, 64),
        "nanochat_test": (10, 2, 32),
        "prod": (2000, 16, 256),
    }
    for name, (samples, group, tokens) in expected.items():
        code, out, err = cli("config", "show", "--resolved", "-c", name)
        assert code == 0, err
        data = tomllib.loads(out)
        got = (
            data["run"]["max_train_samples"],
            data["rollout"]["num_generations"],
            data["rollout"]["max_new_tokens"],
        )
        assert got == (samples, group, tokens), name
    _, out, _ = cli("config", "show", "--resolved", "-c", "nanochat_d32")
    d32 = tomllib.loads(out)
    assert d32["optim"]["learning_rate"] == 3e-6 and d32["algorithm"]["kl_coeff"] == 0.02
    assert d32["rollout"]["quantize_bits"] == 0


def test_validate_reports_every_problem_of_every_file(cli, write_toml):
    good = write_toml("good.toml", "[rollout]\nnum_generations = 4\n")
    bad = write_toml(
        "bad.toml", '[rollout]\nnum_generations = 1\ntop_p = "high"\n[optim]\nlearnin_rate = 1\n'
    )
    code, _, err = cli("config", "validate", bad, good)
    assert code == 2
    assert "bad.toml: 3 problem(s)" in err
    assert "did you mean 'optim.learning_rate'" in err and "must be at least 2" in err
    assert "good.toml: ok" in err


def test_show_only_changes_by_default_and_sources(cli, write_toml):
    path = write_toml("x.toml", "[rollout]\ntemperature = 0.3\n")
    code, out, err = cli("config", "show", "-c", path, "--set", "run.seed=5", "--sources")
    assert code == 0, err
    assert tomllib.loads(out) == {"rollout": {"temperature": 0.3}, "run": {"seed": 5}}
    assert "rollout.temperature" in err and "x.toml" in err and "--set run.seed=5" in err
    code, out, _ = cli("config", "show", "--resolved", "--format", "json")
    data = json.loads(out)
    assert data["rollout"]["num_generations"] == 8 and data["model"]["adapter_path"] is None


def test_config_show_reads_env_file(tmp_path, write_toml):
    path = write_toml("env.toml", "[run]\nseed = 9\n")
    result = run_subprocess(["config", "show"], env={"MLX_GRPO_CONFIG": str(path)})
    assert result.returncode == 0
    assert tomllib.loads(result.stdout) == {"run": {"seed": 9}}


def test_keys_lists_every_key_with_legacy_names(cli):
    code, out, _ = cli("config", "keys", "rollout")
    assert code == 0
    assert "rollout.num_generations" in out and "num_generations" in out
    assert "optim.learning_rate" not in out


def test_errors_are_one_line_with_exit_code_2_and_no_traceback(tmp_path):
    result = run_subprocess(["config", "show", "-c", str(tmp_path / "missing.toml")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config file")
    assert "Traceback" not in result.stderr
    result = run_subprocess(["train", "--set", "rollout.temperature=hot"])
    assert result.returncode == 2 and "expected a number, got 'hot'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_env_config_file_is_an_error(tmp_path):
    result = run_subprocess(["config", "show"], env={"MLX_GRPO_CONFIG": str(tmp_path / "n.toml")})
    assert result.returncode == 2 and "MLX_GRPO_CONFIG" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_subprocess(["--debug", "config", "show", "-c", str(tmp_path / "missing.toml")])
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_usage_errors_exit_2(cli):
    code, _, err = cli("config", "show", "--format", "yaml")
    assert code == 2 and "yaml" in err
    code, _, _ = cli("no-such-command")
    assert code == 2


def test_train_missing_local_model_is_a_config_error(cli, tmp_path):
    code, _, err = cli("train", "-c", "demo", "--model", str(tmp_path / "nope"))
    assert code == 2 and "directory not found" in err


def test_doctor_reports_openblas(cli):
    code, out, _ = cli("doctor", "--json")
    report = json.loads(out)
    assert code == 0 and report["blas"]["name"].startswith("OpenBLAS")


def test_keys_stay_readable_in_an_80_column_terminal():
    result = run_subprocess(["config", "keys", "algorithm"], env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    # Each key starts its own line, whole, with its type and default beside it.
    assert "algorithm.importance_sampling_level  a string, default token" in lines
    # Meanings wrap at word boundaries across the full width, not in a narrow column.
    text = " ".join(line.strip() for line in lines)
    assert "importance_sampling_level = sequence (GSPO)" in text


def test_a_missing_mlx_backend_is_one_line_naming_the_extra(monkeypatch, capsys):
    from mlxgrpo.cli import app as cli_app

    def no_backend(**_):
        raise ImportError("libmlx.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(cli_app, "app", no_backend)
    assert cli_app.main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert "MLX has no backend library" in err and "mlxgrpo[cpu]" in err
    assert "Traceback" not in err


def test_model_text_is_printed_as_is_never_as_emoji(cli, capsys):
    """Rich would turn ":x:" in an answer into an emoji; every console prints it verbatim."""
    from mlxgrpo import ui

    ui.raw('{"completion": "Y:x:x"}\n')
    ui.stream_piece(":smile: :x:")
    ui.success("saved :x:")
    captured = capsys.readouterr()
    assert captured.out == '{"completion": "Y:x:x"}\n:smile: :x:'
    assert "saved :x:" in captured.err
