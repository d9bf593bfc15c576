"""The speed paths train what the plain path trains: fused AdamW, channels_last, regional torch.compile, the
text-embedding cache; a step never reads the device back; the threads' wait policy is set before torch loads.

Each comparison is two real in-process `train()` runs on the tiny model (64 px, a few steps) from the same seed,
one with the option and one without, compared loss by loss; the saved model is read back from its files.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer.run.guard
import trainer.run.loop
from data.dataset import build_training_data
from data.options import DataOptions
from tests.conftest import REPO_ROOT, run_train
from trainer.config.schema import TrainConfig
from trainer.models.load import load_models
from trainer.preflight.checks import run_preflight
from trainer.preflight.device import for_this_machine
from trainer.run.loop import train


@dataclasses.dataclass
class Trained:
    losses: list[float]  # each micro-batch's loss, in order
    saved: Path  # the final save's folder
    unet: torch.nn.Module  # the trained UNet, as it is in memory at the end
    encoded_rows: int  # rows the text encoder was run on


def run_steps(model: Path, data_root: Path, work: Path, monkeypatch, steps: int = 4, record: bool = True,
              **settings) -> Trained:
    """A real `train()` of `steps` steps, batch 2 at 64 px, defaults resolved for this machine as train.py does;
    `record`: each loss is read back (with .item()) and kept."""
    cfg = for_this_machine(dataclasses.replace(
        TrainConfig(), resume_ckpt=str(model), data_root=str(data_root), resolution=64, batch_size=2,
        max_steps=steps, max_epochs=100, lr=1e-3, logdir=str(work / "logs"), latent_cache_dir=str(work.parent / "cache"),
        save_single_file=False, save_full_precision=True, **settings))
    run_dir = work / "run"
    preflight = run_preflight(cfg, run_dir)
    models = load_models(str(model))
    data = build_training_data(DataOptions.from_config(cfg), models.tokenizer, models.vae,
                               cache_dir=preflight.cache_dir, scan=preflight.scan, held_out=preflight.validation)
    losses: list[float] = []
    rows = [0]
    models.text_encoder.register_forward_pre_hook(lambda module, args: rows.__setitem__(0, rows[0] + len(args[0])))
    real_loss = trainer.run.loop.compute_loss

    def recorded(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(trainer.run.loop, "compute_loss", recorded if record else real_loss)
    run_dir.mkdir(parents=True)
    result = train(cfg, models, data, run_dir, preflight, "no")
    monkeypatch.setattr(trainer.run.loop, "compute_loss", real_loss)
    assert result.global_step == steps
    return Trained(losses, result.final_save, models.unet, rows[0])


def assert_saved_as_trained(trained: Trained) -> None:
    """The save's UNet loads as a plain diffusers model and holds exactly the trained weights."""
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(trained.saved / "unet")
    memory = trained.unet.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.is_contiguous(), key
        assert torch.equal(value, memory[key].detach().cpu()), key


# ---------------------------------------------------------------- fused AdamW


def test_fused_adamw_is_built_where_torch_has_it_and_steps_the_same(monkeypatch):
    from trainer.optim.build import build_optimizer
    from trainer.optim.plan import plan_optimizers

    torch.manual_seed(0)
    modules = [torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)]  # a UNet and a text encoder
    twins = copy.deepcopy(modules)
    plan = plan_optimizers(dataclasses.replace(TrainConfig(), lr=1e-2))
    fused = build_optimizer(plan, *modules, torch.device("cpu"))
    assert fused.defaults["fused"] is True  # torch >= 2.4 has fused AdamW on CPUs
    assert build_optimizer(plan, *modules, torch.device("meta")).defaults["fused"] is None  # no such kernel there
    monkeypatch.setattr("trainer.optim.build.fused_kernels_fit", lambda groups, device: False)
    plain = build_optimizer(plan, *twins, torch.device("cpu"))
    assert not plain.defaults["fused"]
    params = [p for module in modules for p in module.parameters()]
    twin_params = [p for module in twins for p in module.parameters()]
    start = [param.detach().clone() for param in params]
    for _ in range(50):
        for param, twin in zip(params, twin_params):
            param.grad = torch.randn_like(param)
            twin.grad = param.grad.clone()
        fused.step()
        plain.step()
    moved = min((param - before).abs().max().item() for param, before in zip(params, start))
    assert moved > 0.1  # every tensor really moved, so agreeing below means something
    for param, twin in zip(params, twin_params):
        torch.testing.assert_close(param, twin, rtol=0, atol=1e-6)


@pytest.mark.slow  # whole in-process runs: seconds to tens of seconds on a CPU
def test_fused_and_unfused_adamw_train_the_same(tiny_model, shapes_dir: Path, tmp_path: Path, monkeypatch):
    fused = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "fused", monkeypatch)
    monkeypatch.setattr("trainer.optim.build.fused_kernels_fit", lambda groups, device: False)
    plain = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "plain", monkeypatch)
    assert len(fused.losses) == 4
    torch.testing.assert_close(fused.losses, plain.losses, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- no host sync in a step

READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.slow  # whole in-process runs: seconds to tens of seconds on a CPU
def test_a_step_never_reads_the_device(tiny_model, shapes_dir: Path, tmp_path: Path, monkeypatch):
    """Between log steps, the step (forward, backward, clip, optimizer and schedule, the guard, EMA) reads no tensor
    back to the host: on a GPU each such read waits for every kernel queued before it."""
    from diffusers.training_utils import EMAModel

    counting, reads = [False], []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def read(self, *args, __real=real, __name=name, **kwargs):
            if counting[0]:
                reads.append(__name)
            return __real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    def counted(real, counts):
        def call(*args):
            counting[0] = counts(*args)
            try:
                return real(*args)
            finally:
                counting[0] = False
        return call

    steps = 6  # with log_step 100, only the last is a log step (it reads the loss and checks the weights)
    monkeypatch.setattr(trainer.run.loop, "micro_step",
                        counted(trainer.run.loop.micro_step, lambda run, batch, number: number < steps))
    monkeypatch.setattr(trainer.run.guard.WeightGuard, "after_step",
                        counted(trainer.run.guard.WeightGuard.after_step, lambda guard, number: number < steps))
    ema_steps = []  # after each optimizer step, the UNet's EMA and the text encoder's
    monkeypatch.setattr(EMAModel, "step", counted(EMAModel.step, lambda ema, params: ema_steps.append(params)
                                                  or len(ema_steps) <= 2 * (steps - 1)))
    run_steps(tiny_model("sd1"), shapes_dir, tmp_path, monkeypatch, steps=steps, record=False, log_step=100,
              clip_grad_norm=1.0, ema_decay_rate=0.9)
    assert len(ema_steps) == 2 * steps  # the EMAs stepped (and were watched) after every optimizer step
    assert reads == []


# ---------------------------------------------------------------- channels_last and regional compilation


@pytest.mark.slow  # whole in-process runs: seconds to tens of seconds on a CPU
def test_channels_last_trains_the_same_and_saves_plain_weights(tiny_model, shapes_dir: Path, tmp_path: Path,
                                                               monkeypatch):
    last = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "last", monkeypatch, channels_last=True)
    conv = last.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "plain", monkeypatch, channels_last=False)
    torch.testing.assert_close(last.losses, plain.losses, rtol=1e-4, atol=0)
    assert_saved_as_trained(last)


@pytest.mark.slow
def test_regional_compile_trains_the_same_and_saves_plain_weights(tiny_model, shapes_dir: Path, tmp_path: Path,
                                                                  monkeypatch):
    compiled = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "compiled", monkeypatch, torch_compile=True)
    blocks = [m for m in compiled.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)  # each block, not the whole UNet
    assert compiled.unet._compiled_call_impl is None
    plain = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "plain", monkeypatch, torch_compile=False)
    torch.testing.assert_close(compiled.losses, plain.losses, rtol=1e-4, atol=0)
    assert_saved_as_trained(compiled)
    saved = load_file(compiled.saved / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("_orig_mod" in key for key in saved)


# ---------------------------------------------------------------- the text-embedding cache


@pytest.mark.slow  # whole in-process runs: seconds to tens of seconds on a CPU
def test_text_cache_trains_the_same_and_encodes_each_caption_once(tiny_model, shapes_dir: Path, tmp_path: Path,
                                                                  monkeypatch):
    """Two epochs with a frozen text encoder, caption dropout (the empty caption is a third caption) and
    embedding perturbation (drawn fresh each step, after the cache)."""
    settings = {"disable_textenc_training": True, "cond_dropout": 0.2, "embedding_perturbation": 0.1, "steps": 16}
    cached = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "cached", monkeypatch, **settings)
    plain = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "plain", monkeypatch, text_embedding_cache=False,
                      **settings)
    torch.testing.assert_close(cached.losses, plain.losses, rtol=1e-6, atol=0)
    assert plain.encoded_rows == 32  # every row of every step
    assert cached.encoded_rows == 3  # "a photo of a red circle, ...", "a drawing of a blue square, ...", ""


def test_text_cache_is_used_only_when_it_can_save_work():
    from trainer.run.setup import text_embedding_cache

    frozen = dataclasses.replace(TrainConfig(), disable_textenc_training=True)
    encoder = torch.nn.Identity()
    assert text_embedding_cache(frozen, encoder) is not None
    assert text_embedding_cache(dataclasses.replace(frozen, text_embedding_cache=False), encoder) is None
    assert text_embedding_cache(dataclasses.replace(frozen, shuffle_tags=True), encoder) is None
    assert text_embedding_cache(dataclasses.replace(frozen, disable_textenc_training=False), encoder) is None


def test_text_cache_stops_growing_at_its_ceiling_and_still_answers():
    from trainer.objective.text_cache import TextEmbeddingCache

    class Encoder(torch.nn.Module):
        def forward(self, input_ids):
            return (input_ids[..., None].float() * torch.ones(4),)

    cache = TextEmbeddingCache(Encoder(), clip_skip=0, max_bytes=2 * 3 * 4 * 4)  # room for two rows
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [7, 8, 9]])
    keys = [row.numpy().tobytes() for row in ids]
    states = cache(ids, keys)
    torch.testing.assert_close(states, Encoder()(ids)[0], rtol=0, atol=0)
    assert len(cache.entries) == 2 and cache.full and "full" in cache.describe()
    torch.testing.assert_close(cache(ids, keys), states, rtol=0, atol=0)


# ---------------------------------------------------------------- precision and threads


def test_training_precision_takes_concrete_values_only():
    from trainer.models.precision import training_precision

    assert training_precision("bf16") == "bf16" and training_precision("no") == "no"
    with pytest.raises(ValueError, match="resolve the config for the device"):
        training_precision("auto")


def test_thread_wait_policy_is_set_before_anything_imports_torch():
    """train.py's first statements after `import os` set OMP_WAIT_POLICY (a user's value wins): OpenMP reads it
    once, when torch loads its runtime, so every import before it must be one that cannot load torch."""
    tree = ast.parse((REPO_ROOT / "train.py").read_text(encoding="utf-8"))
    before = []
    for node in tree.body[1:]:  # past the docstring
        if isinstance(node, ast.Expr | ast.Assign) and "setdefault" in ast.unparse(node):
            assert ast.unparse(node) == "os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')"
            break
        if isinstance(node, ast.Import | ast.ImportFrom):
            before.append(ast.unparse(node))
    else:
        raise AssertionError("train.py never sets OMP_WAIT_POLICY")
    assert before == ["from __future__ import annotations", "import os"]


@pytest.mark.slow
@pytest.mark.parametrize("environment", [None, "ACTIVE"])
def test_train_says_the_thread_wait_policy(environment: str | None, tiny_model, shapes_dir: Path, tmp_path: Path,
                                           monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    result = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--dry_run"],
                       cwd=tmp_path, env={"OMP_WAIT_POLICY": environment} if environment else None)
    assert result.returncode == 0, result.stderr[-3000:]
    if environment:
        assert "Threads: OMP_WAIT_POLICY ACTIVE, as set in the environment." in result.stdout
    else:
        assert "Threads: OMP_WAIT_POLICY PASSIVE: idle OpenMP threads sleep rather than spin" in result.stdout


# ---------------------------------------------------------------- deterministic


@pytest.fixture
def global_kernel_settings(monkeypatch):
    """torch's process-wide kernel choices, put back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    attention = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                 torch.backends.cuda.cudnn_sdp_enabled())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved[2:]
    for enable, was in zip((torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                            torch.backends.cuda.enable_cudnn_sdp), attention, strict=True):
        enable(was)


def test_deterministic_chooses_ordered_kernels_and_keeps_cudnns_autotuner_off(global_kernel_settings):
    import os

    from trainer.run.repeatable import use_deterministic_kernels
    from trainer.run.setup import speed_paths

    cuda = torch.device("cuda")  # speed_paths only sets torch's CUDA flags: no GPU needed to read its choice
    unet = torch.nn.Linear(2, 2)
    speed_paths(TrainConfig(channels_last=False), unet, cuda)
    assert torch.backends.cudnn.benchmark  # the default: tuned once per bucket shape
    on_cpu = use_deterministic_kernels(cuda=False)
    assert torch.backends.cuda.flash_sdp_enabled() and "attention" not in on_cpu  # ordered on a CPU already
    said = use_deterministic_kernels(cuda=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in said
    # the fused attention kernels add up their backward with atomics, and warn_only leaves them so
    assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                or torch.backends.cuda.cudnn_sdp_enabled())
    assert "the plain attention kernel" in said
    taken = speed_paths(TrainConfig(channels_last=False, deterministic=True), unet, cuda)
    assert not torch.backends.cudnn.benchmark and taken == ["TF32 matmuls"]


@pytest.mark.slow
def test_a_deterministic_run_says_so_and_trains_on_a_cpu_bit_for_bit_as_without(tiny_model, shapes_dir: Path,
                                                                               tmp_path: Path):
    args = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--resolution", "64",
            "--batch_size", "2", "--max_steps", "3", "--save_full_precision", "true", "--save_single_file", "false",
            "--logdir", "logs"]
    saved = {}
    for deterministic in ("true", "false"):
        result = run_train([*args, "--run_name", deterministic, "--deterministic", deterministic], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("Deterministic: ordered kernels" in result.stdout) == (deterministic == "true")
        assert "does not have a deterministic implementation" not in result.stdout + result.stderr
        (save,) = (tmp_path / "logs" / deterministic / "ckpts").glob("last-*")
        saved[deterministic] = load_file(save / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved["true"].keys() == saved["false"].keys()
    assert all(torch.equal(saved["true"][key], saved["false"][key]) for key in saved["true"])


@pytest.mark.slow
def test_a_run_in_a_callers_process_is_freed_when_train_returns(tiny_model, shapes_dir: Path, tmp_path: Path,
                                                               monkeypatch):
    """A notebook or a benchmark calls train() and goes on: nothing of ours keeps the run (its models, optimizer and
    accelerator) alive after it returns, or their memory (gigabytes on a GPU) stays taken."""
    import gc
    import weakref

    trained = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "run", monkeypatch, steps=2, record=False,
                        ema_decay_rate=0.9)
    unet = weakref.ref(trained.unet)
    del trained
    gc.collect()
    assert unet() is None, [type(r).__name__ for r in gc.get_referrers(unet())]
