"""Sample-prompt files are read and checked whole, every problem at once."""

from __future__ import annotations

import json

import pytest

from trainer.errors import UserError
from trainer.prompts import SamplePrompt, read_sample_prompts


def write(tmp_path, name: str, content) -> object:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_txt_and_everydream2_json(tmp_path):
    assert read_sample_prompts(write(tmp_path, "p.txt", "a cat\n\n  a dog \n")) == [SamplePrompt("a cat"),
                                                                                    SamplePrompt("a dog")]
    prompts = read_sample_prompts(write(tmp_path, "p.json", {
        "seed": 7, "cfgs": [3.5, 7], "num_inference_steps": 12,
        "samples": ["plain", {"prompt": "sized", "size": [576, 448], "seed": -1, "negative_prompt": "blurry"}],
    }))
    assert prompts == [SamplePrompt("plain", seed=7, cfg=3.5, steps=12),
                       SamplePrompt("sized", "blurry", seed=555, cfg=3.5, size=(576, 448), steps=12)]


def test_every_problem_is_reported_with_its_sample(tmp_path):
    path = write(tmp_path, "bad.json", {"samples": [
        {"prompt": "odd size", "size": [100, 100]},
        {"prompt": "no steps", "steps": 0},
        {"prompt": "bad cfg", "cfg": "high"},
        {"random_caption": True},
        {"prompt": "bad seed", "seed": 1.5},
    ]})
    with pytest.raises(UserError) as caught:
        read_sample_prompts(path)
    message = str(caught.value)
    assert "5 problem(s)" in message and str(path) in message
    for expected in ("sample 1 size: got [100, 100]; expected [width, height], each a multiple of 8",
                     "sample 2 steps: got 0", "sample 3 cfg: got 'high'", "sample 4: each sample needs a \"prompt\"",
                     "sample 5 seed: got 1.5"):
        assert expected in message


def test_unreadable_files_are_one_message(tmp_path):
    with pytest.raises(UserError, match="is not valid json"):
        read_sample_prompts(write(tmp_path, "broken.json", "{"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="cannot be read"):
        read_sample_prompts(tmp_path / "latin1.txt")
