"""EveryDream2's optimizer.json in its current schema: the files EveryDream2 ships plan as expected, every key of the
schema is read (null: not set here; 0: zero), and every problem names the file and the key, before any model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from trainer.config.schema import TrainConfig
from trainer.errors import UserError
from trainer.optim.plan import LRSchedule, OptimizerSettings, TextEncoderFreezing, plan_optimizers

SHIPPED = Path(__file__).resolve().parents[2] / "shared" / "everydream2"


def plan_of(tmp_path: Path, content: dict | str, **changes):
    """(plan, notices) of an optimizer.json with `content`."""
    path = tmp_path / "optimizer.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    notices: list[str] = []
    cfg = dataclasses.replace(TrainConfig(), optimizer_config=str(path), **changes)
    return plan_optimizers(cfg, notices), notices


def problems_of(tmp_path: Path, content: dict | str, **changes) -> str:
    with pytest.raises(UserError) as raised:
        plan_of(tmp_path, content, **changes)
    return str(raised.value)


def shipped(name: str) -> Path:
    path = SHIPPED / name
    if not path.is_file():
        pytest.skip(f"EveryDream2's {name} is not beside the project ({SHIPPED})")
    return path


def test_shipped_optimizer_json_splits_the_schedules():
    """adamw8bit for both, the text encoder at half the rate on a cosine schedule: two optimizers."""
    notices: list[str] = []
    plan = plan_optimizers(dataclasses.replace(TrainConfig(), optimizer_config=str(shipped("optimizer.json"))), notices)
    assert plan.unet == OptimizerSettings("adamw8bit", 1e-6, (0.9, 0.999), 1e-8, 0.01)
    assert plan.text_encoder == OptimizerSettings("adamw8bit", 5e-7, (0.9, 0.999), 1e-8, 0.01)
    assert (plan.unet_schedule, plan.text_encoder_schedule) == (LRSchedule("constant"), LRSchedule("cosine"))
    assert plan.separate and plan.label == "adamw8bit+adamw8bit"
    assert plan.freezing == TextEncoderFreezing(freeze_embeddings=False) and not plan.freezing.freezes_anything
    assert plan.grad_scaler_tweaks and plan.log_grad_norm
    assert notices == [f"optimizer adamw8bit from {shipped('optimizer.json')} (train.json's adamw is not used)."]


def test_shipped_sd21_file_freezes_all_but_the_last_two_layers():
    plan = plan_optimizers(dataclasses.replace(TrainConfig(), optimizer_config=str(shipped("optimizerSD21.json"))))
    assert (plan.unet.lr, plan.text_encoder.lr) == (1e-6, 3e-7)
    assert not plan.separate and plan.label == "adamw8bit"  # one optimizer, two rates
    assert plan.freezing == TextEncoderFreezing(unfreeze_last_n_layers=2)
    assert (plan.freezing.trained_layers(23), plan.freezing.embeddings_frozen(23)) == (2, True)  # SD2.1's encoder
    assert plan.grad_scaler_tweaks  # absent from the file: on, as in EveryDream2


def test_shipped_dadapt_file_plans_dadapt_adam():
    plan = plan_optimizers(dataclasses.replace(TrainConfig(), optimizer_config=str(shipped("optimizer_dadapt.json"))))
    expected = OptimizerSettings("dadapt_adam", 0.1, (0.9, 0.999), 1e-8, 0.8, {"d0": 1e-6, "decouple": True})
    assert plan.unet == plan.text_encoder == expected
    assert plan.unet.resolved_options() == {"d0": 1e-6, "growth_rate": float("inf"), "decouple": True}
    assert not plan.separate and plan.grad_scaler_tweaks


def test_every_key_of_the_schema_null_not_set_and_zero_zero(tmp_path: Path):
    plan, notices = plan_of(tmp_path, {
        "doc": {"base": "prose, ignored"}, "documentation": "ignored too",
        "base": {"optimizer": "dadapt_sgd", "lr": 0.5, "lr_scheduler": "cosine", "lr_decay_steps": 100,
                 "lr_warmup_steps": 0, "betas": None, "epsilon": 0, "weight_decay": 0, "d0": 1e-5,
                 "growth_rate": 1.02, "momentum": 0.9},
        "text_encoder_overrides": {"optimizer": "dadapt_adan", "lr": None, "betas": [0.98, 0.92, 0.99],
                                   "lr_warmup_steps": None, "no_prox": True},
        "text_encoder_lr_scale": 0.5,
        "text_encoder_freezing": {"unfreeze_last_n_layers": 3, "freeze_embeddings": False,
                                  "freeze_final_layer_norm": True},
        "apply_grad_scaler_step_tweaks": False, "log_grad_norm": False,
    }, lr_warmup_steps=50)
    assert plan.unet == OptimizerSettings("dadapt_sgd", 0.5, None, 0.0, 0.0,
                                          {"d0": 1e-5, "growth_rate": 1.02, "momentum": 0.9})
    assert plan.unet_schedule == LRSchedule("cosine", 0, 100)  # warmup 0 is no warmup, not train.json's 50
    assert plan.unet_schedule.resolved(1000) == (0, 100)
    assert plan.text_encoder.optimizer == "dadapt_adan" and plan.text_encoder.lr == 0.25  # scaled, lr null
    assert plan.text_encoder.resolved_options() == {"d0": 1e-5, "growth_rate": 1.02, "no_prox": True}
    assert plan.text_encoder_schedule == plan.unet_schedule  # null: inherited from base
    assert plan.freezing == TextEncoderFreezing(3, None, False, True)
    assert (plan.grad_scaler_tweaks, plan.log_grad_norm, plan.separate) == (False, False, True)
    assert [n.split(" from ")[0] for n in notices] == [  # nothing else left unread
        "optimizer dadapt_sgd", f"{tmp_path / 'optimizer.json'} base.epsilon is not read by dadapt_sgd (only by "
        "adamw, adamw8bit, prodigy, dadapt_adam, dadapt_adan)."]


def test_train_json_values_are_the_defaults_and_an_explicit_rate_beats_the_scale(tmp_path: Path):
    plan, notices = plan_of(tmp_path, {"text_encoder_overrides": {"lr": 1e-7}, "text_encoder_lr_scale": 0.5},
                            optimizer="lion", lr=3e-6, lr_scheduler="linear", lr_decay_steps=40)
    assert (plan.unet.optimizer, plan.unet.lr, plan.text_encoder.lr) == ("lion", 3e-6, 1e-7)
    assert plan.unet_schedule == plan.text_encoder_schedule == LRSchedule("linear", None, 40)
    assert plan.unet_schedule.resolved(1000) == (1, 40)  # 2% of the decay, rounded up
    assert any("text_encoder_lr_scale is not used" in n for n in notices)
    plan, _ = plan_of(tmp_path, {}, lr_decay_steps=0)
    assert plan.unet_schedule.decay_steps is None  # train.json's 0: the whole run


def test_every_problem_names_the_file_and_key(tmp_path: Path):
    text = problems_of(tmp_path, {
        "bases": {},
        "base": {"lr": "fast", "weight_decy": 0.1, "lr_decay_steps": 0, "unfreeze_last_n_layers": 2},
        "text_encoder_overrides": {"betas": [0.9], "lr_scheduler": "cosine_annealing"},
        "text_encoder_freezing": {"unfreeze_final_n_layers": 2},
        "log_grad_norm": "yes",
    })
    name = tmp_path / "optimizer.json"
    for expected in (
        "9 problems found in optimizer_config",
        f"{name} bases: unknown key; did you mean 'base'?",
        f"{name} base.lr: got \"fast\"; expected a number > 0 such as 1e-6, or null for train.json's.",
        f"{name} base.weight_decy: unknown key; did you mean 'weight_decay'?",
        f"{name} base.lr_decay_steps: got 0; expected a whole number of steps >= 1, or null for the run's length",
        f"{name} base.unfreeze_last_n_layers: unknown key; it belongs in text_encoder_freezing.",
        f"{name} text_encoder_overrides.betas: got [0.9]; expected two numbers such as [0.9, 0.999]",
        f"{name} text_encoder_overrides.lr_scheduler: got \"cosine_annealing\"; expected one of constant,",
        f"{name} text_encoder_freezing.unfreeze_final_n_layers: unknown key; did you mean 'unfreeze_last_n_layers'?",
        f"{name} log_grad_norm: got \"yes\"; expected true or false.",
    ):
        assert expected in text, expected


@pytest.mark.parametrize("name, expected", [
    ("adacoor", "base.optimizer: adacoor is not supported here (it is EveryDream2's own code, in no package); "
                "the nearest supported optimizer is prodigy."),
    ("coordinate_dowg", "coordinate_dowg is not supported here (its only package, dowg 0.3.1 (2023), is "
                        "unmaintained and its author doubts that it is correct); the nearest supported optimizer is "
                        "prodigy."),
    ("scalar_dowg", "the nearest supported optimizer is prodigy"),
    ("sgd", "base.optimizer: optimizer 'sgd' is unknown; did you mean dadapt_sgd? expected one of adamw, adamw8bit,"),
    ("adam8bit", "optimizer 'adam8bit' is unknown; did you mean adamw8bit?"),
])
def test_optimizers_without_a_package_are_refused_with_the_nearest(tmp_path: Path, name: str, expected: str):
    assert expected in problems_of(tmp_path, {"base": {"optimizer": name}})


def test_names_are_read_as_everydream2_reads_them(tmp_path: Path):
    plan, _ = plan_of(tmp_path, {"base": {"optimizer": "AdamW8bit"},
                                 "text_encoder_overrides": {"optimizer": "Lion8bit"}})
    assert (plan.unet.optimizer, plan.text_encoder.optimizer, plan.label) == ("adamw8bit", "lion8bit",
                                                                              "adamw8bit+lion8bit")


def test_what_the_chosen_optimizer_does_not_read_is_said_or_refused(tmp_path: Path):
    plan, notices = plan_of(tmp_path, {"base": {"optimizer": "adamw", "momentum": 0.9, "lr_warmup_steps": 10}})
    assert f"{tmp_path / 'optimizer.json'} base.momentum is not read by adamw (only by dadapt_sgd)." in notices
    assert "UNet: lr_warmup_steps 10 has no effect with lr_scheduler constant; use constant_with_warmup to warm up." \
        in notices
    notices: list[str] = []
    plan_optimizers(dataclasses.replace(TrainConfig(), optimizer="prodigy"), notices)  # train.json alone
    assert notices == ["UNet: prodigy sets its own step size and lr multiplies it; lr 1.5e-06 is far below the usual "
                       "0.1 to 1.0."]
    text = problems_of(tmp_path, {"text_encoder_overrides": {"optimizer": "dadapt_adan"},
                                  "base": {"betas": [0.9, 0.99]}})
    assert "base.betas (inherited by the text encoder): got [0.9, 0.99]; expected 3 numbers for dadapt_adan" in text


def test_a_bad_setting_the_text_encoder_inherits_is_reported_once(tmp_path: Path):
    text = problems_of(tmp_path, {"base": {"betas": [0.9, 0.99, 0.9]}})
    assert text.startswith("1 problem found in optimizer_config") and "inherited" not in text
    assert f"{tmp_path / 'optimizer.json'} base.betas: got [0.9, 0.99, 0.9]; expected 2 numbers for adamw" in text


@pytest.mark.parametrize("optimizer, section, expected", [
    ("lion", {"epsilon": 1e-6}, "base.epsilon is not read by lion (only by adamw, adamw8bit, prodigy, dadapt_adam, "
                                "dadapt_adan)."),
    ("dadapt_lion", {"epsilon": 1e-6}, "base.epsilon is not read by dadapt_lion"),
    ("adafactor", {"betas": [0.9, 0.99, 0.5]}, "base.betas is not read by adafactor (only by adamw, adamw8bit, lion,"),
    ("dadapt_sgd", {"betas": [0.9, 0.99]}, "base.betas is not read by dadapt_sgd"),
])
def test_betas_or_epsilon_the_optimizer_does_not_read_are_said(tmp_path: Path, optimizer, section, expected):
    plan, notices = plan_of(tmp_path, {"base": {"optimizer": optimizer, **section}})
    assert f"{tmp_path / 'optimizer.json'} {expected}" in "\n".join(notices)
    _, notices = plan_of(tmp_path, {"base": {"optimizer": "adamw", **section}} if optimizer != "adafactor" else
                         {"base": {"optimizer": "adamw", "betas": [0.9, 0.99]}})
    assert not any("is not read by" in n for n in notices)


def test_text_encoder_freezing_keys(tmp_path: Path):
    plan, notices = plan_of(tmp_path, {"text_encoder_freezing": {"freeze_front_n_layers": -2}})
    assert plan.freezing == TextEncoderFreezing(unfreeze_last_n_layers=2)
    (notice,) = notices
    assert notice == (f"{tmp_path / 'optimizer.json'} text_encoder_freezing.freeze_front_n_layers is deprecated; use "
                      "unfreeze_last_n_layers instead (freeze_front_n_layers -2 is unfreeze_last_n_layers 2).")
    plan, _ = plan_of(tmp_path, {"text_encoder_freezing": {"freeze_front_n_layers": 0}})
    assert not plan.freezing.freezes_anything
    assert "keep unfreeze_last_n_layers only" in problems_of(
        tmp_path, {"text_encoder_freezing": {"freeze_front_n_layers": 3, "unfreeze_last_n_layers": 2}})
    assert "freezes the whole text encoder" in problems_of(
        tmp_path, {"text_encoder_freezing": {"unfreeze_last_n_layers": 0, "freeze_final_layer_norm": True}})
    _, notices = plan_of(tmp_path, {"text_encoder_freezing": {"unfreeze_last_n_layers": 1}},
                         disable_textenc_training=True)
    assert any("not used: disable_textenc_training is true" in n for n in notices)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "is not valid json"),
    ("[1, 2]", "got a json list; expected an object"),
    ('{"base": [1]}', "base: got [1]; expected an object of keys, or null."),
])
def test_unreadable_files(tmp_path: Path, content: str, expected: str):
    assert expected in problems_of(tmp_path, content)
    missing = dataclasses.replace(TrainConfig(), optimizer_config=str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="does not exist"):
        plan_optimizers(missing)
