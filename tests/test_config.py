"""The config object: defaults = train.json, the merge order, coercion, and every error reported at once."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_train
from trainer.config.docs import help_text
from trainer.config.load import ConfigError, load_config
from trainer.config.schema import FIELD_TYPES, FIELDS, TrainConfig, config_to_dict, save_config

ED2_TRAIN_JSON = Path(__file__).parent / "fixtures" / "everydream2_train.json"


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    return root


def write_json(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


def problems_of(argv: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return info.value.problems


def test_defaults_are_exactly_train_json():
    shipped = json.loads((REPO_ROOT / "train.json").read_text(encoding="utf-8"))
    assert shipped == config_to_dict(TrainConfig())
    assert list(shipped) == list(FIELDS)  # same order, so the file reads like --help


def test_required_everydream2_key_names_exist():
    for key in (
        "resume_ckpt data_root resolution batch_size grad_accum max_epochs lr seed logdir project_name run_name "
        "save_every_n_epochs save_ckpt_dir disable_textenc_training gradient_checkpointing mixed_precision max_steps"
    ).split():
        assert key in FIELDS, key
    assert TrainConfig().resume_ckpt == "panopstor/EveryDream"


def test_cli_beats_json_beats_defaults(tmp_path: Path, data_root: Path):
    config = write_json(tmp_path / "c.json", {"data_root": str(data_root), "batch_size": 3, "lr": 1e-4, "seed": 1})
    loaded = load_config(["--config", str(config), "--lr", "2e-5", "--max_steps=7"])
    cfg = loaded.config
    assert (cfg.batch_size, cfg.lr, cfg.max_steps, cfg.seed) == (3, 2e-5, 7, 1)
    assert cfg.resolution == 512  # default
    assert loaded.sources["lr"] == "command line" and loaded.sources["batch_size"] == str(config)
    assert loaded.sources["resolution"] == "default"


def test_cli_values_take_the_field_type(tmp_path: Path, data_root: Path):
    cfg = load_config(
        ["--config", str(write_json(tmp_path / "c.json", {})), "--data_root", str(data_root), "--resolution", "768",
         "--lr", "1", "--clip_grad_norm", "1.5", "--run_name", "r1", "--mixed_precision", "bf16"]
    ).config
    assert cfg.resolution == 768 and isinstance(cfg.resolution, int)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.clip_grad_norm == 1.5 and cfg.run_name == "r1" and cfg.mixed_precision == "bf16"
    assert load_config(["--data_root", str(data_root), "--clip_grad_norm", "null"]).config.clip_grad_norm is None


@pytest.mark.parametrize(
    "args, expected",
    [(["--disable_textenc_training"], True), (["--disable_textenc_training", "true"], True),
     (["--disable_textenc_training", "false"], False), (["--disable_textenc_training=False"], False),
     (["--disable_textenc_training", "--lr", "1e-5"], True)],
)
def test_boolean_flags(args: list[str], expected: bool, data_root: Path):
    assert load_config(["--data_root", str(data_root), *args]).config.disable_textenc_training is expected


BOOLEAN_KEYS = [name for name, tp in FIELD_TYPES.items() if bool in (tp, *typing.get_args(tp))]


@pytest.mark.parametrize("key", BOOLEAN_KEYS)
def test_every_boolean_key_takes_the_bare_flag_as_true(key: str, data_root: Path):
    """`--gradient_checkpointing` alone, as EveryDream2's docs write it, for every boolean key, nullable or not,
    at the end of the command line and before another option; --help shows each as an optional [BOOL]."""
    lora = ["--lora_rank", "4"] if key.startswith("lora_") else \
        ["--masked_training"] if key in ("mask_from_alpha", "normalize_masked_area_loss") else []
    for argv in ([*lora, f"--{key}"], [f"--{key}", *lora, "--seed", "3"]):
        assert getattr(load_config(["--data_root", str(data_root), *argv]).config, key) is True
    assert f"--{key} [BOOL]" in help_text()


def test_nullable_boolean_keys_are_covered_by_the_bare_flag_test():
    assert {"gradient_checkpointing", "channels_last"} <= set(BOOLEAN_KEYS) and len(BOOLEAN_KEYS) >= 10


def test_every_problem_reported_together(tmp_path: Path, data_root: Path):
    config = write_json(tmp_path / "c.json", {"data_root": str(data_root), "batchsize": 4, "lr": "fast"})
    problems = problems_of(
        ["--config", str(config), "--resolutin", "512", "--batch_size", "-1", "--resolution", "500",
         "--mixed_precision", "fp8", "--max_epochs", "two"]
    )
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "batchsize: unknown key (from" in text and "did you mean 'batch_size'?" in text
    assert "resolutin: unknown key (from command line); did you mean 'resolution'?" in text
    assert "lr: got 'fast' (from " in text and "expected a number, or null." in text
    assert "batch_size: got -1 (from command line); expected an integer >= 1." in text
    assert "resolution: got 500 (from command line); expected a multiple of 64" in text
    assert 'mixed_precision: got \'fp8\' (from command line); expected one of "auto", "no", "fp16", "bf16".' in text
    assert "max_epochs: got 'two' (from command line); expected a whole number." in text


@pytest.mark.slow
def test_config_errors_and_the_preflights_problems_come_in_one_round(tmp_path: Path, data_root: Path):
    """A bad value and a missing file the preflight finds are fixed in one round trip, not two: the preflight runs
    on the rest of the config (each bad key at its default), and what it says of a bad key is not said twice."""
    result = run_train(["--data_root", str(data_root), "--lr", "fast", "--batch_size", "-1", "--resume_ckpt",
                        "no_such_model", "--logdir", str(tmp_path / "logs")], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    text = result.stderr
    assert text.startswith("train.py: 2 problems in the configuration:\n  - lr: got 'fast'")
    assert "\n2 more problems found by the preflight:\n" in text
    assert f"  - data_root '{data_root}' holds no images" in text
    assert "  - resume_ckpt 'no_such_model' was not found. Looked for:\n      - a diffusers folder at " in text
    assert not (tmp_path / "logs").exists()

    missing = run_train(["--data_root", str(tmp_path / "nope"), "--resolution", "500"], cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("data_root") == 1  # not again by the preflight
    assert "preflight" not in missing.stderr

    # a problem of a file that merely mentions a bad key's name is its own, and is said in the same round
    write_json(tmp_path / "prompts.json", {"batch_size": "x", "samples": ["a cat"]})
    both = run_train(["--data_root", str(data_root), "--batch_size", "0", "--sample_prompts", "prompts.json"],
                     cwd=tmp_path)
    assert both.returncode == 2 and "batch_size: got 0 (from command line)" in both.stderr
    assert "batch_size: got 'x'; expected an integer from 1 to 64" in both.stderr, both.stderr


def test_missing_data_root_and_wrong_json_types(tmp_path: Path):
    config = write_json(tmp_path / "c.json", {"data_root": str(tmp_path / "nope"), "batch_size": "4", "flip_p": 2})
    text = "\n".join(problems_of(["--config", str(config)]))
    assert "data_root: got" in text and "does not exist" in text
    assert "batch_size: got '4'" in text and "expected a whole number" in text
    assert "flip_p: got 2.0" in text and "probability from 0 to 1" in text


def test_broken_json_file(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": 1e-5,,}', encoding="utf-8")
    problem = problems_of(["--config", str(bad), "--data_root", str(tmp_path)])
    assert len(problem) == 1 and "is not valid json" in problem[0] and "line 1" in problem[0]
    assert problem[0].endswith("Correct it, or pass --config with another json file of settings.")
    problem = problems_of(["--config", str(tmp_path / "missing.json"), "--data_root", str(tmp_path)])
    assert len(problem) == 1 and "missing.json does not exist" in problem[0]
    # the defaults the unread file would have replaced are no problem of the user's (data_root 'input' here)
    assert problems_of(["--config", str(bad)]) == problems_of(["--config", str(bad), "--data_root", str(tmp_path)])


def test_everydream2_train_json_loads(data_root: Path):
    loaded = load_config(["--config", str(ED2_TRAIN_JSON), "--data_root", str(data_root), "--optimizer_config", "null",
                           "--sample_prompts", "null", "--validation_config", "null"])
    cfg = loaded.config
    assert (cfg.batch_size, cfg.max_epochs, cfg.project_name, cfg.save_every_n_epochs) == (10, 1, "project_abc", 20)
    assert cfg.mixed_precision == "fp16"  # disable_amp: false
    translated = [n for n in loaded.notices if n.startswith("disable_amp")]
    assert translated == ["disable_amp: false (EveryDream2 key) is read as mixed_precision: 'fp16'."]
    assert loaded.warnings == []  # its EveryDream2-only keys are all null, false or default: they ask for nothing
    assert cfg.gpuid == 0
    assert "ema_update_interval: null in" in "\n".join(loaded.notices)  # ED2's null means the default
    assert cfg.ema_update_interval == 1


def test_everydream2_translation_on_cli_and_typo_still_an_error(data_root: Path):
    ed2 = ["--config", str(ED2_TRAIN_JSON), "--data_root", str(data_root), "--optimizer_config", "null",
           "--sample_prompts", "null", "--validation_config", "null"]
    cfg = load_config([*ed2, "--amp", "false", "--useadam8bit"]).config
    assert cfg.mixed_precision == "no" and cfg.optimizer == "adamw8bit"
    problems = problems_of([*ed2, "--cond_dropot", "0.1"])
    assert problems == ["cond_dropot: unknown key (from command line); did you mean 'cond_dropout'?"]


def test_saved_config_loads_back_identically(tmp_path: Path, data_root: Path):
    cfg = load_config(["--data_root", str(data_root), "--lr", "3e-5", "--run_name", "x", "--clip_grad_norm", "2"]).config
    save_config(cfg, tmp_path / "saved.json")
    assert load_config(["--config", str(tmp_path / "saved.json")]).config == cfg


def test_help_lists_every_key_with_type_and_default():
    text = help_text()
    for name, f in FIELDS.items():
        assert f"--{name} " in text
    assert "--resolution INT" in text and "(default: 512)" in text
    assert "--mixed_precision {auto,no,fp16,bf16}" in text


def run_cli(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = run_train(args, cwd)
    return result, time.perf_counter() - start


@pytest.mark.slow
def test_bad_config_process_exits_2_without_traceback_or_files(tmp_path: Path):
    result, _ = run_cli(["--data_root", "nope", "--batch_size", "0", "--lrr", "1", "--logdir", "out"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "3 problems in the configuration" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_help_and_errors_answer_without_importing_torch(tmp_path: Path):
    result, _ = run_cli(["--help"], tmp_path)
    assert result.returncode == 0 and "--data_root TEXT" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, trainer.config.load; print('torch' in sys.modules, 'diffusers' in sys.modules)"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert probe.stdout.split() == ["False", "False"]


def test_replace_keeps_types():
    # the config is a plain dataclass: code reads attributes, never dict lookups with defaults
    cfg = dataclasses.replace(TrainConfig(), seed=3)
    assert cfg.seed == 3 and cfg.lr == TrainConfig().lr


def test_config_docs_are_generated_from_the_config_object():
    from trainer.config.docs import markdown_reference

    assert (REPO_ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8") == markdown_reference(), (
        "docs/CONFIG.md is stale: run python utils/write_config_docs.py"
    )


def test_a_relative_path_of_a_json_file_found_beside_it_says_where_paths_start(tmp_path: Path, data_root: Path,
                                                                               monkeypatch):
    """EveryDream2's train.json names "optimizer.json": run from another folder, it is not found here, and the
    message says where it is and how to go on."""
    (tmp_path / "ed2").mkdir()
    config = write_json(tmp_path / "ed2" / "train.json", {"data_root": str(data_root),
                                                          "optimizer_config": "optimizer.json"})
    write_json(tmp_path / "ed2" / "optimizer.json", {})
    (elsewhere := tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(elsewhere)
    (problem,) = problems_of(["--config", str(config)])
    assert problem.endswith(f"Relative paths start at the current folder, {elsewhere}, and optimizer.json is "
                            f"beside {config}: run from {tmp_path / 'ed2'}, or give its full path "
                            f"{tmp_path / 'ed2' / 'optimizer.json'}.")
    monkeypatch.chdir(tmp_path / "ed2")  # the first way: it loads
    assert load_config(["--config", str(config)]).config.optimizer_config == "optimizer.json"
