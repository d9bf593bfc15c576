"""EveryDream2 users' files as they are: its train.json keys, validation json, resume_ckpt findlast, and its own
shipped files (../shared/everydream2, beside the project; read there, never copied into the project).

The fast tests read our own fixture files in EveryDream2's schemas, and dry-run every shipped train-style file
in a real `python train.py --dry_run` process. The slow ones train the tiny models with the shipped files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_train
from trainer.config import everydream2 as ed2
from trainer.config.load import ConfigError, load_config
from trainer.config.schema import FIELDS
from trainer.errors import UserError
from trainer.evaluation.validation import ValidationPlan, plan_validation, read_validation_json
from trainer.preflight.checks import find_last_model, resolve_find_last, run_preflight

SHIPPED = REPO_ROOT.parent / "shared" / "everydream2"
needs_shipped = pytest.mark.skipif(not SHIPPED.is_dir(), reason="EveryDream2's files are not beside the project")
CURRENT = sorted(p for p in SHIPPED.glob("*.json") if p.name.startswith(("train", "chain"))) + [
    SHIPPED / "cfgs" / "train_coco.json"] if SHIPPED.is_dir() else []
HISTORY = sorted(SHIPPED.glob("history/*.json")) if SHIPPED.is_dir() else []
TRAIN_STYLE = CURRENT + HISTORY


def write_json(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


@pytest.fixture
def ed2_folder(tmp_path: Path) -> Path:
    """A working folder holding EveryDream2's shipped files, as its users run from (copied per test, in tmp)."""
    folder = tmp_path / "ed2"
    shutil.copytree(SHIPPED, folder)
    return folder


# ---------------------------------------------------------------- train.json keys


@needs_shipped
def test_every_key_of_everydream2s_files_is_known():
    """A key that EveryDream2's own train-style files use is ours, translated, or known and not honoured."""
    keys = {key for path in TRAIN_STYLE for key in json.loads(path.read_text(encoding="utf-8"))}
    unknown = sorted(k for k in keys if k not in FIELDS and k not in ed2.KNOWN_KEYS)
    assert unknown == []
    assert len(TRAIN_STYLE) >= 30


# every option of EveryDream2's train.py (its argparse, at the commit its shipped files come from), but --config
ED2_COMMAND_LINE = """
    amp attn_type batch_size ckpt_every_n_minutes clip_grad_norm clip_skip cond_dropout data_root
    disable_amp disable_textenc_training disable_unet_training ema_decay_rate ema_device
    ema_resume_model ema_sample_ema_model ema_sample_nonema_model ema_strength_target
    ema_update_interval embedding_perturbation enable_zero_terminal_snr flip_p gpuid grad_accum
    gradient_checkpointing keep_tags load_settings_every_epoch log_step logdir loss_type lr
    lr_decay_steps lr_scheduler lr_warmup_steps max_epochs min_snr_gamma no_prepend_last
    no_save_ckpt optimizer_config plugins project_name pyramid_noise_discount rated_dataset
    rated_dataset_target_dropout_percent resolution resume_ckpt run_name sample_prompts sample_steps
    save_ckpt_dir save_ckpts_from_n_epochs save_every_n_epochs save_full_precision save_optimizer
    seed shuffle_tags timestep_end timestep_start train_sampler validation_config wandb
    write_schedule zero_frequency_noise_ratio
""".split()


def test_every_option_of_everydream2s_command_line_is_known():
    assert [k for k in ED2_COMMAND_LINE if k not in FIELDS and k not in ed2.KNOWN_KEYS] == []


def test_translations_notices_and_one_warning(tmp_path: Path):
    config = write_json(tmp_path / "t.json", {
        "data_root": str(tmp_path), "amp": False, "disable_xformers": False, "ed1_mode": True, "gpuid": 0,
        "lowvram": False, "ema_device": "cuda", "ema_decay_interval": 10, "no_save_ckpt": True, "attn_type": "slice",
    })
    loaded = load_config(["--config", str(config)])
    cfg = loaded.config
    assert (cfg.mixed_precision, cfg.attn_type, cfg.ema_device, cfg.ema_update_interval) == ("no", "sdp", "gpu", 10)
    assert cfg.save_single_file is False
    notices = "\n".join(loaded.notices)
    assert "disable_xformers: false (EveryDream2 key) is read as attn_type: 'sdp'." in notices
    assert "ema_device: 'cuda' (EveryDream2's value) is read as 'gpu'." in notices
    assert "attn_type: 'slice' (EveryDream2's value) is read as 'sdp'." in notices
    (warning,) = loaded.warnings  # lowvram false asks for nothing: not named
    assert warning.startswith("EveryDream2 keys not used here, ignored") and warning.endswith(": ed1_mode.")
    assert cfg.gpuid == 0


def test_keys_that_would_change_the_training_are_refused_and_defaults_say_nothing(tmp_path: Path):
    config = write_json(tmp_path / "t.json", {"data_root": str(tmp_path), "disable_unet_training": True,
                                              "ema_strength_target": 0.1, "rated_dataset": True, "scale_lr": True})
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(config)])
    assert [p.split(" (from")[0] for p in err.value.problems] == [  # the first judged once all is merged
        "ema_strength_target: 0.1", "rated_dataset: true", "disable_unet_training: true"]
    assert "set ema_decay_rate instead" in err.value.problems[0]
    quiet = write_json(tmp_path / "q.json", {"data_root": str(tmp_path), "disable_unet_training": False,
                                             "ema_strength_target": None, "rated_dataset_target_dropout_percent": 50,
                                             "write_schedule": False, "train_sampler": "ddpm", "notebook": False})
    assert load_config(["--config", str(quiet)]).warnings == []


def test_everydream2_keys_on_the_command_line_read_as_in_its_json(tmp_path: Path):
    """A bare flag is true for the keys we refuse or do not use too, and false, 0 or the default say nothing."""
    with pytest.raises(ConfigError) as err:
        load_config(["--data_root", str(tmp_path), "--disable_unet_training"])
    assert err.value.problems[0].startswith("disable_unet_training: true (from command line), an EveryDream2 key "
                                            "not supported here")
    assert load_config(["--data_root", str(tmp_path), "--lowvram"]).warnings == [
        "EveryDream2 keys not used here, ignored (docs/EVERYDREAM2.md says why and what to use): lowvram."]
    quiet = ["--disable_unet_training", "false", "--lowvram", "false", "--notebook", "0", "--write_schedule", "no"]
    assert load_config(["--data_root", str(tmp_path), *quiet]).warnings == []


def test_our_key_wins_over_a_translation_in_the_same_file(tmp_path: Path):
    config = write_json(tmp_path / "t.json", {"data_root": str(tmp_path), "attn_type": "xformers",
                                              "disable_xformers": True, "amp": True, "mixed_precision": "bf16"})
    cfg = load_config(["--config", str(config)]).config
    assert (cfg.attn_type, cfg.mixed_precision) == ("xformers", "bf16")


def test_a_typo_of_an_everydream2_key_is_still_refused(tmp_path: Path):
    config = write_json(tmp_path / "t.json", {"data_root": str(tmp_path), "ed1_mod": True, "disable_xformer": True})
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(config)])
    assert err.value.problems == [
        "ed1_mod: unknown key (from %s); did you mean 'ed1_mode'?" % config,
        "disable_xformer: unknown key (from %s); did you mean 'disable_xformers'?" % config,
    ]


def test_wrong_type_of_a_translated_key_is_reported(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        load_config(["--data_root", str(tmp_path), "--amp", "maybe"])
    assert err.value.problems == ["amp: got 'maybe' (from command line); expected true or false."]


# ---------------------------------------------------------------- the validation json


@needs_shipped
def test_shipped_validation_files_plan():
    notices: list[str] = []
    default = read_validation_json(SHIPPED / "validation_default.json", notices)
    assert default == ValidationPlan(split=0.15, data_root=None, extra={}, stabilize=0.0, every_n_epochs=1.0, seed=555)
    coco = read_validation_json(SHIPPED / "cfgs" / "validation_coco.json", notices)
    # its "validate_training": "true" (a string), and the older names val_data_root / val_split_proportion
    assert coco.data_root == "Q:/mldata/coco2017/val2017" and coco.split == 0.0 and coco.stabilize == 0.15
    assert any("val_data_root (EveryDream2's older name) is read as manual_data_root" in n for n in notices)


def test_validation_json_every_key(tmp_path: Path):
    path = write_json(tmp_path / "v.json", {
        "validate_training": True, "val_split_mode": "manual", "manual_data_root": "val",
        "extra_manual_datasets": {"santa": "santa_imgs"}, "stabilize_training_loss": True,
        "stabilize_split_proportion": 0.25, "every_n_epochs": 0.5, "seed": 7, "use_relative_loss": True,
        "documentation": {"anything": "goes"},
    })
    notices: list[str] = []
    plan = read_validation_json(path, notices)
    assert plan == ValidationPlan(split=0.0, data_root="val", extra={"santa": "santa_imgs"}, stabilize=0.25,
                                  every_n_epochs=0.5, seed=7)
    assert any("use_relative_loss is not used" in n for n in notices)
    off = read_validation_json(write_json(tmp_path / "off.json", {"validate_training": False,
                                                                  "extra_manual_datasets": {"a": "b"}}), [])
    assert (off.split, off.data_root, off.extra) == (0.0, None, {"a": "b"})  # extra sets still measured


def test_validation_is_placed_in_each_epoch_as_everydream2_places_it():
    thirds = ValidationPlan(every_n_epochs=0.33)
    assert [thirds.steps_in_epoch(epoch, 8) for epoch in (1, 2)] == [[3, 6, 8], [3, 6, 8]]  # ends on the epoch's end
    assert ValidationPlan(every_n_epochs=0.01).steps_in_epoch(1, 4) == [1, 2, 3, 4]  # at most every step
    every_other = ValidationPlan(every_n_epochs=2)
    assert [every_other.steps_in_epoch(epoch, 8) for epoch in (1, 2, 3, 4)] == [[], [8], [], [8]]
    assert [ValidationPlan(every_n_epochs=1.5).steps_in_epoch(epoch, 8) for epoch in (1, 2, 3)] == [[], [], [8]]


def test_values_the_chosen_mode_never_reads_are_not_checked(tmp_path: Path):
    manual = write_json(tmp_path / "m.json", {"val_split_mode": "manual", "manual_data_root": "v",
                                              "auto_split_proportion": 0, "stabilize_training_loss": False,
                                              "stabilize_split_proportion": 0})
    plan = read_validation_json(manual, [])
    assert (plan.split, plan.data_root, plan.stabilize) == (0.0, "v", 0.0)


def test_validation_json_problems_name_the_file_and_key(tmp_path: Path):
    path = write_json(tmp_path / "v.json", {
        "val_split_mode": "sometimes", "auto_split_proportion": 1.5, "every_n_epochs": 0, "seed": "x",
        "validate_trainin": True, "extra_manual_datasets": ["a"],
    })
    with pytest.raises(UserError) as err:
        read_validation_json(path, [])
    text = str(err.value)
    assert f"6 problems found in validation_config {path}" in text
    for expected in ("val_split_mode: got 'sometimes'", "auto_split_proportion: got 1.5", "every_n_epochs: got 0",
                     "seed: got 'x'", "validate_trainin: unknown key; did you mean 'validate_training'?",
                     "extra_manual_datasets: got ['a']"):
        assert f"validation_config {path}: {expected}" in text
    manual = write_json(tmp_path / "m.json", {"val_split_mode": "manual"})
    with pytest.raises(UserError, match="manual_data_root is not set"):
        read_validation_json(manual, [])


def test_validation_json_in_the_preflight(tmp_path: Path, shapes_dir: Path):
    """Held out, extra set and stabilizing images come from the json; a fraction of an epoch becomes steps."""
    extra = tmp_path / "extra"
    shutil.copytree(shapes_dir, extra)
    path = write_json(tmp_path / "v.json", {"auto_split_proportion": 0.25, "extra_manual_datasets": {"more": str(extra)},
                                            "stabilize_training_loss": True, "stabilize_split_proportion": 0.5,
                                            "every_n_epochs": 0.5})
    cfg = load_config(["--data_root", str(shapes_dir), "--validation_config", str(path), "--resolution", "64",
                       "--batch_size", "2", "--logdir", str(tmp_path / "logs"), "--max_epochs", "2"]).config
    preflight = run_preflight(cfg, tmp_path / "logs" / "run")
    sets = preflight.validation
    assert {name: len(items) for name, items in sets.items()} == {"validation": 4, "more": 16, "train-stabilized": 6}
    assert len(preflight.scan.items) == 12 and not set(sets["validation"]) & set(preflight.scan.items)
    assert set(sets["train-stabilized"]) <= set(preflight.scan.items)
    assert preflight.steps_per_epoch == 6 and preflight.validation_plan.steps_in_epoch(1, 6) == [3, 6]
    assert plan_validation(cfg).every_n_epochs == 0.5
    missing = write_json(tmp_path / "w.json", {"extra_manual_datasets": {"gone": str(tmp_path / "nowhere")}})
    cfg = load_config(["--data_root", str(shapes_dir), "--validation_config", str(missing), "--resolution", "64",
                       "--logdir", str(tmp_path / "logs")]).config
    with pytest.raises(UserError, match=r"w.json extra_manual_datasets\['gone'\] '.*nowhere': folder cannot be read"):
        run_preflight(cfg, tmp_path / "logs" / "run2")


# ---------------------------------------------------------------- resume_ckpt findlast


def fake_save(folder: Path, mtime: float) -> Path:
    folder.mkdir(parents=True)
    index = folder / "model_index.json"
    index.write_text("{}", encoding="utf-8")
    os.utime(index, (mtime, mtime))
    return folder


def test_find_last_model_takes_the_newest_complete_save(tmp_path: Path):
    logs = tmp_path / "logs"
    assert find_last_model([logs]) is None
    fake_save(logs / "run1" / "ckpts" / "last-run1-ep01-gs00004", 1000)
    newest = fake_save(logs / "run2" / "ckpts" / "last-run2-ep01-gs00008", 2000)
    fake_save(logs / "run2" / "ckpts" / "last-run2-ep01-gs00008-ema", 3000)  # an EMA twin is not the model
    fake_save(logs / "run3" / "ckpts" / ".last-run3.partial-1-2", 4000)  # a save still being written
    assert find_last_model([logs]) == newest


def test_resume_ckpt_findlast_resolves_or_says_there_is_none(tmp_path: Path, capsys):
    cfg = load_config(["--data_root", str(tmp_path), "--resume_ckpt", "findlast",
                       "--logdir", str(tmp_path / "logs")]).config
    assert resolve_find_last(cfg).resume_ckpt == "findlast"  # no save: the preflight says so beside the rest
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(UserError) as refused:
        run_preflight(dataclasses.replace(cfg, save_ckpt_dir=str(tmp_path / "x.png")), tmp_path / "logs" / "r")
    assert re.search(r"resume_ckpt findlast: there is no saved model under .*logs or .*x\.png yet", str(refused.value))
    assert "x.png is a file, not a folder" in str(refused.value) and "none could be used" in str(refused.value)
    save = fake_save(tmp_path / "logs" / "run" / "ckpts" / "last-x", 1000)
    assert resolve_find_last(cfg).resume_ckpt == str(save)
    assert f"continuing from {save}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resume_ckpt_that_can_be_nothing_is_refused_by_the_dry_run(tmp_path: Path, shapes_dir: Path):
    """chain0.json's "sd_v1-5_vae" (a name in EveryDream2's ckpt_cache) is no folder, file, cache name or repo id
    here: said before torch loads, not after."""
    result = run_train(["--data_root", str(shapes_dir), "--resume_ckpt", "sd_v1-5_vae", "--dry_run"], tmp_path)
    assert result.returncode == 2
    assert "resume_ckpt 'sd_v1-5_vae' was not found. Looked for:" in result.stderr
    assert "a Hugging Face repo id (owner/name or owner/name@revision)" in result.stderr


# ---------------------------------------------------------------- the shipped files, in real processes


FAST_SHIPPED = {"train.json", "chain1.json", "chain2.json"}


@needs_shipped
@pytest.mark.parametrize("config", [  # the plain train.json and the findlast chains in the default tier
    *(p if p.name in FAST_SHIPPED else pytest.param(p, marks=pytest.mark.slow) for p in CURRENT),
    *(pytest.param(p, marks=pytest.mark.slow) for p in HISTORY)], ids=lambda p: str(p.relative_to(SHIPPED)))
@pytest.mark.slow
def test_every_shipped_train_json_dry_runs(config: Path, ed2_folder: Path, shapes_dir: Path, tiny_model):
    """Only data_root and resume_ckpt on the command line (and findlast for the chained files' resume_ckpt)."""
    relative = config.relative_to(SHIPPED)
    args = ["--config", str(relative), "--data_root", str(shapes_dir), "--dry_run"]
    values = json.loads(config.read_text(encoding="utf-8"))
    if values.get("resume_ckpt") != "findlast":
        args += ["--resume_ckpt", str(tiny_model("sd1"))]
    else:  # findlast needs a save in logdir: one there, as a previous run of the chain leaves it
        fake_save(ed2_folder / "logs" / "earlier" / "ckpts" / "last-earlier", 1000)
    if values.get("validation_config") == "cfgs/validation_coco.json":  # its validation images, where it says
        shutil.copytree(shapes_dir, ed2_folder / "Q:" / "mldata" / "coco2017" / "val2017")
    if values.get("wandb") and importlib.util.find_spec("wandb") is None:
        # what the user sees on a machine without wandb: the one problem, and what to do
        result = run_train(args, ed2_folder)
        assert result.returncode == 2 and "1 problem found before training started" in result.stderr
        assert "wandb: asks for the wandb package, which is not installed; pip install wandb" in result.stderr
        args += ["--wandb", "false"]
    result = run_train(args, ed2_folder)
    assert result.returncode == 0, result.stderr
    assert "Preflight: every check passed." in result.stdout
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: Config:")]
    assert len(warnings) <= 1 and all("EveryDream2 keys not used here" in w for w in warnings)


def saved_models(output: str) -> list[Path]:
    return [Path(line.split("Saved model: ", 1)[1].strip()) for line in output.splitlines() if "Saved model: " in line]


@needs_shipped
@pytest.mark.slow
def test_shipped_train_json_trains_tiny_sd1(ed2_folder: Path, shapes_dir: Path, tiny_model):
    """EveryDream2's train.json with its optimizer.json (adamw8bit, a cosine text-encoder schedule), its
    validation_default.json and its sample_prompts.json; only the model, data and size made tiny (the sample
    prompts' own 640x384 too: at that size the tiny model's attention took half of this test's minute)."""
    prompts = ed2_folder / "sample_prompts.json"
    shipped = json.loads(prompts.read_text(encoding="utf-8"))
    assert [sample.get("size") for sample in shipped["samples"]] == [None, None, [640, 384]]
    shipped["samples"][2]["size"] = [128, 64]
    prompts.write_text(json.dumps(shipped), encoding="utf-8")
    result = run_train(["--config", "train.json", "--data_root", str(shapes_dir), "--resume_ckpt",
                        str(tiny_model("sd1")), "--resolution", "64", "--max_epochs", "2",
                        "--sample_prompts", "sample_prompts.json"], ed2_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    (model,) = saved_models(result.stdout)
    assert model.parent.parent.name.startswith("project_abc_") and (model / "model_index.json").is_file()
    assert "Validation loss at step" in result.stdout
    assert "Samples at step" in result.stdout and "Traceback" not in result.stderr


@needs_shipped
@pytest.mark.slow
def test_shipped_train_sd21_json_trains_tiny_sd2_v_without_xformers(ed2_folder: Path, shapes_dir: Path, tiny_model):
    assert importlib.util.find_spec("xformers") is None  # the machine these users' files failed on
    result = run_train(["--config", "trainSD21.json", "--data_root", str(shapes_dir), "--resume_ckpt",
                        str(tiny_model("sd2-v")), "--resolution", "64", "--max_epochs", "2"], ed2_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "disable_xformers: false (EveryDream2 key) is read as attn_type: 'sdp'." in result.stdout
    assert "v_prediction" in result.stdout and len(saved_models(result.stdout)) == 1


@needs_shipped
@pytest.mark.slow
def test_shipped_chain_continues_from_the_first_runs_save(ed2_folder: Path, shapes_dir: Path, tiny_model):
    """chain0.json, then chain1.json (resume_ckpt findlast) in the same logdir: the second starts from the first
    run's saved model."""
    tiny = ["--data_root", str(shapes_dir), "--resolution", "64", "--max_epochs", "1"]
    first = run_train(["--config", "chain0.json", "--resume_ckpt", str(tiny_model("sd1")), *tiny], ed2_folder)
    assert first.returncode == 0, first.stderr[-3000:]
    (saved,) = saved_models(first.stdout)
    second = run_train(["--config", "chain1.json", *tiny], ed2_folder)
    assert second.returncode == 0, second.stderr[-3000:]
    relative = saved.relative_to(ed2_folder) if saved.is_absolute() else saved  # logdir "logs" is relative
    assert f"resume_ckpt findlast: continuing from {relative}," in second.stdout
    (continued,) = saved_models(second.stdout)
    info = json.loads((continued.parent.parent / "model_info.json").read_text(encoding="utf-8"))
    assert re.search(re.escape(saved.name), json.dumps(info))


@pytest.mark.slow
def test_a_validation_json_measures_each_set_at_fractions_of_an_epoch(tmp_path: Path, shapes_dir: Path, tiny_model):
    """A held-out share, an extra named set and the stabilized training loss, twice an epoch, each its own curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = tmp_path / "extra"
    shutil.copytree(shapes_dir, extra)
    validation = write_json(tmp_path / "validation.json", {
        "validate_training": True, "val_split_mode": "automatic", "auto_split_proportion": 0.25,
        "extra_manual_datasets": {"more": str(extra)}, "stabilize_training_loss": True,
        "stabilize_split_proportion": 0.25, "every_n_epochs": 0.5, "seed": 3})
    result = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--resolution", "64",
                        "--batch_size", "2", "--max_epochs", "2", "--validation_config", str(validation),
                        "--mixed_precision", "no", "--gradient_checkpointing", "false", "--logdir", "logs",
                        "--run_name", "v"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # 12 training images (4 held out), 6 steps an epoch: every 3 steps, and at the end after the final save
    lines = [line for line in result.stdout.splitlines() if line.startswith("Validation loss at step")]
    assert [line.split(":")[0] for line in lines] == [f"Validation loss at step {s}" for s in (3, 6, 9, 12)]
    assert "more " in lines[0] and "train-stabilized " in lines[0]
    events = EventAccumulator(str(tmp_path / "logs" / "v" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for tag in ("loss/validation", "loss/validation-more", "loss/train-stabilized"):
        assert [e.step for e in events.Scalars(tag)] == [3, 6, 9, 12], tag
    assert "validation from" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_seed_minus_one_run_resumes_with_its_own_seed(tmp_path: Path, shapes_dir: Path, tiny_model):
    """EveryDream2's files all say seed -1: the resumed run must go on with the seed the first run picked, or the
    rest of its epoch would train another order (and a held-out image could come back into training)."""
    common = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--resolution", "64",
              "--batch_size", "2", "--seed", "-1", "--mixed_precision", "no", "--gradient_checkpointing", "false",
              "--validation_split", "0.25", "--save_single_file", "false"]
    first = run_train([*common, "--max_steps", "2", "--save_optimizer"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (picked,) = re.findall(r"seed -1 picked seed (\d+)\.", first.stdout)
    resumed = run_train([*common, "--max_steps", "4", "--resume_state", "findlast"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"seed -1: going on with the resumed run's seed {picked}." in resumed.stdout
    assert "with changes, honoured: total_steps 2 -> 4." in resumed.stdout  # and nothing else changed
    seeded = [arg if arg != "-1" else "7" for arg in common]
    changed = run_train([*seeded, "--max_steps", "4", "--resume_state", "findlast"], tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert f"seed {picked} -> 7 (the rest of the data order and noise follow the new seed)" in changed.stdout
