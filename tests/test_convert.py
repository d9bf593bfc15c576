"""The single-file converter on tiny real checkpoints: the documented commands, bit-exact against diffusers'
own conversion, the way back, and every refusal of a wrong file, yaml or flag.

Tiny original checkpoints are made from the tiny diffusers models by our way back, plus the extra tensors
real LDM files carry (noise-schedule buffers, position_ids, OpenCLIP's text_projection, ...); their yamls
are the real yamls with the tiny sizes written in. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from convert import ConversionError, convert_checkpoint_file, export_single_file  # noqa: E402
from convert.blank import blank_original  # noqa: E402
from convert.configs import (  # noqa: E402
    fitting_original_config,
    original_config_from_diffusers,
    text_encoder_config,
    unet_config_from_ldm,
    vae_config_from_ldm,
    yaml_family,
    yaml_prediction_type,
)
from convert.detect import detect  # noqa: E402
from convert.plan import plan_conversion  # noqa: E402
from convert.read import LoadedCheckpoint, load_original_config, sidecar_yaml_path  # noqa: E402
from convert.single_file import exported_text_layer  # noqa: E402
from convert.tables import (  # noqa: E402
    OPENCLIP_PREFIX,
    SCHEDULER_CLASSES,
    SCHEDULER_TYPES,
    STOCK_CONFIGS,
    UNET_PREFIX,
    stock_config_path,
)
from convert.to_diffusers import convert_state, convert_unet, meta_model  # noqa: E402
from convert.tokenizer import clip_tokenizer
from tests.conftest import first_fast, run_script

TO_DIFFUSERS = REPO_ROOT / "utils" / "convert_original_stable_diffusion_to_diffusers.py"
TO_ORIGINAL = REPO_ROOT / "utils" / "convert_diffusers_to_original_stable_diffusion.py"
COMPONENT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
STOCK_YAML = {"sd1": "v1-inference.yaml", "sd2": "v2-inference.yaml", "sd2-v": "v2-inference-v.yaml"}
# what real LDM files carry besides the weights diffusers keeps
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod")


@dataclass
class TinyOriginal:
    family: str
    diffusers_dir: Path  # the tiny model the file was made from (also diffusers' local config dir)
    state: dict[str, torch.Tensor]  # the original-layout state dict, extras included
    yaml_path: Path  # the real yaml of the family with tiny sizes written in


def _read(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_model) -> dict[str, TinyOriginal]:
    root = tmp_path_factory.mktemp("originals")
    made = {}
    for family in ("sd1", "sd2", "sd2-v"):
        model = tiny_model(family)  # conftest's session-wide tiny diffusers model; only read here
        export = export_single_file(model, root / f"{family}.safetensors")
        state = _read(export.checkpoint_path)
        for i, name in enumerate(SCHEDULE_BUFFERS):
            state[name] = torch.linspace(0.1, 1.0, 1000) * (i + 1)
        state["model_ema.decay"] = torch.tensor(0.9999)
        if family == "sd1":
            state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        else:
            state["cond_stage_model.model.text_projection"] = torch.randn(64, 64)
            state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
        yaml_path = root / f"{family}.yaml"
        family_yaml = export.sidecar_yaml or sidecar_yaml_path(export.checkpoint_path)
        yaml_path.write_text(family_yaml.read_text())
        made[family] = TinyOriginal(family, model, state, yaml_path)
    return made


def _write_original(orig: TinyOriginal, path: Path, *, fp16: bool = False, wrapped: bool = True,
                    metadata: dict[str, str] | None = None) -> Path:
    state = {k: (v.half() if fp16 and v.is_floating_point() else v) for k, v in orig.state.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 1234} if wrapped else state, path)
    else:
        save_file(state, str(path), metadata=metadata)
    return path


def _load_folder(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(folder / name / f)) for name, f in COMPONENT_FILES.items()}


def _config(folder: Path, name: str) -> dict:
    sub = "scheduler/scheduler_config.json" if name == "scheduler" else f"{name}/config.json"
    return json.loads((folder / sub).read_text())


def _run_main(args: list[str], cwd: Path) -> int:
    """The CLI's main() in this process (the import cost, ~8 s per process here, is paid once)."""
    from utils.convert_original_stable_diffusion_to_diffusers import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main(args)
    finally:
        os.chdir(old)


def _run_cli(script: Path, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The script as a real process; `env`, when given, is its whole environment (a fresh `python` then)."""
    if env is None:
        return run_script(script, args, cwd)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


# The issue's commands, verbatim apart from the file names (`...` in the issue is the script and
# `--scheduler_type ddim`).
COMMANDS = {
    "sd1": "--scheduler_type ddim --original_config_file v1-inference.yaml --image_size 512 "
           "--checkpoint_path my_sd15_model.{ext} --to_safetensors --prediction_type epsilon "
           "--dump_path ckpt_cache/my_sd15_model",
    "sd2-v": "--scheduler_type ddim --original_config_file v2-inference-v.yaml --image_size 768 "
             "--checkpoint_path my_sd21_model.{ext} --prediction_type v_prediction --upcast_attention True "
             "--dump_path ckpt_cache/my_sd21_model",
    "sd2": "--scheduler_type ddim --original_config_file v2-inference.yaml --image_size 512 "
           "--checkpoint_path 512-base-ema.{ext} --prediction_type epsilon --upcast_attn True "
           "--dump_path ckpt_cache/512-base-ema",
}
EXPECTED = {  # family -> (image size, prediction type, upcast, linear projection, heads)
    "sd1": (512, "epsilon", False, False, 1),
    "sd2": (512, "epsilon", True, True, [1, 2]),
    "sd2-v": (768, "v_prediction", True, True, [1, 2]),
}


def _stage_command(orig: TinyOriginal, workdir: Path, fmt: str) -> tuple[list[str], Path, Path]:
    """Lay out the issue's command for `orig` in `workdir`: the checkpoint and the yaml under its real name."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(orig.yaml_path, workdir / STOCK_YAML[orig.family])
    ext = "ckpt" if fmt == "ckpt" else "safetensors"
    args = COMMANDS[orig.family].format(ext=ext).split()
    if ext == "safetensors":
        args.append("--from_safetensors")
    checkpoint = _write_original(orig, workdir / args[args.index("--checkpoint_path") + 1], fp16=fmt == "fp16")
    return args, checkpoint, workdir / args[args.index("--dump_path") + 1]


def _diffusers_reference(checkpoint: Path, orig: TinyOriginal, yaml_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own conversion of the same file, given local configs (nothing downloaded)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint), config=str(orig.diffusers_dir), original_config=str(yaml_path), local_files_only=True)
    return {name: getattr(pipe, name).state_dict() for name in COMPONENT_FILES}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", first_fast("ckpt", "safetensors", "fp16"))
@pytest.mark.parametrize("family", first_fast("sd1", "sd2", "sd2-v"))
def test_issue_commands_match_diffusers_bit_for_bit(originals, tmp_path, family, fmt, capsys):
    args, checkpoint, dump = _stage_command(originals[family], tmp_path, fmt)
    assert _run_main(args, tmp_path) == 0, capsys.readouterr().err
    _check_against_diffusers(originals[family], tmp_path, checkpoint, dump, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "fp16"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v"])
def test_issue_commands_as_subprocesses(originals, tmp_path, family, fmt):
    """The same, exactly as a user types them: a fresh `python utils/...` process in the working folder."""
    args, checkpoint, dump = _stage_command(originals[family], tmp_path, fmt)
    result = _run_cli(TO_DIFFUSERS, args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "converted" in result.stdout and "Traceback" not in result.stderr
    _check_against_diffusers(originals[family], tmp_path, checkpoint, dump, fmt)


def _check_against_diffusers(orig: TinyOriginal, tmp_path: Path, checkpoint: Path, dump: Path, fmt: str) -> None:
    family = orig.family
    ours = _load_folder(dump)
    reference = _diffusers_reference(checkpoint, orig, tmp_path / STOCK_YAML[family])
    source_dtype = torch.float16 if fmt == "fp16" else torch.float32
    for name, ref in reference.items():
        assert ours[name].keys() == ref.keys(), name
        for key, tensor in ref.items():
            assert ours[name][key].dtype == source_dtype, (name, key)
            assert torch.equal(ours[name][key], tensor.to(source_dtype)), (name, key)

    size, prediction, upcast, linear, heads = EXPECTED[family]
    unet, vae, scheduler = _config(dump, "unet"), _config(dump, "vae"), _config(dump, "scheduler")
    tiny_unet, tiny_vae = _config(orig.diffusers_dir, "unet"), _config(orig.diffusers_dir, "vae")
    assert unet["sample_size"] == size // 8 and vae["sample_size"] == size
    assert unet["cross_attention_dim"] == tiny_unet["cross_attention_dim"] == 64
    assert unet["attention_head_dim"] == heads and unet["use_linear_projection"] is linear
    assert unet["upcast_attention"] is upcast and unet["in_channels"] == 4
    assert unet["block_out_channels"] == tiny_unet["block_out_channels"]
    assert vae["scaling_factor"] == pytest.approx(tiny_vae["scaling_factor"], rel=1e-6)
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["prediction_type"] == prediction
    assert _config(dump, "text_encoder")["hidden_act"] == ("quick_gelu" if family == "sd1" else "gelu")
    # the source model itself, too: the file was made from it
    for name, tensors in _load_folder(orig.diffusers_dir).items():
        assert all(torch.equal(ours[name][k], v.to(source_dtype)) for k, v in tensors.items()), name


@pytest.mark.slow
@pytest.mark.parametrize("family", first_fast("sd1", "sd2-v"))
def test_converted_model_runs_and_trains(originals, tmp_path, family, capsys):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    args, _, dump = _stage_command(originals[family], tmp_path, "safetensors")
    assert _run_main(args, tmp_path) == 0
    pipe = StableDiffusionPipeline.from_pretrained(dump)
    tok = pipe.tokenizer
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token == ("<|endoftext|>" if family == "sd1" else "!")
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())

    # one training step on the converted weights, with the objective its scheduler names
    torch.manual_seed(0)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, before = pipe.unet.train(), pipe.unet.conv_in.weight.detach().clone()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    latents = torch.randn(2, 4, 8, 8)
    noise, t = torch.randn_like(latents), torch.tensor([10, 500])
    text = pipe.text_encoder(tok(["a cat", "a dog"], padding="max_length", return_tensors="pt").input_ids)[0]
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, t)
    loss = torch.nn.functional.mse_loss(unet(noisy, t, text.detach()).sample, target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, unet.conv_in.weight)


def test_half_stores_fp16(originals, tmp_path):
    orig = originals["sd1"]
    checkpoint = _write_original(orig, tmp_path / "m.safetensors")
    convert_checkpoint_file(checkpoint, tmp_path / "out", original_config=orig.yaml_path, image_size=64, half=True)
    for name, tensors in _load_folder(orig.diffusers_dir).items():
        ours = load_file(str(tmp_path / "out" / name / COMPONENT_FILES[name]))
        assert all(ours[k].dtype == torch.float16 and torch.equal(ours[k], v.half()) for k, v in tensors.items())


@pytest.mark.slow
@pytest.mark.parametrize("family", first_fast("sd1", "sd2", "sd2-v"))
def test_round_trip_gives_back_the_same_file(originals, tmp_path, family):
    orig = originals[family]
    checkpoint = _write_original(orig, tmp_path / "in.ckpt", wrapped=True)
    convert_checkpoint_file(checkpoint, tmp_path / "diffusers", original_config=orig.yaml_path, image_size=64)
    result = _run_cli(TO_ORIGINAL, ["--model_path", str(tmp_path / "diffusers"),
                                    "--checkpoint_path", str(tmp_path / "out.safetensors")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    back = load_file(str(tmp_path / "out.safetensors"))
    assert back.keys() == orig.state.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in orig.state.items())
    # A1111/ComfyUI layout: VAE attention as 1x1 convolutions, OpenCLIP's fused q/k/v for SD2
    assert back["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in back) == (family != "sd1")
    # SD2 gets a sidecar yaml that names its parameterization; it converts again on its own
    sidecar = tmp_path / "out.yaml"
    assert sidecar.is_file()  # SD2 always; SD1 here too, as the tiny model is not the stock SD1 shape
    params = yaml.safe_load(sidecar.read_text())["model"]["params"]
    assert params.get("parameterization", "eps") == ("v" if family == "sd2-v" else "eps")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == ("v" if family == "sd2-v" else "epsilon")
    again = convert_checkpoint_file(tmp_path / "out.safetensors", tmp_path / "again", image_size=64)
    assert again.prediction_type == EXPECTED[family][1]


def test_way_back_half(originals, tmp_path):
    export_single_file(originals["sd2"].diffusers_dir, tmp_path / "half.safetensors", half=True)
    back = load_file(str(tmp_path / "half.safetensors"))
    assert all(v.dtype == torch.float16 for v in back.values())


def test_stock_yamls_describe_the_real_models():
    """The shipped yamls give the real SD configs, and the way back reproduces them exactly, so a real
    SD2 export carries the verbatim v2-inference(-v).yaml as its sidecar."""
    for (family, prediction), (name, size) in STOCK_CONFIGS.items():
        original = load_original_config(REPO_ROOT / name)
        assert yaml_prediction_type(original) == prediction and yaml_family(original) == family
        unet = unet_config_from_ldm(original, size, False, None)
        vae = vae_config_from_ldm(original, size)
        assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["sample_size"] == size // 8
        assert unet["cross_attention_dim"] == (768 if family == "sd1" else 1024)
        assert unet["attention_head_dim"] == (8 if family == "sd1" else [5, 10, 20, 20])
        assert vae["scaling_factor"] == 0.18215 and vae["block_out_channels"] == [128, 256, 512, 512]
        scheduler = {"prediction_type": prediction, "beta_start": 0.00085, "beta_end": 0.012,
                     "num_train_timesteps": 1000}
        assert original_config_from_diffusers(family, unet, vae, scheduler) == original


def test_text_encoder_config_from_shapes():
    sd1 = text_encoder_config("sd1", 768, 12)
    assert (sd1["hidden_size"], sd1["num_hidden_layers"], sd1["num_attention_heads"], sd1["hidden_act"]) == \
        (768, 12, 12, "quick_gelu")
    sd2 = text_encoder_config("sd2", 1024, 24)
    assert (sd2["hidden_size"], sd2["num_hidden_layers"], sd2["num_attention_heads"], sd2["hidden_act"]) == \
        (1024, 23, 16, "gelu")
    small = text_encoder_config("sd2", 128, 3)
    assert (small["num_hidden_layers"], small["num_attention_heads"]) == (3, 2)
    with pytest.raises(ConversionError, match="multiple of the 64-wide"):
        text_encoder_config("sd1", 100, 2)
    # what a yaml's `layer` says is honoured: OpenCLIP ViT-H's depth is 24 whether the file holds 24 or 23
    for blocks in (24, 23):
        assert text_encoder_config("sd2", 1024, blocks, "penultimate")["num_hidden_layers"] == 23
    assert text_encoder_config("sd2", 1024, 24, "last")["num_hidden_layers"] == 24
    assert text_encoder_config("sd2", 128, 3, "penultimate")["num_hidden_layers"] == 2
    assert text_encoder_config("sd2", 128, 3, "last")["num_hidden_layers"] == 3


@pytest.mark.slow
def test_a_yaml_reading_the_penultimate_layer_drops_the_last_block_as_diffusers_does(originals, tmp_path):
    """A nonstandard SD2 file with 3 text blocks and `layer: penultimate`: 2 layers run, so 2 are converted (as
    diffusers' from_single_file gives), the unused block is kept for the way back, and `last` keeps all 3."""
    orig = originals["sd2"]
    blocks = "cond_stage_model.model.transformer.resblocks."
    state = dict(orig.state)
    for key in [k for k in orig.state if k.startswith(blocks + "1.")]:  # a third block, unlike the second
        state[blocks + "2." + key.removeprefix(blocks + "1.")] = orig.state[key] + 1
    checkpoint = tmp_path / "m.safetensors"
    save_file(state, str(checkpoint))
    for layer in ("penultimate", "last"):
        original = yaml.safe_load(orig.yaml_path.read_text())
        original["model"]["params"]["cond_stage_config"]["params"]["layer"] = layer
        (tmp_path / f"{layer}.yaml").write_text(yaml.safe_dump(original))
        convert_checkpoint_file(checkpoint, tmp_path / layer, original_config=tmp_path / f"{layer}.yaml", image_size=64)
    assert _config(tmp_path / "penultimate", "text_encoder")["num_hidden_layers"] == 2
    assert _config(tmp_path / "last", "text_encoder")["num_hidden_layers"] == 3

    ours = _load_folder(tmp_path / "penultimate")["text_encoder"]
    reference = _diffusers_reference(checkpoint, orig, tmp_path / "penultimate.yaml")["text_encoder"]
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], v) for k, v in reference.items())
    back = export_single_file(tmp_path / "penultimate", tmp_path / "back.safetensors")
    again = load_file(str(back.checkpoint_path))
    assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
    sidecar = yaml.safe_load(back.sidecar_yaml.read_text())["model"]["params"]
    assert sidecar["cond_stage_config"]["params"]["layer"] == "penultimate"


# ------------------------------------------------------------------------------- the text encoder's depth

OPENCLIP_BLOCKS = OPENCLIP_PREFIX + "transformer.resblocks."
NO_YAML_SAYS = "no yaml of this file names the text-encoder layer"


@pytest.fixture(scope="module")
def real_size_sd2() -> dict[str, torch.Tensor]:
    """A real-size SD2 single file holding all 24 OpenCLIP blocks, on the meta device: shapes, no memory."""
    return blank_original(load_original_config(REPO_ROOT / "v2-inference.yaml"), "sd2").state


def _text_blocks(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """`state` with only its first `blocks` OpenCLIP blocks."""
    return {k: v for k, v in state.items()
            if not k.startswith(OPENCLIP_BLOCKS) or int(k.removeprefix(OPENCLIP_BLOCKS).split(".")[0]) < blocks}


def _text_encoder_kept(state: dict[str, torch.Tensor], checkpoint: Path,
                       original_config: Path | None = None) -> tuple[str, int]:
    """The conversion's text-encoder evidence line for `state` read from `checkpoint` (a yaml beside it counts),
    and how many text-encoder layers it converts (on the meta device: nothing is written)."""
    loaded = LoadedCheckpoint(state, "safetensors", {}, [], path=checkpoint)
    detection = detect(loaded, override="epsilon")
    plan = plan_conversion(loaded, detection, original_config_path=original_config or detection.sidecar,
                           image_size=None, upcast_attention=None, num_in_channels=None, scheduler_type="ddim")
    (line,) = [line for line in plan.evidence if line.startswith("text encoder: ")]
    configs = {"unet": plan.unet_config, "vae": plan.vae_config, "text_encoder": plan.text_config}
    text = convert_state(loaded.state, plan.family, configs, False, plan.config_source).tensors["text_encoder"]
    layers = {key.split(".")[2] for key in text if key.startswith("encoder.layers.")}
    assert plan.text_config["num_hidden_layers"] == len(layers)
    return line, len(layers)


@pytest.mark.parametrize("blocks, yaml_name, kept, said", [
    (24, None, 23, f"text encoder: 23 of the file's 24 blocks kept: {NO_YAML_SAYS}, and these are the 24 blocks of "
                   "OpenCLIP ViT-H/14, which SD2 reads at its penultimate layer, so the last block is never run"),
    (23, None, 23, "text encoder: all 23 blocks kept: the 23 of OpenCLIP ViT-H/14's 24 blocks that SD2 runs"),
    (24, "v2-inference.yaml", 23, "text encoder: 23 of the file's 24 blocks kept: v2-inference.yaml reads the "
                                  "penultimate layer (layer: penultimate), so the last block is never run"),
    (23, "v2-inference.yaml", 23, "text encoder: all 23 blocks kept: v2-inference.yaml reads the penultimate layer "
                                  "of OpenCLIP ViT-H/14's 24 blocks, and the file holds only the 23 that run"),
    (12, "last.yaml", 12, "text encoder: all 12 blocks kept: last.yaml reads the last layer (layer: last)"),
    (12, None, 12, f"text encoder: all 12 blocks kept: {NO_YAML_SAYS}, and 12 is not OpenCLIP ViT-H/14's depth "
                   "(24 blocks, of which SD2 runs 23), so every block is kept"),
    # a 1024-wide encoder of 12 blocks is no ViT-H: its penultimate layer is its 11th block, not ViT-H's 23rd
    (12, "v2-inference.yaml", 11, "text encoder: 11 of the file's 12 blocks kept: v2-inference.yaml reads the "
                                  "penultimate layer (layer: penultimate)"),
    (12, "no-layer.yaml", 12, "text encoder: all 12 blocks kept: no-layer.yaml names no text-encoder layer, and 12 "
                              "is not OpenCLIP ViT-H/14's depth"),
])
def test_the_text_encoder_depth_kept_is_said_with_its_reason(real_size_sd2, tmp_path, blocks, yaml_name, kept, said):
    """Real-size SD2 files with all of OpenCLIP ViT-H's 24 blocks, the 23 SD2 runs, or another depth, with and
    without a yaml: the evidence says how many blocks the model keeps and why, and that many are converted."""
    for name, layer in (("last.yaml", "last"), ("no-layer.yaml", None)):
        written = load_original_config(REPO_ROOT / "v2-inference.yaml")
        written["model"]["params"]["cond_stage_config"]["params"]["layer"] = layer
        (tmp_path / name).write_text(yaml.safe_dump(written))
    original_config = None if yaml_name is None else \
        (REPO_ROOT / yaml_name if yaml_name.startswith("v2-") else tmp_path / yaml_name)
    line, converted = _text_encoder_kept(_text_blocks(real_size_sd2, blocks), tmp_path / "m.safetensors",
                                         original_config)
    assert line.startswith(said) and converted == kept, line
    # the other reading is offered only where the depth is a guess
    advice = {None: "put a copy of v2-inference.yaml (it fits these weights and says so) beside the file as m.yaml",
              "no-layer.yaml": "add layer: penultimate under model.params.cond_stage_config.params to no-layer.yaml"}
    if blocks == 12 and yaml_name in advice:
        assert f"To keep 11 instead, read at the penultimate layer as SD2 does: {advice[yaml_name]}" in line, line
    else:
        assert "To keep" not in line, line


def test_sd1_says_its_text_encoder_depth():
    state = blank_original(load_original_config(REPO_ROOT / "v1-inference.yaml"), "sd1").state
    line, converted = _text_encoder_kept(state, Path("m.safetensors"))
    assert line == "text encoder: all 12 blocks kept (SD1 reads the text encoder's last layer)" and converted == 12


def test_following_the_advice_for_a_nonstandard_depth_gives_the_other_reading(real_size_sd2, tmp_path):
    """A real-size SD2 file with 12 text blocks and nothing saying which layer it reads keeps all 12; what the
    evidence advises (the shipped yaml beside it, or given) keeps 11; and the way back names the layer it needs."""
    state = _text_blocks(real_size_sd2, 12)
    line, converted = _text_encoder_kept(state, tmp_path / "m.safetensors")
    assert converted == 12 and line.endswith(
        "To keep 11 instead, read at the penultimate layer as SD2 does: put a copy of v2-inference.yaml (it fits these "
        "weights and says so) beside the file as m.yaml (the converter also takes it as --original_config_file) and "
        "convert again"), line

    shutil.copyfile(REPO_ROOT / "v2-inference.yaml", tmp_path / "m.yaml")
    line, converted = _text_encoder_kept(state, tmp_path / "m.safetensors")
    assert converted == 11 and line.startswith("text encoder: 11 of the file's 12 blocks kept: m.yaml reads the "
                                               "penultimate layer"), line
    (tmp_path / "m.yaml").unlink()
    assert _text_encoder_kept(state, tmp_path / "m.safetensors", REPO_ROOT / "v2-inference.yaml")[1] == 11

    # the way back: the yaml beside the exported file must give the model's depth again; None is the shipped
    # yaml's `penultimate` (right for 11 layers when the unused 12th block comes back from the extras)
    for layers, file_blocks, layer in ((12, 12, "last"), (11, 12, None), (11, 11, "last")):
        text_config = {"hidden_size": 1024, "num_hidden_layers": layers}
        assert exported_text_layer("sd2", "epsilon", text_config, _text_blocks(real_size_sd2, file_blocks)) == layer


def _tiny_sd2_without_yaml(orig: TinyOriginal, folder: Path) -> tuple[Path, dict]:
    """The tiny SD2 file (2 text blocks, a depth no real encoder has) with nothing saying which layer it reads, and
    its yaml (the real one with the tiny sizes) saying `penultimate`, to follow the advice with."""
    checkpoint = _write_original(orig, folder / "m.safetensors")
    model_yaml = yaml.safe_load(orig.yaml_path.read_text())
    model_yaml["model"]["params"]["cond_stage_config"]["params"]["layer"] = "penultimate"
    return checkpoint, model_yaml


@pytest.mark.slow
def test_the_converter_says_a_guessed_text_encoder_depth_and_its_advice_works(originals, tmp_path, capsys):
    """The command line prints the text encoder's depth; a tiny SD2 file whose depth is a guess keeps both its
    blocks, and each way the evidence advises (a yaml beside the file, --original_config_file) keeps one."""
    _, model_yaml = _tiny_sd2_without_yaml(originals["sd2"], tmp_path)
    argv = ["--checkpoint_path", "m.safetensors", "--prediction_type", "epsilon", "--image_size", "64"]

    assert _run_main([*argv, "--dump_path", "whole"], tmp_path) == 0
    out = capsys.readouterr().out
    assert (f"  evidence: text encoder: all 2 blocks kept: {NO_YAML_SAYS}, and 2 is not OpenCLIP ViT-H/14's depth "
            "(24 blocks, of which SD2 runs 23), so every block is kept") in out
    assert ("To keep 1 instead, read at the penultimate layer as SD2 does: put the model's yaml with layer: "
            "penultimate under model.params.cond_stage_config.params beside the file as m.yaml (the converter also "
            "takes it as --original_config_file) and convert again") in out
    assert _config(tmp_path / "whole", "text_encoder")["num_hidden_layers"] == 2

    (tmp_path / "m.yaml").write_text(yaml.safe_dump(model_yaml))
    assert _run_main([*argv, "--dump_path", "beside"], tmp_path) == 0
    assert ("  evidence: text encoder: 1 of the file's 2 blocks kept: m.yaml reads the penultimate layer"
            in capsys.readouterr().out)
    os.rename(tmp_path / "m.yaml", tmp_path / "model.yaml")
    assert _run_main([*argv, "--original_config_file", "model.yaml", "--dump_path", "given"], tmp_path) == 0
    for dump in ("beside", "given"):
        assert _config(tmp_path / dump, "text_encoder")["num_hidden_layers"] == 1
        converted = _load_folder(tmp_path / dump)["text_encoder"]
        assert {k.split(".")[2] for k in converted if k.startswith("encoder.layers.")} == {"0"}


def test_ckpt_cache_says_and_records_a_guessed_text_encoder_depth_and_its_advice_works(originals, tmp_path, capsys):
    """What train.py's single-file conversion prints and keeps in converted_from.json says the depth, and its
    advice (a yaml beside the file) converts to the other reading: the cache converts again when the yaml appears,
    and reuses the conversion while it stays as it is."""
    from trainer.models.ckpt_cache import SOURCE_RECORD, prepare_single_file

    checkpoint, model_yaml = _tiny_sd2_without_yaml(originals["sd2"], tmp_path)
    cache = tmp_path / "ckpt_cache"
    entry = prepare_single_file(checkpoint, cache, "epsilon")
    (line,) = [line for line in entry.evidence if line.startswith("text encoder: ")]
    assert line.startswith("text encoder: all 2 blocks kept") and "beside the file as m.yaml" in line
    assert f"  - {line}\n" in capsys.readouterr().out
    assert line in json.loads((entry.path / SOURCE_RECORD).read_text())["evidence"]
    assert _config(entry.path, "text_encoder")["num_hidden_layers"] == 2

    (tmp_path / "m.yaml").write_text(yaml.safe_dump(model_yaml))
    again = prepare_single_file(checkpoint, cache, "epsilon")
    assert f"({'the yaml beside it, m.yaml, was added since'})" in capsys.readouterr().out
    assert any(line.startswith("text encoder: 1 of the file's 2 blocks kept: m.yaml reads the penultimate layer")
               for line in again.evidence), again.evidence
    assert _config(again.path, "text_encoder")["num_hidden_layers"] == 1
    prepare_single_file(checkpoint, cache, "epsilon")
    assert "Model: reusing " in capsys.readouterr().out


@pytest.mark.parametrize("family", first_fast("sd1", "sd2", "sd2-v"))
def test_a_file_without_a_yaml_that_fits_converts_from_its_shapes(tiny_model, tmp_path, family):
    """A tiny file exported without its sidecar: no shipped yaml has its shapes, so the UNet and VAE
    configuration is read from the weights, and the folder loads to the same weights."""
    from diffusers import StableDiffusionPipeline

    export = export_single_file(tiny_model(family), tmp_path / "tiny.safetensors")
    export.sidecar_yaml.unlink()

    result = convert_checkpoint_file(export.checkpoint_path, tmp_path / "out")

    assert any("read from the weights' shapes" in line for line in result.evidence), result.evidence
    assert result.prediction_type == EXPECTED[family][1]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    for name, tensors in _load_folder(tiny_model(family)).items():
        loaded = getattr(pipe, name).state_dict()
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items()), name
    unet, tiny = _config(tmp_path / "out", "unet"), _config(tiny_model(family), "unet")
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "use_linear_projection"):
        assert unet[key] == tiny[key], key
    # the weights hold no head count: SD2's 64-wide heads (the tiny model's too), SD1's 8 heads
    assert unet["attention_head_dim"] == ([1, 2] if family != "sd1" else 8)


def test_a_given_yaml_that_does_not_fit_is_still_refused(originals, tmp_path):
    checkpoint = _write_original(originals["sd1"], tmp_path / "m.safetensors")
    with pytest.raises(ConversionError, match=r"does not match v1-inference.yaml: shape mismatches"):
        convert_checkpoint_file(checkpoint, tmp_path / "out", original_config=REPO_ROOT / "v1-inference.yaml")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_sizes_keep_the_shipped_yaml_and_a_pruned_sd1_reads_its_shapes():
    for (family, prediction), stock in STOCK_CONFIGS.items():
        original = load_original_config(REPO_ROOT / stock.yaml)
        stock_path = stock_config_path(family, prediction)
        config, differences, _ = fitting_original_config(blank_original(original, family).state, stock_path)
        assert differences == [] and config == original, (stock.yaml, differences)

    # SD1 with one layer per block (as distilled variants have): read from the shapes, SD1's 8 heads kept
    v1 = load_original_config(REPO_ROOT / "v1-inference.yaml")
    state = blank_original(v1, "sd1", layers_per_block=1).state
    config, differences, heads = fitting_original_config(state, REPO_ROOT / "v1-inference.yaml")
    assert differences == ["UNet layers_per_block 1 (v1-inference.yaml: 2)"] and "8 attention heads" in heads
    unet_config = unet_config_from_ldm(config, 512, False, None)
    assert unet_config["attention_head_dim"] == 8 and unet_config["block_out_channels"] == [320, 640, 1280, 1280]
    expected = {k: v.shape for k, v in meta_model("unet", unet_config).state_dict().items()}
    assert {k: v.shape for k, v in convert_unet(state, unet_config).items()} == expected


def test_extract_ema(originals, tmp_path):
    orig = originals["sd1"]
    state = dict(orig.state)
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    for k in unet_keys:  # LDM's EMA names drop the dots after "model."
        state["model_ema." + "".join(k.split(".")[1:])] = state[k] + 1
    save_file(state, str(tmp_path / "ema.safetensors"))
    result = convert_checkpoint_file(tmp_path / "ema.safetensors", tmp_path / "ema", original_config=orig.yaml_path,
                                     image_size=64, extract_ema=True)
    assert any("EMA" in note for note in result.notes)
    ours = load_file(str(tmp_path / "ema" / "unet" / COMPONENT_FILES["unet"]))
    source = load_file(str(orig.diffusers_dir / "unet" / COMPONENT_FILES["unet"]))
    assert all(torch.equal(ours[k], v + 1) for k, v in source.items())
    plain = convert_checkpoint_file(tmp_path / "ema.safetensors", tmp_path / "plain", original_config=orig.yaml_path,
                                    image_size=64)
    assert any("--extract_ema" in note for note in plain.notes)


def test_runs_with_every_socket_refused_in_process(originals, tmp_path, monkeypatch, capsys):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network use attempted during conversion")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for family in ("sd1", "sd2-v"):
        args, _, dump = _stage_command(originals[family], tmp_path / family, "safetensors")
        assert _run_main(args, tmp_path / family) == 0, capsys.readouterr().err
        assert (dump / "model_index.json").is_file()


@pytest.mark.slow
def test_runs_with_every_socket_refused(originals, tmp_path):
    """A fresh interpreter whose sockets refuse from the first import on."""
    (tmp_path / "nonet").mkdir()
    (tmp_path / "nonet" / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*a, **k):\n    raise OSError('network use attempted during conversion')\n"
        "socket.socket.connect = _refuse\nsocket.socket.connect_ex = _refuse\n"
        "socket.create_connection = _refuse\nsocket.getaddrinfo = _refuse\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))}
    env["PYTHONPATH"] = str(tmp_path / "nonet")
    args, _, dump = _stage_command(originals["sd2-v"], tmp_path, "safetensors")
    result = _run_cli(TO_DIFFUSERS, args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert (dump / "model_index.json").is_file()
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           env=env, capture_output=True, text=True)
    assert "network use attempted" in probe.stderr  # the guard really is active in that interpreter


# ----------------------------------------------------------------------------------------- refusals

def _expect_refusal(argv: list[str], cwd: Path, capsys, *needles: str) -> str:
    """In-process run of the CLI: exit != 0, one message naming the fix, no traceback, nothing written."""
    before = sorted(p.name for p in cwd.iterdir())
    code = _run_main(argv, cwd)
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert sorted(p.name for p in cwd.iterdir()) == before  # nothing written, no temp folder left
    return err


def _args(checkpoint: str, yaml_name: str, *extra: str) -> list[str]:
    return ["--original_config_file", yaml_name, "--checkpoint_path", checkpoint, "--image_size", "64",
            "--dump_path", "out", *extra]


def test_refuses_sd2_checkpoint_with_v1_yaml(originals, tmp_path, capsys):
    _write_original(originals["sd2"], tmp_path / "m.safetensors")
    shutil.copyfile(originals["sd1"].yaml_path, tmp_path / "v1-inference.yaml")
    _expect_refusal(_args("m.safetensors", "v1-inference.yaml"), tmp_path, capsys,
                    "SD2.x", "--original_config_file v2-inference.yaml")


def test_refuses_sd1_checkpoint_with_v2_yaml(originals, tmp_path, capsys):
    _write_original(originals["sd1"], tmp_path / "m.ckpt")
    shutil.copyfile(originals["sd2"].yaml_path, tmp_path / "v2-inference.yaml")
    _expect_refusal(_args("m.ckpt", "v2-inference.yaml"), tmp_path, capsys,
                    "SD1.x", "--original_config_file v1-inference.yaml")


def test_refuses_inpainting_checkpoint_with_4_channel_yaml(originals, tmp_path, capsys):
    orig = originals["sd1"]
    state = dict(orig.state)
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(64, 9, 3, 3)
    save_file(state, str(tmp_path / "inpaint.safetensors"))
    shutil.copyfile(orig.yaml_path, tmp_path / "v1-inference.yaml")
    _expect_refusal(_args("inpaint.safetensors", "v1-inference.yaml"), tmp_path, capsys,
                    "inpainting", "--num_in_channels 9", "v1-inpainting-inference.yaml")
    # with the channel count given, it converts to an inpainting pipeline
    result = convert_checkpoint_file(tmp_path / "inpaint.safetensors", tmp_path / "inpaint", image_size=64,
                                     original_config=orig.yaml_path, num_in_channels=9)
    assert result.in_channels == 9 and _config(tmp_path / "inpaint", "unet")["in_channels"] == 9
    assert json.loads((tmp_path / "inpaint" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInpaintPipeline"


@pytest.mark.parametrize("evidence", ["metadata", "sidecar", "v_pred key"])
def test_refuses_epsilon_flag_on_a_file_that_says_v(originals, tmp_path, capsys, evidence):
    orig = originals["sd2-v"]
    shutil.copyfile(originals["sd2"].yaml_path, tmp_path / "v2-inference.yaml")
    if evidence == "metadata":
        _write_original(orig, tmp_path / "m.safetensors", metadata={"modelspec.prediction_type": "v"})
        checkpoint, where = "m.safetensors", "modelspec.prediction_type"
    elif evidence == "sidecar":
        _write_original(orig, tmp_path / "m.ckpt")
        shutil.copyfile(orig.yaml_path, tmp_path / "m.yaml")
        checkpoint, where = "m.ckpt", "sidecar m.yaml"
    else:
        state = {**orig.state, "v_pred": torch.tensor([])}
        torch.save(state, tmp_path / "m.ckpt")
        checkpoint, where = "m.ckpt", '"v_pred" key'
    _expect_refusal(_args(checkpoint, "v2-inference.yaml", "--prediction_type", "epsilon"), tmp_path, capsys,
                    where, "--prediction_type v_prediction", "v2-inference-v.yaml")


def test_refuses_flag_that_contradicts_the_yaml(originals, tmp_path, capsys):
    _write_original(originals["sd2"], tmp_path / "m.ckpt")
    shutil.copyfile(originals["sd2-v"].yaml_path, tmp_path / "v2-inference-v.yaml")
    _expect_refusal(_args("m.ckpt", "v2-inference-v.yaml", "--prediction_type", "epsilon"), tmp_path, capsys,
                    "v2-inference-v.yaml says v_prediction", "--original_config_file v2-inference.yaml")


def test_refuses_a_pickle_that_runs_code_and_runs_none_of_it(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload()},
               tmp_path / "evil.ckpt")
    shutil.copyfile(REPO_ROOT / "v1-inference.yaml", tmp_path / "v1-inference.yaml")
    _expect_refusal(_args("evil.ckpt", "v1-inference.yaml"), tmp_path, capsys,
                    "refused to load", "weights_only", "nothing in it was run", "(it calls posix.mkdir as it loads)")
    assert not marker.exists()


def _damaged(orig: TinyOriginal, folder: Path, case: str) -> str:
    """A damaged or disguised copy of `orig` in `folder`; returns its file name."""
    if case == "pickle named .safetensors":
        torch.save({"state_dict": orig.state}, folder / "m.safetensors")
        return "m.safetensors"
    name = {"truncated .safetensors": "m.safetensors", "truncated .ckpt": "m.ckpt",
            "truncated legacy .ckpt": "legacy.ckpt"}[case]
    if case == "truncated legacy .ckpt":  # torch's pre-1.6 format: a bare pickle stream, no zip directory
        torch.save({"state_dict": orig.state}, folder / name, _use_new_zipfile_serialization=False)
    else:
        _write_original(orig, folder / name)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) * 2 // 3])
    return name


@pytest.mark.parametrize("case, needles", [
    ("pickle named .safetensors", ["m.safetensors is named .safetensors but is a torch pickle checkpoint (torch-zip)",
                                   "rename it to m.ckpt", "weights_only=True"]),
    ("truncated .safetensors", ["m.safetensors is truncated: it is", "but its safetensors header declares",
                                "Download or copy the file again"]),
    ("truncated .ckpt", ["m.ckpt is truncated or damaged: it starts as a torch zip checkpoint",
                         "Download or copy the file again"]),
    ("truncated legacy .ckpt", ["could not read legacy.ckpt as a torch checkpoint", "expected a complete file"]),
])
def test_refuses_a_damaged_or_disguised_checkpoint(originals, tmp_path, capsys, case, needles):
    shutil.copyfile(originals["sd1"].yaml_path, tmp_path / "v1-inference.yaml")
    name = _damaged(originals["sd1"], tmp_path, case)
    _expect_refusal(_args(name, "v1-inference.yaml"), tmp_path, capsys, *needles)


@pytest.mark.slow
def test_pickle_named_safetensors_from_a_real_subprocess_has_no_traceback(originals, tmp_path):
    shutil.copyfile(originals["sd1"].yaml_path, tmp_path / "v1-inference.yaml")
    name = _damaged(originals["sd1"], tmp_path, "pickle named .safetensors")
    result = _run_cli(TO_DIFFUSERS, _args(name, "v1-inference.yaml", "--from_safetensors"), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and "is named .safetensors but is a torch pickle" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_refusal_from_a_real_subprocess_has_no_traceback(originals, tmp_path):
    _write_original(originals["sd2"], tmp_path / "m.ckpt")
    shutil.copyfile(originals["sd1"].yaml_path, tmp_path / "v1-inference.yaml")
    result = _run_cli(TO_DIFFUSERS, _args("m.ckpt", "v1-inference.yaml"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("error: ") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing checkpoint", "missing yaml", "not a model", "not sd", "exists",
                                  "extract_ema without ema", "shapes"])
def test_other_refusals(originals, tmp_path, capsys, case):
    shutil.copyfile(originals["sd1"].yaml_path, tmp_path / "v1-inference.yaml")
    _write_original(originals["sd1"], tmp_path / "m.safetensors")
    argv, needles = _args("m.safetensors", "v1-inference.yaml"), []
    if case == "missing checkpoint":
        argv, needles = _args("nope.ckpt", "v1-inference.yaml"), ["does not exist"]
    elif case == "missing yaml":
        argv, needles = _args("m.safetensors", "v9.yaml"), ["does not exist", "v1-inference.yaml"]
    elif case == "not a model":
        (tmp_path / "notes.ckpt").write_text("hello")
        argv, needles = _args("notes.ckpt", "v1-inference.yaml"), ["neither a safetensors file nor a torch"]
    elif case == "not sd":
        save_file({"lora_unet_down.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
        argv, needles = _args("lora.safetensors", "v1-inference.yaml"), ["no Stable Diffusion UNet", "LoRA"]
    elif case == "exists":
        (tmp_path / "out").mkdir()
        needles = ["already exists"]
    elif case == "extract_ema without ema":
        argv, needles = argv + ["--extract_ema"], ["no EMA weights", "drop --extract_ema"]
    elif case == "shapes":  # the stock full-size yaml on a tiny file: right family, wrong sizes
        shutil.copyfile(REPO_ROOT / "v1-inference.yaml", tmp_path / "v1-inference.yaml")
        needles = ["does not match v1-inference.yaml", "shape"]
    _expect_refusal(argv, tmp_path, capsys, *needles)


def test_sd2_without_any_prediction_evidence_asks_for_it(originals, tmp_path):
    _write_original(originals["sd2"], tmp_path / "m.ckpt")
    with pytest.raises(ConversionError, match="pass prediction_type 'epsilon' or 'v_prediction'"):
        convert_checkpoint_file(tmp_path / "m.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["--from_safetensors on a pickle", "safetensors without the flag"])
def test_content_beats_the_flag_and_says_so(originals, tmp_path, capsys, case):
    shutil.copyfile(originals["sd1"].yaml_path, tmp_path / "v1-inference.yaml")
    if case == "--from_safetensors on a pickle":
        _write_original(originals["sd1"], tmp_path / "m.ckpt")
        argv = _args("m.ckpt", "v1-inference.yaml", "--from_safetensors")
        said = "is a torch checkpoint"
    else:
        _write_original(originals["sd1"], tmp_path / "m.safetensors")
        os.rename(tmp_path / "m.safetensors", tmp_path / "m.ckpt")
        argv = _args("m.ckpt", "v1-inference.yaml")
        said = "is a safetensors file although --from_safetensors was not given"
    assert _run_main(argv, tmp_path) == 0
    assert said in capsys.readouterr().out and (tmp_path / "out" / "model_index.json").is_file()


def test_failure_while_writing_leaves_nothing(originals, tmp_path):
    """A late failure (here a yaml whose schedule has no timesteps, caught only when the scheduler is
    built, after the weights are written) leaves neither the folder nor its temporary sibling."""
    broken = yaml.safe_load(originals["sd1"].yaml_path.read_text())
    broken["model"]["params"]["timesteps"] = 0
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    checkpoint = _write_original(originals["sd1"], tmp_path / "m.safetensors")
    with pytest.raises(Exception):
        convert_checkpoint_file(checkpoint, tmp_path / "cache" / "m", original_config=tmp_path / "broken.yaml",
                                image_size=64, scheduler_type="ddim")
    assert list((tmp_path / "cache").iterdir()) == []


def test_upcast_flag_forms():
    from utils.convert_original_stable_diffusion_to_diffusers import build_parser

    parser = build_parser()
    base = ["--checkpoint_path", "m.ckpt", "--dump_path", "d"]
    assert parser.parse_args(base + ["--upcast_attention", "True"]).upcast_attention is True
    assert parser.parse_args(base + ["--upcast_attn", "False"]).upcast_attention is False
    assert parser.parse_args(base + ["--upcast_attention", "--half"]).upcast_attention is True
    assert parser.parse_args(base).upcast_attention is None
    for scheduler in ("pndm", "lms", "ddim", "euler", "euler-ancestral", "dpm"):
        assert parser.parse_args(base + ["--scheduler_type", scheduler]).scheduler_type == scheduler
    args = parser.parse_args(base + ["--extract_ema", "--half", "--num_in_channels", "9", "--device", "cpu",
                                     "--to_safetensors", "--from_safetensors"])
    assert args.extract_ema and args.half and args.num_in_channels == 9


def test_the_documented_scheduler_types_are_the_converters():
    docs = (REPO_ROOT / "docs" / "BASEMODELS.md").read_text()
    documented = re.search(r"`--scheduler_type` one of ([a-z, -]+);", docs)
    assert documented is not None and documented.group(1).split(", ") == list(SCHEDULER_TYPES)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler_type", first_fast("lms", *(t for t in SCHEDULER_TYPES if t != "lms")))
def test_every_documented_scheduler_type_converts_and_samples(originals, tmp_path, scheduler_type):
    """`--scheduler_type` as documented, from a fresh `python utils/...` process: the folder's scheduler is the
    one asked for and it samples. LMS needs scipy, which requirements.txt pins (a fresh install used to fail)."""
    from diffusers import StableDiffusionPipeline

    orig = originals["sd1"]
    _write_original(orig, tmp_path / "m.safetensors")
    shutil.copyfile(orig.yaml_path, tmp_path / "v1-inference.yaml")
    result = _run_cli(TO_DIFFUSERS, _args("m.safetensors", "v1-inference.yaml", "--scheduler_type", scheduler_type),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe.scheduler).__name__ == SCHEDULER_CLASSES[scheduler_type]
    image = pipe("a cat", num_inference_steps=3, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


@pytest.mark.slow
def test_a_scheduler_whose_package_is_missing_is_refused_before_writing(originals, tmp_path):
    """Without scipy (a python where `import scipy` fails, as diffusers sees a missing package), `--scheduler_type
    lms` stops in one line naming the package and the fix, and writes nothing."""
    (tmp_path / "noscipy").mkdir()
    (tmp_path / "noscipy" / "sitecustomize.py").write_text("import sys\nsys.modules['scipy'] = None\n")
    orig = originals["sd1"]
    _write_original(orig, tmp_path / "m.safetensors")
    shutil.copyfile(orig.yaml_path, tmp_path / "v1-inference.yaml")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "noscipy")}
    result = _run_cli(TO_DIFFUSERS, _args("m.safetensors", "v1-inference.yaml", "--scheduler_type", "lms"),
                      cwd=tmp_path, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: --scheduler_type lms (LMSDiscreteScheduler) needs scipy, which is not "
                                    "installed; install the pinned packages with pip install -r requirements.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "noscipy", "v1-inference.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_converted_folder_trains_with_train_py(originals, tmp_path, shapes_dir, family):
    """The issue's command, then `python train.py --resume_ckpt <name>` on what it wrote."""
    from tests.conftest import run_train

    args, _, dump = _stage_command(originals[family], tmp_path, "safetensors")
    converted = _run_cli(TO_DIFFUSERS, args, tmp_path)
    assert converted.returncode == 0, converted.stderr
    result = run_train(["--resume_ckpt", dump.name, "--data_root", str(shapes_dir), "--resolution", "64",
                        "--batch_size", "4", "--max_steps", "2", "--logdir", "logs"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "v_prediction" if family == "sd2-v" else "epsilon"
    assert f"Model: {'SD2' if family == 'sd2-v' else 'SD1'} model at {dump.resolve()}: prediction type {expected}" in result.stdout
    assert "Saved model: " in result.stdout


def test_clip_tokenizer_matches_openai_ids():
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[4:] == [0] * 73  # SD2 pads with "!" (id 0)


@pytest.mark.slow
def test_a_folder_converted_from_an_fp16_file_loads_with_a_plain_from_pretrained(tiny_model, tmp_path):
    """Most downloaded single files are fp16. Their converted folder (ckpt_cache/, the converter's output) loads
    the common way, `StableDiffusionPipeline.from_pretrained(folder)` with no dtype, and generates: its text
    encoder's config says fp32, as diffusers holds the UNet in fp32 (trainer/saves/checkpoints.py says why)."""
    from diffusers import StableDiffusionPipeline

    export = export_single_file(tiny_model("sd1"), tmp_path / "half.safetensors", half=True)
    convert_checkpoint_file(export.checkpoint_path, tmp_path / "converted")
    with safe_open(tmp_path / "converted" / "text_encoder" / "model.safetensors", "pt") as stored:
        assert stored.get_tensor(next(iter(stored.keys()))).dtype == torch.float16  # stored as the file was
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "converted")
    loaded.set_progress_bar_config(disable=True)
    images = loaded("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images  # failed here: "mat1 and mat2 must have the same dtype"
    assert torch.isfinite(torch.from_numpy(images)).all()
    assert {loaded.unet.dtype, loaded.text_encoder.dtype} == {torch.float32}
