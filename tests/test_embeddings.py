"""Embedding mode: the token rows on a frozen text encoder, the files against diffusers' own loader, the config's
and EveryDream2's rules, and real runs (only the rows change; samples, validation, EMA, resume, pivotal tuning)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data.captions import spell_out_vectors, token_groups, tokenize_captions
from tests.conftest import NAMED_TOKEN, REPO_ROOT, run_script, run_train
from tests.test_loop import FAST, saved_paths
from trainer.adapters.embedding_file import TENSOR, bundled_tensors, file_name, file_tensors
from trainer.adapters.embedding_tokens import EmbeddingToken, read_token_file, unnamed_tokens
from trainer.adapters.embeddings import add_embeddings
from trainer.config.load import ConfigError, load_config
from trainer.errors import UserError
from trainer.tiny.model import make_tiny_pipeline

ED2_PLUGIN = REPO_ROOT.parent / "shared" / "everydream2" / "plugins" / "textual_inversion.json"
TOKEN = NAMED_TOKEN


def states(text_encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_new_rows_train_alone_and_every_other_token_reads_as_before():
    pipe = make_tiny_pipeline("sd1")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    plain = tokenize_captions(pipe.tokenizer, ["a photo of a dog", "a red circle"])
    before = states(pipe.text_encoder, plain)
    rows = add_embeddings(pipe.text_encoder, pipe.tokenizer, (EmbeddingToken(TOKEN, "dog", 3),))
    (ids,) = rows.tokens.values()
    assert min(ids) >= table.shape[0] and len(set(ids)) == 3  # new tokens, past the table
    torch.testing.assert_close(states(pipe.text_encoder, plain), before, rtol=0, atol=0)
    dog = pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert torch.equal(rows.trained_rows.detach(), table[dog].expand(3, -1))  # started from the initializer
    # a caption's token is spelled out into its three vectors, and each reads its own row
    named = tokenize_captions(pipe.tokenizer, [f"a photo of a {TOKEN.upper()}"])
    assert named[0, 5:8].tolist() == ids
    pipe.text_encoder.requires_grad_(False)
    rows.trained_rows.requires_grad_(True)
    pipe.text_encoder(named)[0].square().sum().backward()
    assert rows.trained_rows.grad.abs().sum(1).gt(0).all()  # every vector gets a gradient
    (trained,) = [k for k, p in pipe.text_encoder.named_parameters() if p.requires_grad]
    assert trained.endswith("embeddings.token_embedding.trained_rows")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)  # the table itself is untouched
    assert set(pipe.text_encoder.state_dict()) - {trained} == \
        set(make_tiny_pipeline("sd1").text_encoder.state_dict())  # the base's keys are kept


def test_a_word_the_tokenizer_has_trains_its_own_row_with_one_vector():
    """EveryDream2's example trains "cane", a word of CLIP's vocabulary: in place, as its plugin does."""
    pipe = make_tiny_pipeline("sd1")
    vocabulary = len(pipe.tokenizer)
    rows = add_embeddings(pipe.text_encoder, pipe.tokenizer, (EmbeddingToken("cane", "cane"),))
    assert rows.in_place == ["cane"] and len(pipe.tokenizer) == vocabulary  # no token added
    (ids,) = rows.tokens.values()
    assert ids == pipe.tokenizer("cane", add_special_tokens=False).input_ids
    with pytest.raises(UserError, match="a word the tokenizer already has.*'<cane>'"):
        add_embeddings(make_tiny_pipeline("sd1").text_encoder, make_tiny_pipeline("sd1").tokenizer,
                       (EmbeddingToken("cane", "cane", 4),))


@pytest.mark.parametrize("family", ["sd1", pytest.param("sd2", marks=pytest.mark.slow)])
def test_diffusers_loads_the_file_and_its_prompt_embedding_equals_the_trained_rows(family: str, tmp_path: Path):
    trained = make_tiny_pipeline(family)
    rows = add_embeddings(trained.text_encoder, trained.tokenizer, (EmbeddingToken(TOKEN, "a photo", 2),))
    rows.trained_rows.data += torch.randn_like(rows.trained_rows)  # trained: not the initializer's vectors
    path = tmp_path / f"{file_name(TOKEN)}.safetensors"
    save_file(file_tensors(rows.vectors()[TOKEN], torch.float32), str(path))
    assert list(load_file(str(path))) == [TENSOR]  # one tensor: AUTOMATIC1111 refuses a file with more
    pipe = make_tiny_pipeline(family)
    pipe.load_textual_inversion(str(path), token=TOKEN)
    loaded = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[loaded].detach(),
                               rows.trained_rows.detach(), rtol=0, atol=0)
    prompt = f"a painting of {TOKEN}, in a field"
    with torch.no_grad():
        expected = trained.encode_prompt(prompt, "cpu", 1, False)[0]
        got = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad():
        untrained = make_tiny_pipeline(family).encode_prompt(prompt, "cpu", 1, False)[0]
    assert (got - untrained).abs().max() > 1e-3  # the token's vectors make a difference: a real check


def test_the_bundled_names_are_those_automatic1111_reads():
    vectors = {"hat*": torch.zeros(8, 768), "my.style": torch.zeros(1, 768)}
    assert sorted(bundled_tensors(vectors, torch.float16)) == [
        "bundle_emb.hat_.string_to_param.*", "bundle_emb.my_style.string_to_param.*"]
    assert file_name("hat*") == "hat_" and file_name("dancing shoes") == "dancing shoes"


def test_everydream2s_plugin_file_is_read_as_it_is():
    tokens = read_token_file(ED2_PLUGIN)
    assert tokens == (EmbeddingToken("hat*", "a man's hat", 8), EmbeddingToken("dancing shoes", "shoes", 1),
                      EmbeddingToken("cane", "cane", 1))
    pipe = make_tiny_pipeline("sd1")
    rows = add_embeddings(pipe.text_encoder, pipe.tokenizer, tokens)
    assert {t: len(i) for t, i in rows.tokens.items()} == {"hat*": 8, "dancing shoes": 1, "cane": 1}
    assert [token for token, names in token_groups(pipe.tokenizer).items() if len(names) > 1] == ["hat*"]
    ids = tokenize_captions(pipe.tokenizer, ["a man in a Hat* with Dancing  Shoes and a cane"])[0].tolist()
    assert ids[5:13] == rows.tokens["hat*"] and rows.tokens["dancing shoes"][0] in ids and \
        rows.tokens["cane"][0] in ids


def test_a_token_file_with_problems_says_each(tmp_path: Path):
    path = tmp_path / "ti.json"
    path.write_text(json.dumps({"tokens": [{"token": "a"}, {"token": "b", "initializer": "x", "vector_length": 0},
                                           {"token": "c", "initializer": "y"}, {"token": "C", "initializer": "z"}]}))
    with pytest.raises(UserError) as err:
        read_token_file(path)
    text = str(err.value)
    assert "entry 1: 'a' needs an \"initializer\"" in text and "entry 2: 'b' has vector_length 0" in text
    assert "entry 4: 'C' is named twice" in text
    path.write_text("{}")
    with pytest.raises(UserError, match='no "tokens" list'):
        read_token_file(path)


def test_the_tokens_must_be_written_in_some_caption_as_the_tokenizer_reads_them():
    tokens = (EmbeddingToken("sks-dog", "dog"), EmbeddingToken("dancing shoes", "shoes"))
    assert unnamed_tokens(tokens, ["a SKS-Dog on grass", "dancing\nshoes"]) == []
    assert unnamed_tokens(tokens, ["xsks-dogs pack"]) == ["dancing shoes"]  # inside a word, as the tokenizer finds it
    prefix = (EmbeddingToken("hat", "hat"), EmbeddingToken("hat*", "hat"))
    assert unnamed_tokens(prefix, ["a hat* on a square"]) == ["hat"]  # the tokenizer reads the longer token there


def test_a_longer_token_that_starts_with_another_is_spelled_out_as_itself():
    pipe = make_tiny_pipeline("sd1")
    rows = add_embeddings(pipe.text_encoder, pipe.tokenizer, (EmbeddingToken("<t>", "dog", 2),
                                                              EmbeddingToken("<t>-x", "cat", 2)))
    groups = token_groups(pipe.tokenizer)
    assert spell_out_vectors("a <T>-x and a <t>, <t>_1", groups) == "a <t>-x <t>-x_1 and a <t> <t>_1, <t>_1"
    ids = tokenize_captions(pipe.tokenizer, ["a <T>-x and a <t>"])[0].tolist()
    assert ids[2:4] == rows.tokens["<t>-x"] and ids[6:8] == rows.tokens["<t>"]


def test_tokens_that_would_break_their_captions_or_files_are_refused(tmp_path: Path):
    path = tmp_path / "ti.json"
    long = "sks" * 90
    path.write_text(json.dumps({"tokens": [
        {"token": "sks*", "initializer": "a"}, {"token": "sks?", "initializer": "a"},
        {"token": "sks, dog", "initializer": "a"}, {"token": "sks_2", "initializer": "a", "vector_length": 2},
        {"token": long, "initializer": "a"}]}))
    with pytest.raises(UserError) as err:
        read_token_file(path)
    text = str(err.value)
    assert "'sks*' and 'sks?' would be saved under one file name ('sks_')" in text
    assert "'sks, dog' holds a comma" in text and "'sks_2' ends in _<number>" in text
    assert "270 bytes long" in text


def test_the_rows_train_whatever_freezes_the_text_encoders_layers_and_embeddings():
    """Pivotal tuning with text-encoder adapters and optimizer.json freezing every layer: the rows still train."""
    from trainer.adapters.lora import LoraSettings, add_adapters
    from trainer.optim.build import freeze_text_encoder_parts
    from trainer.optim.plan import TextEncoderFreezing

    pipe = make_tiny_pipeline("sd1")
    rows = add_embeddings(pipe.text_encoder, pipe.tokenizer, (EmbeddingToken(TOKEN, "dog"),))
    add_adapters({"text_encoder": pipe.text_encoder}, LoraSettings(4, 4.0, 0.0, "attn", True))
    said = freeze_text_encoder_parts(pipe.text_encoder, TextEncoderFreezing(unfreeze_last_n_layers=0),
                                     (rows.trained_rows,))
    assert "the embeddings (not the new tokens' rows)" in said
    assert [k for k, p in pipe.text_encoder.named_parameters() if p.requires_grad] == [
        k for k, _ in pipe.text_encoder.named_parameters() if k.endswith("trained_rows")]


def test_an_initializer_may_name_the_tokens_themselves():
    pipe = make_tiny_pipeline("sd1")
    pieces = pipe.tokenizer("sks-thing", add_special_tokens=False).input_ids
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    rows = add_embeddings(pipe.text_encoder, pipe.tokenizer, (EmbeddingToken(TOKEN, TOKEN, 2),
                                                              EmbeddingToken("<b>", TOKEN, 1)))
    assert torch.equal(rows.trained_rows.detach(), table[[pieces[0], pieces[1 % len(pieces)], pieces[0]]])


# ---------------------------------------------------------------- the config


def test_embedding_keys_need_a_token_and_go_with_what_they_can(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        load_config(["--data_root", str(tmp_path), "--embedding_vectors", "4", "--embedding_lr", "0.01"])
    assert "embedding_vectors: got 4" in str(err.value) and "embedding_lr: got 0.01" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(["--data_root", str(tmp_path), "--embedding_token", "sks", "--embedding_steps", "10",
                     "--disable_textenc_training", "--embedding_vectors", "80"])
    text = str(err.value)
    assert "embedding_steps: got 10" in text and "set max_steps" in text
    assert "disable_textenc_training: got true" in text and "a vector count from 1 to 75" in text
    with pytest.raises(ConfigError, match="cond_dropout: got 1.0 .* the token would never train"):
        load_config(["--data_root", str(tmp_path), "--embedding_token", "sks", "--cond_dropout", "1"])
    cfg = load_config(["--data_root", str(tmp_path), "--embedding_token", "sks", "--lora_rank", "4"]).config
    assert not cfg.disable_textenc_training and not cfg.lora_text_encoder  # pivotal: the rows train, no TE adapters


def test_everydream2s_plugin_key_becomes_embedding_config_with_the_unet_frozen(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # EveryDream2 runs from its own folder, whose plugins/ holds the plugin's json
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "textual_inversion.json").write_bytes(ED2_PLUGIN.read_bytes())
    base = {"data_root": str(tmp_path), "plugins": ["plugins.textual_inversion.TextualInversionPlugin"]}
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**base, "disable_unet_training": True}))
    loaded = load_config(["--config", str(config)])
    assert loaded.config.embedding_config == "plugins/textual_inversion.json"
    assert any("read as embedding_config" in notice for notice in loaded.notices)
    config.write_text(json.dumps(base))  # EveryDream2 would train the UNet too: not what happens here, so refused
    with pytest.raises(ConfigError, match="plugins: EveryDream2's textual-inversion plugin .* disable_unet_training"):
        load_config(["--config", str(config)])
    config.write_text(json.dumps({"data_root": str(tmp_path), "disable_unet_training": True}))
    with pytest.raises(ConfigError, match="disable_unet_training: true .* unless only embeddings train"):
        load_config(["--config", str(config)])
    config.write_text(json.dumps({**base, "disable_unet_training": True,
                                  "plugins": [*base["plugins"], "plugins.interruptible.InterruptiblePlugin"]}))
    assert "plugins" in load_config(["--config", str(config)]).warnings[0]


# ---------------------------------------------------------------- real runs


def embedding_run(tiny_model, data: Path, cwd: Path, *extra: str, family: str = "sd1") -> tuple[str, list[Path]]:
    result = run_train(["--resume_ckpt", str(tiny_model(family)), "--data_root", str(data), "--batch_size", "2",
                        *FAST, "--embedding_token", TOKEN, "--embedding_vectors", "2", "--embedding_init", "circle",
                        "--save_full_precision", *extra], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, saved_paths(result.stdout, "Saved embedding: ")


@pytest.mark.slow
def test_a_run_changes_only_the_rows_and_saves_what_it_trained(tiny_model, named_shapes: Path, tmp_path: Path,
                                                               capsys):
    """In process, as train.py runs: every weight of the UNet, text encoder and VAE stays bit-identical; samples
    (a prompt with the token), validation and the EMA run; the file holds the rows exactly as trained."""
    from data.dataset import build_training_data
    from data.options import DataOptions
    from trainer.config.schema import TrainConfig
    from trainer.models.load import load_models
    from trainer.preflight.checks import run_preflight
    from trainer.preflight.device import for_this_machine
    from trainer.run.loop import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of a {TOKEN.upper()}\n", encoding="utf-8")
    model = tiny_model("sd1")
    cfg = for_this_machine(dataclasses.replace(
        TrainConfig(), resume_ckpt=str(model), data_root=str(named_shapes), resolution=64, batch_size=2, max_steps=4,
        logdir=str(tmp_path / "logs"), embedding_token=TOKEN, embedding_vectors=2, embedding_init="circle",
        embedding_lr=0.05, ema_decay_rate=0.9, validation_split=0.25, sample_prompts=str(prompts),
        sample_steps=4, save_full_precision=True, lr=1e-3))
    preflight = run_preflight(cfg, tmp_path / "run")
    models = load_models(str(model))
    base = {name: {k: v.clone() for k, v in getattr(models, name).state_dict().items()}
            for name in ("unet", "text_encoder", "vae")}
    rows = add_embeddings(models.text_encoder, models.tokenizer, preflight.embeddings)
    start = rows.trained_rows.detach().clone()
    data = build_training_data(DataOptions.from_config(cfg), models.tokenizer, models.vae,
                               cache_dir=preflight.cache_dir, scan=preflight.scan, held_out=preflight.validation)
    (tmp_path / "run").mkdir()
    result = train(cfg, models, data, tmp_path / "run", preflight, "no")
    assert result.global_step == 4
    for name, before in base.items():
        after = getattr(models, name).state_dict()
        after = {key: value for key, value in after.items() if not key.endswith("trained_rows")}
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value), (name, key)
    assert (rows.trained_rows.detach() - start).abs().min() > 0  # every value of both vectors trained
    saved = load_file(str(result.final_save / f"{TOKEN}.safetensors"))
    assert torch.equal(saved[TENSOR], rows.trained_rows.detach())
    ema = load_file(str(result.final_save.with_name(result.final_save.name + "-ema") / f"{TOKEN}.safetensors"))
    assert not torch.equal(ema[TENSOR], saved[TENSOR])  # the EMA of the rows, not a copy
    with safe_open(str(result.final_save / f"{TOKEN}.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion" and meta["token"] == TOKEN
    assert meta["vectors"] == "2" and meta["step"] == "4"
    assert list((tmp_path / "run" / "samples").glob("gs00004-grid.png"))
    assert "Validation loss at step 4" in capsys.readouterr().out


@pytest.mark.slow
def test_exact_resume_of_an_embedding_run_holds_only_the_rows(tiny_model, named_shapes: Path, tmp_path: Path):
    common = ["--ema_decay_rate", "0.9", "--save_optimizer", "--embedding_lr", "0.02"]
    _, straight = embedding_run(tiny_model, named_shapes, tmp_path, *common, "--max_steps", "6", "--logdir", "a")
    _, first = embedding_run(tiny_model, named_shapes, tmp_path, *common, "--max_steps", "3", "--logdir", "b")
    state = first[0].parent / "training_state"
    assert sum(f.stat().st_size for f in state.iterdir()) < 2**20  # the rows and their moments, not the model
    stdout, resumed = embedding_run(tiny_model, named_shapes, tmp_path, *common, "--max_steps", "6", "--logdir",
                                    "b", "--resume_state", str(first[0].parent))
    assert "Resumed from" in stdout
    for a, b in zip(straight, resumed):  # the rows, then their EMA
        assert torch.equal(load_file(a)[TENSOR], load_file(b)[TENSOR])
    other = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(named_shapes), *FAST,
                       "--embedding_token", TOKEN, "--embedding_vectors", "3", *common, "--max_steps", "6",
                       "--resume_state", str(first[0].parent)], cwd=tmp_path)
    assert other.returncode == 2 and "embedding" in other.stderr and "Traceback" not in other.stderr, other.stderr


@pytest.mark.slow
def test_everydream2s_plugin_trains_its_tokens_here(tiny_model, tmp_path: Path):
    """EveryDream2's own textual_inversion.json, from plugins/ beside the train.json, as its users run it."""
    from trainer.tiny.shapes import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", images_per_concept=4, size=64)
    for index, caption in enumerate(sorted(data.glob("*.txt"))):
        caption.write_text(["a man in a hat*", "dancing shoes on a floor", "an old cane"][index % 3] + "\n")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "textual_inversion.json").write_bytes(ED2_PLUGIN.read_bytes())
    (tmp_path / "train.json").write_text(json.dumps({
        "resume_ckpt": str(tiny_model("sd1")), "data_root": str(data), "disable_unet_training": True,
        "plugins": ["plugins.textual_inversion.TextualInversionPlugin"], "batch_size": 2, "max_steps": 2}))
    result = run_train([*FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training 'hat*' (8 vectors, from 'a man's hat'), 'dancing shoes' (1 vector, from 'shoes')" in result.stdout
    files = saved_paths(result.stdout, "Saved embeddings: ")[0]
    folder = Path(str(files).split(", ")[0]).parent
    width = json.loads((tiny_model("sd1") / "text_encoder" / "config.json").read_text())["hidden_size"]
    shapes = {p.stem: tuple(load_file(str(p))[TENSOR].shape) for p in folder.glob("*.safetensors")}
    assert shapes == {"hat_": (8, width), "dancing shoes": (1, width), "cane": (1, width)}
    # utils/generate.py takes the files; "cane" is a word of the vocabulary, so diffusers needs another name for it
    generate = ["--model", str(tiny_model("sd1")), "--steps", "1", "--out", str(tmp_path / "ti.png"),
                "--embedding", str(folder / "hat_.safetensors") + ":hat*"]
    refused = run_script(REPO_ROOT / "utils" / "generate.py", [*generate, "--embedding", str(folder / "cane.safetensors"),
                                                                "--prompt", "a cane"], cwd=tmp_path)
    assert refused.returncode == 2 and "FILE:<cane>" in refused.stderr and "Traceback" not in refused.stderr
    named = run_script(REPO_ROOT / "utils" / "generate.py", [*generate, "--embedding",
                                                              str(folder / "cane.safetensors") + ":<cane>",
                                                              "--prompt", "a man in a Hat* with a <cane>"], cwd=tmp_path)
    assert named.returncode == 0, named.stderr[-2000:]
    assert "Embedding: 'hat*' (8 vectors)" in named.stdout and "Embedding: '<cane>' (1 vector)" in named.stdout


@pytest.mark.slow
def test_the_dry_run_says_the_tokens_their_optimizer_and_the_memory_plan(tiny_model, named_shapes: Path,
                                                                          tmp_path: Path):
    result = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(named_shapes), *FAST,
                        "--embedding_token", TOKEN, "--embedding_vectors", "2", "--embedding_init", "circle",
                        "--lora_rank", "4", "--lora_unet_lr", "1e-4", "--embedding_steps", "10", "--dry_run"],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Dry run: embeddings: '{TOKEN}' (2 vectors from 'circle', in 4 captions)." in result.stdout
    assert "UNet adamw lr 0.0001, constant; embedding adamw lr 0.005, constant for the first 10 steps." in \
        result.stdout
    assert "Memory plan (CPU" in result.stdout and "Preflight: every check passed." in result.stdout


@pytest.mark.slow
def test_pivotal_tuning_saves_one_lora_file_with_the_vectors_bundled(tiny_model, named_shapes: Path, tmp_path: Path):
    stdout, files = embedding_run(tiny_model, named_shapes, tmp_path, "--lora_rank", "4", "--lora_unet_lr", "1e-2",
                                  "--max_steps", "4", "--embedding_steps", "2", "--save_optimizer")
    (lora,) = saved_paths(stdout, "Saved LoRA: ")
    (embedding,) = files
    tensors = load_file(str(lora))
    bundled = tensors.pop(f"bundle_emb.{TOKEN}.string_to_param.*")
    assert torch.equal(bundled, load_file(str(embedding))[TENSOR])
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    # the rows stopped after 2 steps while the adapters went on: a state at step 2 has the same rows
    _, early = embedding_run(tiny_model, named_shapes, tmp_path, "--lora_rank", "4", "--lora_unet_lr", "1e-2",
                             "--max_steps", "2", "--logdir", "early")
    assert torch.equal(load_file(str(early[0]))[TENSOR], bundled)
    # diffusers, as docs/EMBEDDINGS.md shows: the LoRA without its bundle, the embedding from its own file
    pipe = make_tiny_pipeline("sd1")
    pipe.load_lora_weights(tensors)
    pipe.load_textual_inversion(str(embedding), token=TOKEN)
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), bundled)
    # utils/generate.py takes the LoRA file whole, its bundled embedding included
    generated = run_script(REPO_ROOT / "utils" / "generate.py", [
        "--model", str(tiny_model("sd1")), "--lora", str(lora), "--prompt", f"a photo of a {TOKEN}", "--steps", "1",
        "--out", str(tmp_path / "pivotal.png")], cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert f"Embedding: '{TOKEN}' (2 vectors)" in generated.stdout and (tmp_path / "pivotal.png").is_file()


@pytest.mark.slow
def test_a_stop_signal_saves_the_rows_with_their_training_state(tiny_model, named_shapes: Path, tmp_path: Path):
    import signal

    from tests.conftest import TrainProcess

    process = TrainProcess(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(named_shapes), "--batch_size",
                            "2", *FAST, "--embedding_token", TOKEN, "--max_epochs", "500"], cwd=tmp_path)
    process.wait_for("Training SD1")
    time.sleep(2)
    process.signal_group(signal.SIGTERM)
    code, out, err = process.finish()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    (file,) = saved_paths(out, "Saved embedding: ")
    assert file.parent.name.startswith("interrupted-") and file.name == f"{TOKEN}.safetensors"
    assert (file.parent / "training_state" / "trainer_state.json").is_file()
    assert f"Continue with --resume_state {file.parent}" in out


@pytest.mark.slow
def test_a_data_set_without_the_token_is_refused_before_the_model_loads(tiny_model, shapes_dir: Path,
                                                                        tmp_path: Path):
    result = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *FAST,
                        "--embedding_token", "sks-dog", "--dry_run"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert "'sks-dog' is written in no training caption of data_root" in result.stderr
    assert "Traceback" not in result.stderr
    word = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *FAST,
                      "--embedding_token", "circle", "--embedding_vectors", "3", "--dry_run"], cwd=tmp_path)
    assert word.returncode == 2 and "'circle' is a word the tokenizer already has" in word.stderr, word.stderr
