"""The LoRA tools, on tiny real models: utils/merge_lora.py (adapters fused into a base, written as a diffusers
folder and a single file) and utils/generate.py --lora.

The adapters are made in-process the way a LoRA run makes them (trainer/adapters/lora.py: peft layers on the base, their
up factors then drawn at random so that they change something) and written in the file format a run saves.
What a merge writes is held against that adapted model in memory; a short real `python train.py` run takes the
merged folder as its base. Wrong arguments are refused before any model loads, in one line, with exit status 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file as save_numpy_file

from tests.conftest import REPO_ROOT, run_script, run_train
from utils import generate, merge_lora

RANK, ALPHA = 4, 8.0  # alpha != rank: the file's alpha must be applied (scale 2)
TRAIN_FAST = ["--resolution", "64", "--mixed_precision", "no", "--gradient_checkpointing", "false",
              "--batch_size", "2", "--max_steps", "2", "--log_step", "1"]


# ---------------------------------------------------------------- helpers


def adapted_model(base: Path, lora_file: Path, seed: int = 0):
    """The model at `base` with rank-4 adapters on every layer lora_targets `all` names, UNet and text encoder, their
    factors random and fp16-representable; the adapters are written to `lora_file` (fp16, as a run saves them), so
    the model in memory is exactly what the file holds. Returns the models."""
    import torch
    from safetensors.torch import save_file

    from trainer.adapters.lora import LoraSettings, add_adapters
    from trainer.adapters.lora_file import file_tensors
    from trainer.models.load import load_models

    models = load_models(str(base))
    modules = {"unet": models.unet, "text_encoder": models.text_encoder}
    settings = LoraSettings(RANK, ALPHA, 0.0, "all", True)
    torch.manual_seed(seed)  # the down factors' initialisation
    add_adapters(modules, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            for key, param in module.named_parameters():
                if ".lora_B." in key:  # zero when made: draw them so that the adapter changes the outputs
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
                if ".lora_" in key:
                    param.copy_(param.half().float())
    save_file(file_tensors(modules, settings, torch.float16), str(lora_file))
    return models


def probe_outputs(unet, text_encoder):
    """(text-encoder output, UNet output) for fixed random token ids, latents and timestep."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49406, (2, 77), generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        return hidden, unet(latents, torch.tensor([100, 700]), hidden).sample


def merge(base: Path, loras: list[str], out: Path, *extra: str) -> int:
    return merge_lora.main(["--base", str(base), *(arg for lora in loras for arg in ("--lora", lora)),
                            "--out", str(out), *extra])


def unet_file(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def one_line_error(stderr: str, *words: str, after_loading: bool = False) -> str:
    """The one line of an error, holding `words`; `after_loading`: once models loaded, whose progress bars precede
    it, the error is still said once, in one line, and diffusers' own report of it is not repeated."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if after_loading:
        assert not any("unsuccessful" in line or "size mismatch for" in line for line in lines[:-1]), stderr
        lines = lines[-1:]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sd1_adapter(tiny_model, tmp_path_factory):
    """(base folder, adapter file, adapted models) for the tiny SD1 model."""
    base = tiny_model("sd1")
    lora_file = tmp_path_factory.mktemp("lora") / "adapter.safetensors"
    return base, lora_file, adapted_model(base, lora_file)


@pytest.fixture
def not_a_lora(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_numpy_file({"conv_in.weight": np.zeros((4, 4), np.float32)}, str(path))
    return path


# ---------------------------------------------------------------- arguments, judged before a model loads (fast)


def test_strength_follows_the_last_colon_and_defaults_to_one(tmp_path: Path, not_a_lora: Path):
    lora = tmp_path / "a.safetensors"
    save_numpy_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float16),
                     "lora_unet_x.lora_up.weight": np.zeros((8, 4), np.float16)}, str(lora))
    assert merge_lora.parse_lora(str(lora)).strength == 1.0
    assert merge_lora.parse_lora(f"{lora}:0.5") == merge_lora.LoraSpec(lora, 0.5)
    assert merge_lora.parse_lora(f"{lora}:-1").strength == -1.0
    odd = tmp_path / "x:0.5.safetensors"  # a file that exists under the whole text is taken whole
    odd.write_bytes(lora.read_bytes())
    assert merge_lora.parse_lora(str(odd)) == merge_lora.LoraSpec(odd, 1.0)
    for bad in (f"{lora}:abc", f"{lora}:", f"{lora}:nan"):
        with pytest.raises(merge_lora.LoraError, match="strength"):
            merge_lora.parse_lora(bad)


def test_merge_refuses_bad_arguments_in_one_line(tmp_path: Path, not_a_lora: Path, capsys):
    base = tmp_path / "never-loaded"
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(not_a_lora.read_bytes()[:-8])
    (tmp_path / "taken").mkdir()
    cases = {
        str(tmp_path / "missing.safetensors"): ("no such file", "expected a LoRA .safetensors file"),
        str(not_a_lora): ("is not a LoRA", "conv_in.weight", "--base"),
        f"{not_a_lora}:abc": ("strength 'abc' is not a number",),
        str(truncated): ("truncated", "copy or download it again"),
        str(tmp_path): ("is a folder",),
        str(tmp_path / "notes.txt"): ("no such file",),
    }
    for lora, words in cases.items():
        assert merge(base, [lora], tmp_path / "out") == 2, lora
        one_line_error(capsys.readouterr().err, "merge_lora.py: --lora", *words)
    assert not (tmp_path / "out").exists()
    lora = tmp_path / "a.safetensors"
    save_numpy_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float16)}, str(lora))
    for out, words in ((tmp_path / "taken", ("already exists",)), (tmp_path / "m.safetensors", ("names a file",))):
        assert merge(base, [str(lora)], out) == 2
        one_line_error(capsys.readouterr().err, "merge_lora.py: --out", *words)


def test_generate_refuses_bad_loras_in_one_line(tmp_path: Path, not_a_lora: Path, capsys):
    for lora, word in ((str(tmp_path / "missing.safetensors"), "no such file"), (str(not_a_lora), "not a LoRA"),
                       (f"{not_a_lora}:abc", "is not a number")):
        assert generate.main(["--model", str(tmp_path), "--prompt", "x", "--lora", lora]) == 2
        one_line_error(capsys.readouterr().err, "generate.py: --lora", word)


# ---------------------------------------------------------------- merging (slow: real models)


@pytest.mark.slow
def test_merge_in_full_precision_equals_the_adapted_model(sd1_adapter, tmp_path: Path):
    import torch

    from trainer.models.load import load_models

    base, lora_file, adapted = sd1_adapter
    assert merge(base, [str(lora_file)], tmp_path / "m1", "--full_precision") == 0
    merged = load_models(str(tmp_path / "m1"))  # the trainer's own loader: an ordinary base model
    want, got = probe_outputs(adapted.unet, adapted.text_encoder), probe_outputs(merged.unet, merged.text_encoder)
    plain = load_models(str(base))
    before = probe_outputs(plain.unet, plain.text_encoder)
    for w, g, b in zip(want, got, before):
        assert (w - b).abs().max() > 1e-2  # the adapters change the outputs: the comparison below has teeth
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    assert unet_file(tmp_path / "m1")["conv_in.weight"].dtype == torch.float32


@pytest.mark.slow
def test_strength_scales_each_weight_update(sd1_adapter, tmp_path: Path):
    """W + s * delta: at 0.5 each adapted weight moves half as far as at 1.0, the others not at all; adapters add,
    so merging a file at 1 and again at -1 gives back the base."""
    import torch
    from safetensors.torch import load_file

    base, lora_file, _ = sd1_adapter
    for name, loras in (("full", [str(lora_file)]), ("half", [f"{lora_file}:0.5"]),
                        ("undone", [str(lora_file), f"{lora_file}:-1"])):
        assert merge(base, loras, tmp_path / name, "--full_precision") == 0
    w0, full, half, undone = (unet_file(p) for p in (base, tmp_path / "full", tmp_path / "half", tmp_path / "undone"))
    changed = [key for key in w0 if not torch.equal(full[key], w0[key])]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in changed
    assert "down_blocks.0.resnets.0.conv1.weight" in changed  # conv layers carry (LoCon) adapters too
    assert not any(key.endswith(".bias") or key.startswith("conv_in") for key in changed)
    for key in changed:
        torch.testing.assert_close(half[key] - w0[key], 0.5 * (full[key] - w0[key]), rtol=0, atol=2e-7, msg=key)
        torch.testing.assert_close(undone[key], w0[key], rtol=0, atol=2e-7, msg=key)
    vae = "vae/diffusion_pytorch_model.safetensors"  # no adapters there: the base's, bit for bit
    vae_base, vae_merged = load_file(str(base / vae)), load_file(str(tmp_path / "half" / vae))
    assert all(torch.equal(vae_base[k], vae_merged[k]) for k in vae_base)


@pytest.mark.slow
def test_fp16_merge_of_a_v_model_and_its_single_file(tiny_model, tmp_path: Path):
    """The default fp16 merge is the adapted model within fp16's rounding; the single file beside it holds the
    original layout, with the yaml an SD2 v-model needs, and converts back to the same weights."""
    import json

    import torch
    from safetensors import safe_open

    from trainer.models.load import load_models

    base, lora_file = tiny_model("sd2-v"), tmp_path / "v.safetensors"
    adapted = adapted_model(base, lora_file, seed=3)
    out = tmp_path / "merged-v"
    assert merge(base, [str(lora_file)], out) == 0
    assert unet_file(out)["conv_in.weight"].dtype == torch.float16
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    merged, plain = load_models(str(out)), load_models(str(base))
    want, got = probe_outputs(adapted.unet, adapted.text_encoder), probe_outputs(merged.unet, merged.text_encoder)
    before = probe_outputs(plain.unet, plain.text_encoder)
    for w, g, b in zip(want, got, before):
        error, effect = (g - w).abs().max(), (w - b).abs().max()
        assert error < 2e-2 and error < 0.1 * effect, (error, effect)

    single = tmp_path / "merged-v.safetensors"
    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert "parameterization: v" in (tmp_path / "merged-v.yaml").read_text()
    back = tmp_path / "back"
    converted = run_script(REPO_ROOT / "utils" / "convert_original_stable_diffusion_to_diffusers.py",
                           ["--checkpoint_path", str(single), "--dump_path", str(back)], cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr[-3000:]
    original, again = unet_file(out), unet_file(back)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


@pytest.mark.slow
def test_a_lora_for_another_model_is_refused(sd1_adapter, tiny_model, tmp_path: Path, capsys):
    """An SD1 adapter on an SD2 base (other shapes), and one naming a layer the base lacks: exit 2, one line, nothing
    written."""
    from safetensors.torch import load_file, save_file

    _, lora_file, _ = sd1_adapter
    assert merge(tiny_model("sd2"), [str(lora_file)], tmp_path / "out") == 2
    one_line_error(capsys.readouterr().err, "does not fit this base model", "size mismatch", after_loading=True)
    extra = load_file(str(lora_file))
    extra.update({k.replace("proj_in", "proj_elsewhere"): v.clone() for k, v in extra.items()
                  if k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.")})
    foreign = tmp_path / "foreign.safetensors"
    save_file(extra, str(foreign))
    assert merge(tiny_model("sd1"), [str(foreign)], tmp_path / "out") == 2
    line = one_line_error(capsys.readouterr().err, "exist in this base model", after_loading=True)
    assert "only 91 of its 92" in line
    assert list(tmp_path.glob("*out*")) == []


@pytest.mark.slow
def test_the_merge_is_a_base_for_training_and_takes_a_trained_lora(sd1_adapter, shapes_dir: Path, tmp_path: Path):
    """A real LoRA run on the merged folder, and its adapter file merged into that folder in turn."""
    base, lora_file, _ = sd1_adapter
    merged = tmp_path / "merged"
    assert merge(base, [f"{lora_file}:0.8"], merged) == 0
    run = run_train(["--resume_ckpt", str(merged), "--data_root", str(shapes_dir), "--logdir", "logs",
                     "--lora_rank", "4", "--lora_unet_lr", "1e-2", "--lora_text_encoder", "true",
                     "--lora_targets", "all", *TRAIN_FAST], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (saved,) = [Path(line.split("Saved LoRA: ", 1)[1].strip()) for line in run.stdout.splitlines()
                if "Saved LoRA: " in line]
    assert merge(merged, [str(saved)], tmp_path / "again") == 0
    assert (tmp_path / "again" / "model_index.json").is_file() and (tmp_path / "again.safetensors").is_file()


@pytest.mark.slow
def test_merge_cli_errors_are_one_line(tmp_path: Path, not_a_lora: Path):
    for lora, word in ((str(tmp_path / "missing.safetensors"), "no such file"), (str(not_a_lora), "not a LoRA"),
                       (f"{not_a_lora}:abc", "is not a number")):
        for script in ("merge_lora.py", "generate.py"):
            where = ["--base", "b", "--out", str(tmp_path / "o")] if script == "merge_lora.py" else \
                ["--model", "m", "--prompt", "x"]
            done = run_script(REPO_ROOT / "utils" / script, [*where, "--lora", lora], cwd=tmp_path, timeout=120)
            assert done.returncode == 2, done.stderr
            one_line_error(done.stderr, f"{script}: --lora", word)


# ---------------------------------------------------------------- generate.py --lora (slow)


@pytest.mark.slow
def test_generate_applies_a_lora_at_its_strength(sd1_adapter, tmp_path: Path):
    from PIL import Image

    base, lora_file, _ = sd1_adapter
    common = ["--model", str(base), "--prompt", "a red circle", "--steps", "2", "--seed", "3"]
    images = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{lora_file}:0"]), ("full", ["--lora", str(lora_file)])):
        assert generate.main([*common, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert np.array_equal(images["zero"], images["plain"])
    assert np.abs(images["full"] - images["plain"]).max() > 8
