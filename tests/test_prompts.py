"""Sample-prompt files are read and checked whole, every problem at once; EveryDream2's files read as they are."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from trainer.errors import UserError
from trainer.evaluation.prompts import SCHEDULERS, SamplePrompt, SampleSettings, aspect_size, read_sample_prompts

ED2_FILES = Path(__file__).resolve().parents[2] / "shared" / "everydream2"


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def problems_of(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        read_sample_prompts(path)
    return str(caught.value)


# ---------------------------------------------------------------- EveryDream2's files


def test_everydream2_shipped_json_reads_as_it_is():
    path = ED2_FILES / "sample_prompts.json"
    if not path.is_file():
        pytest.skip(f"EveryDream2's shipped files are not at {ED2_FILES}")
    settings = read_sample_prompts(path)  # tabs and trailing spaces included
    assert (settings.batch_size, settings.scheduler, settings.show_progress_bars) == (3, "dpm++", True)
    assert settings.notes == ()
    first, second, third = settings.samples
    assert first == SamplePrompt("ted bennet and a man sitting on a sofa with a kitchen in the background",
                                 "distorted, deformed", seed=555, cfgs=(7.0, 4.0), steps=15)
    assert second.seed == -1 and second.cfgs == (7.0, 4.0)
    assert third.random_caption and third.cfgs == (1.0, 11.0) and third.size == (640, 384) and third.seed == 555


def test_everydream2_shipped_empty_txt_samples_random_training_captions(tmp_path):
    path = ED2_FILES / "sample_prompts.txt"
    if not path.is_file():
        pytest.skip(f"EveryDream2's shipped files are not at {ED2_FILES}")
    for settings in (read_sample_prompts(path), read_sample_prompts(write(tmp_path, "blank.txt", "\n  \n\t\n"))):
        assert settings.samples == ()
        # EveryDream2: min(4, its sample batch), which is half the training batch
        assert settings.requests(train_batch_size=8) == (SamplePrompt(random_caption=True),) * 4
        assert len(settings.requests(train_batch_size=2)) == 1
        drawn = settings.draw(512, 8, ["a cat", "", "a dog", "a bird", "a fish", "  "], random.Random(1))
        assert len({d.prompt for d in drawn}) == 4 and {d.prompt for d in drawn} <= {"a cat", "a dog", "a bird",
                                                                                    "a fish"}
        assert {d.size for d in drawn} == {(512, 512)}


def test_json_schema_and_its_defaults(tmp_path):
    settings = read_sample_prompts(write(tmp_path, "p.json", {
        "batch_size": 2, "seed": 7, "cfgs": [7, 4, 1.01], "scheduler": "Euler_A", "num_inference_steps": 12,
        "generate_samples_every_n_steps": 50, "show_progress_bars": False, "resolution": 256,
        "samples": [{"prompt": "a cat", "negative_prompt": "blurry"}, {"prompt": "wide", "aspect_ratio": 1.77778},
                    {"prompt": "sized", "size": [576, 448], "seed": 3, "cfgs": [2]}],
    }))
    assert (settings.batch(8), settings.scheduler, settings.every(300)) == (2, "euler_a", 50)
    cat, wide, sized = settings.samples
    assert cat == SamplePrompt("a cat", "blurry", seed=7, cfgs=(7.0, 4.0, 1.01), steps=12)
    assert settings.size_of(cat, 512) == (256, 256)  # the file's resolution wins over training's
    assert settings.size_of(wide, 512) == aspect_size(1.77778, 256) == (320, 192)
    assert settings.size_of(sized, 512) == (576, 448) and sized.cfgs == (2.0,) and sized.seed == 3
    # nothing but samples: the run's own values
    bare = read_sample_prompts(write(tmp_path, "bare.json", {"samples": ["a cat"]}))
    assert bare == SampleSettings((SamplePrompt("a cat"),))
    assert (bare.batch(8), bare.batch(1), bare.every(300), bare.scheduler, bare.size_of(bare.samples[0], 512)) == \
        (4, 1, 300, None, (512, 512))
    # no samples, or none given: random captions, as EveryDream2
    assert read_sample_prompts(write(tmp_path, "none.json", {"cfgs": [3], "seed": -1})).requests(4) == \
        (SamplePrompt(random_caption=True, cfgs=(3.0,), seed=-1),) * 2  # with the file's seed, cfgs and steps


def test_aspect_ratios_keep_about_the_resolutions_pixels():
    for ratio, resolution, size in ((1.77778, 512, (704, 384)), (0.75, 512, (448, 576)), (1, 768, (768, 768)),
                                    (1.77778, 64, (88, 48))):
        assert aspect_size(ratio, resolution) == size


def test_minus_one_seeds_are_drawn_anew_each_time():
    settings = SampleSettings((SamplePrompt("fixed", seed=5), SamplePrompt("random", seed=-1)))
    first, second = (settings.draw(512, 2, [], random.Random(i)) for i in (1, 2))
    assert first[0].seed == second[0].seed == 5
    assert first[1].seed != second[1].seed and first[1].seed >= 0
    state = random.getstate()
    settings.draw(512, 2, [])  # a private RNG: the global one (the training's) does not move
    assert random.getstate() == state


def test_random_captions_come_from_the_training_captions():
    settings = SampleSettings((SamplePrompt("kept"), SamplePrompt(random_caption=True, cfgs=(3.0,)),
                               SamplePrompt(random_caption=True)))
    drawn = settings.draw(64, 2, ["a red circle", "a blue square"], random.Random(0))
    assert drawn[0].prompt == "kept" and {drawn[1].prompt, drawn[2].prompt} == {"a red circle", "a blue square"}
    assert drawn[1].cfgs == (3.0,)
    assert {d.prompt for d in settings.draw(64, 2, ["only one"])} == {"kept", "only one"}  # fewer than asked
    assert [d.prompt for d in settings.draw(64, 2, ["", " "])] == ["kept", "", ""]  # blank captions only


# ---------------------------------------------------------------- ours, kept


def test_txt_plain_lists_cfg_and_steps(tmp_path):
    assert read_sample_prompts(write(tmp_path, "p.txt", "a cat\n\n  a dog \n")).samples == (SamplePrompt("a cat"),
                                                                                           SamplePrompt("a dog"))
    settings = read_sample_prompts(write(tmp_path, "p.json", [
        "plain", {"prompt": "one cfg", "cfg": 3.5, "cfgs": [1, 2], "steps": 12, "size": [64, 128]}]))
    assert settings.samples == (SamplePrompt("plain"),
                                SamplePrompt("one cfg", cfgs=(3.5,), steps=12, size=(64, 128)))
    assert settings.notes == ("sample 2: both cfg 3.5 and cfgs [1, 2] are set; cfg wins (one image at that "
                              "guidance scale) and cfgs is not used. Keep one of them.",)


def test_every_problem_is_reported_with_its_sample_and_key(tmp_path):
    path = write(tmp_path, "bad.json", {"batch_size": 0, "cfgs": [], "scheduler": "dpm+",
                                        "generate_samples_every_n_steps": "often", "samples": [
        {"prompt": "odd size", "size": [100, 100]},
        {"prompt": "no steps", "steps": 0},
        {"prompt": "bad cfg", "cfg": "high"},
        {"seed": 3},
        {"prompt": "bad seed", "seed": 1.5, "cfgs": [7, -1]},
        {"prompt": "bad flag", "random_caption": "yes", "aspect_ratio": 0},
    ]})
    message = problems_of(path)
    assert "12 problems found in sample_prompts" in message and str(path) in message
    for expected in ("batch_size: got 0; expected an integer from 1 to 64", "cfgs: got []; expected a list",
                     "scheduler: got 'dpm+'; did you mean 'dpm++'? Known: ddim, ddpm",
                     "generate_samples_every_n_steps: got 'often'",
                     "sample 1 size: got [100, 100]; expected [width, height], each a multiple of 8",
                     "sample 2 steps: got 0", "sample 3 cfg: got 'high'",
                     "sample 4: needs a \"prompt\" string, or \"random_caption\": true",
                     "sample 5 seed: got 1.5", "sample 5 cfgs[1]: got -1", "sample 6 random_caption: got 'yes'",
                     "sample 6 aspect_ratio: got 0"):
        assert expected in message


def test_typos_are_problems_and_unused_keys_are_warnings(tmp_path, capsys):
    message = problems_of(write(tmp_path, "typo.json", {
        "num_inference_step": 20, "samples": [{"prompt": "a", "negativ_prompt": "b"}]}))
    assert "unknown key 'num_inference_step'; did you mean 'num_inference_steps'?" in message
    assert "sample 1: unknown key 'negativ_prompt'; did you mean 'negative_prompt'?" in message

    path = write(tmp_path, "ed2.json", {"generate_pretrain_samples": True, "generate_samples_every_n_epochs": None,
                                        "comment": "mine", "samples": [{"prompt": "a", "random_caption": True}]})
    settings = read_sample_prompts(path)
    assert len(settings.notes) == 3
    said = capsys.readouterr().err
    assert f"Warning: sample_prompts {path}: generate_pretrain_samples is an EveryDream2 key this trainer does not " \
           "use" in said
    assert "unknown key 'comment' ignored" in said and "generate_samples_every_n_epochs" not in said  # null: unset
    assert "random_caption is true, so its prompt 'a' is replaced" in said


def test_flow_matching_and_schedulers_whose_package_is_missing_are_refused(tmp_path, monkeypatch):
    assert "flow-matching is for EveryDream2's flow-matching models" in problems_of(
        write(tmp_path, "fm.json", {"scheduler": "flow-matching"}))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchsde" else real(name, *a))
    assert "scheduler: dpm++_sde_k needs the torchsde package, which is not installed; pip install torchsde" in \
        problems_of(write(tmp_path, "sde.json", {"scheduler": "dpm++_sde_k"}))


def test_every_everydream2_scheduler_name_is_known():
    # EveryDream2's utils/sample_generator.py accepts these (flow-matching aside: not an SD 1.x/2.x sampler)
    assert set(SCHEDULERS) == {"ddim", "pndm", "ddpm", "lms", "euler", "euler_a", "kdpm2", "dpm++", "dpm++_2s",
                               "dpm++_2m", "dpm++_sde", "dpm++_2m_sde", "dpm++_2s_k", "dpm++_2m_k", "dpm++_sde_k",
                               "dpm++_2m_sde_k"}


def test_unreadable_files_are_one_message(tmp_path):
    with pytest.raises(UserError, match="is not valid json"):
        read_sample_prompts(write(tmp_path, "broken.json", "{"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="cannot be read"):
        read_sample_prompts(tmp_path / "latin1.txt")


def test_reading_imports_no_torch():
    code = "import sys, trainer.evaluation.prompts; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO_ROOT).returncode == 0


def test_null_means_the_default_and_whole_floats_are_ints(tmp_path):
    path = write(tmp_path, "p.json", {"seed": None, "cfgs": None, "num_inference_steps": 15.0, "batch_size": 2.0,
                                      "show_progress_bars": None,
                                      "samples": [{"prompt": "a", "negative_prompt": None, "seed": 5.0, "cfgs": None,
                                                   "random_caption": None}]})
    settings = read_sample_prompts(path)
    (sample,) = settings.samples
    assert (sample.seed, sample.steps, sample.negative_prompt, settings.batch_size) == (5, 15, "", 2)
    assert sample.cfgs == SamplePrompt().cfgs and settings.defaults.seed == SamplePrompt().seed
