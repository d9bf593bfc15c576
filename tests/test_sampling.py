"""Sampling with a real tiny SD model: EveryDream2's schedulers from the model's own config, one image per cfg,
sizes, batches, the files written, and the training state left as it was."""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from trainer.evaluation.prompts import SCHEDULER_PACKAGES, SCHEDULERS, Drawn, read_sample_prompts
from trainer.evaluation.sampling import batches, generate_samples, sampling_scheduler, write_samples
from trainer.objective.noise import zero_terminal_snr_schedulers

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipelines(tiny_model):
    """family -> the tiny model as a pipeline, as loaded from its folder (its scheduler from its own config)."""
    return {family: StableDiffusionPipeline.from_pretrained(tiny_model(family), safety_checker=None)
            for family in ("sd1", "sd2-v")}


def installed(scheduler: str) -> bool:
    package = SCHEDULER_PACKAGES.get(SCHEDULERS[scheduler][0])
    return package is None or importlib.util.find_spec(package) is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_everydream2_scheduler_samples_from_the_models_config(pipelines, name):
    """Built from the v-prediction model's own config (prediction type, betas, offsets carry over), it draws."""
    pipeline = pipelines["sd2-v"]
    own = pipeline.scheduler
    if not installed(name):  # the preflight reads this as a problem naming the package (tests/test_prompts.py)
        with pytest.raises(ImportError, match=SCHEDULER_PACKAGES[SCHEDULERS[name][0]]):
            sampling_scheduler(name, own)
        return
    scheduler = sampling_scheduler(name, own)
    class_name, overrides = SCHEDULERS[name]
    assert type(scheduler).__name__ == class_name and scheduler is not own
    assert scheduler.config.prediction_type == "v_prediction"
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert scheduler.config[key] == own.config[key], key
    assert all(scheduler.config[key] == value for key, value in overrides.items())
    drawn = [Drawn("a red circle", "", 1, (7.0,), (64, 64), 3)]
    images = generate_samples(pipeline, drawn, CPU, scheduler=name)
    assert images[0][0].size == (64, 64) and np.asarray(images[0][0]).std() > 0


def test_the_model_scheduler_itself_by_default_and_zero_snr_carried_or_said(pipelines, capsys):
    own = pipelines["sd1"].scheduler  # SD1.5's PNDM
    default = sampling_scheduler(None, own)
    assert type(default) is type(own) and default is not own and dict(default.config) == dict(own.config)
    _, zero_snr = zero_terminal_snr_schedulers(pipelines["sd2-v"].scheduler, pipelines["sd2-v"].scheduler)
    assert sampling_scheduler("euler_a", zero_snr).config.rescale_betas_zero_snr
    assert sampling_scheduler("euler_a", zero_snr).config.timestep_spacing == "trailing"
    assert capsys.readouterr().err == ""
    sampling_scheduler("kdpm2", zero_snr)
    assert "sample scheduler kdpm2 cannot rescale its betas to zero terminal SNR" in capsys.readouterr().err


def test_batches_group_what_one_call_shares():
    drawn = [Drawn(str(i), "", i, cfgs, size, 2) for i, (cfgs, size) in enumerate([
        ((7.0,), (64, 64)), ((7.0,), (64, 64)), ((7.0, 4.0), (64, 64)), ((7.0,), (64, 64)), ((7.0,), (64, 96))])]
    assert batches(drawn, 2) == [[0, 1], [3], [2], [4]]
    assert batches(drawn, 8) == [[0, 1, 3], [2], [4]]


@pytest.mark.slow
def test_cfgs_sizes_and_batches_in_a_real_run(pipelines, tmp_path, monkeypatch):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"batch_size": 2, "seed": 3, "cfgs": [7, 1.5], "num_inference_steps": 2, "samples": [
        {"prompt": "a red circle"}, {"prompt": "a blue square", "seed": -1, "negative_prompt": "red"},
        {"random_caption": True}, {"prompt": "tall", "size": [64, 96], "cfg": 4}]}), encoding="utf-8")
    settings = read_sample_prompts(path)
    drawn = settings.draw(64, 4, ["a red circle on white"], random.Random(0))
    pipeline = pipelines["sd1"]
    calls = []
    real_call = StableDiffusionPipeline.__call__

    def recorded(self, prompt, **kwargs):
        calls.append((len(prompt), kwargs["width"], kwargs["height"], kwargs["guidance_scale"]))
        return real_call(self, prompt, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recorded)
    modes, rng_state = [m.training for m in (pipeline.unet, pipeline.text_encoder)], torch.get_rng_state()
    pipeline.unet.train()
    images = generate_samples(pipeline, drawn, CPU, settings.batch(4), settings.scheduler)

    assert calls == [(2, 64, 64, 7.0), (2, 64, 64, 1.5), (1, 64, 64, 7.0), (1, 64, 64, 1.5), (1, 64, 96, 4.0)]
    assert [len(images[i]) for i in range(4)] == [2, 2, 2, 1]  # one image per cfg
    assert {images[i][0].size for i in range(3)} == {(64, 64)} and images[3][0].size == (64, 96)
    assert drawn[2].prompt == "a red circle on white"
    assert pipeline.unet.training and not pipeline.text_encoder.training  # modes as they were
    assert torch.equal(torch.get_rng_state(), rng_state)  # the training's RNG did not move
    assert pipeline.scheduler.num_inference_steps is None  # the model's own scheduler was never set up or stepped
    pipeline.unet.train(modes[0])

    # a batch draws what one at a time draws: each sample's noise comes from its own seed
    one_by_one = generate_samples(pipeline, drawn[:2], CPU, batch_size=1)
    for index in (0, 1):
        for batched, alone in zip(images[index], one_by_one[index]):
            assert np.abs(np.asarray(batched, np.int16) - np.asarray(alone, np.int16)).max() <= 2
    # the cfgs differ only by guidance: different images from the same noise
    assert not np.array_equal(np.asarray(images[0][0]), np.asarray(images[0][1]))


def test_written_files_remake_the_images(pipelines, tmp_path):
    drawn = [Drawn("a red circle", "blue", 12345, (7.0, 2.5), (64, 64), 2), Drawn("tall", "", 7, (4.0,), (64, 96), 2)]
    images = generate_samples(pipelines["sd1"], drawn, CPU, batch_size=2, scheduler="euler_a")
    grid = write_samples(images, drawn, tmp_path / "samples", "gs00010-ema", "euler_a")

    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["gs00010-ema-00-cfg2.5.png", "gs00010-ema-00-cfg7.png", "gs00010-ema-01-cfg4.png",
                     "gs00010-ema-grid.png", "gs00010-ema-prompts.json"]
    assert grid.name == "gs00010-ema-grid.png" and Image.open(grid).size == (2 * 64, 2 * 96)  # a row per sample
    remade_settings = read_sample_prompts(tmp_path / "samples" / "gs00010-ema-prompts.json")
    remade = remade_settings.draw(512, 1, [])
    assert remade == drawn and remade_settings.scheduler == "euler_a"
    again = generate_samples(pipelines["sd1"], remade, CPU, batch_size=1, scheduler="euler_a")
    saved = np.asarray(Image.open(tmp_path / "samples" / "gs00010-ema-00-cfg2.5.png"))
    assert np.abs(saved.astype(np.int16) - np.asarray(again[0][1], np.int16)).max() <= 2


def test_a_stop_request_ends_sampling_with_the_finished_samples(pipelines):
    drawn = [Drawn(f"sample {i}", "", i, (7.0,), (64, 64), 20) for i in range(3)]
    steps = []

    def stop_in_the_second_sample() -> bool:
        steps.append(1)
        return len(steps) > 25  # a few checks per step: well into the second sample's 20 steps

    images = generate_samples(pipelines["sd1"], drawn, CPU, stop_requested=stop_in_the_second_sample)
    assert list(images) == [0]  # the half-denoised second one is no sample
    assert len(steps) < 60  # it stopped there, not after every sample
