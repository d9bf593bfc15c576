"""Each objective option against its formula, computed independently here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from trainer.models.load import load_models
from trainer.objective.loss import (
    Objective,
    compute_loss,
    elementwise_loss,
    encode_prompts,
    min_snr_weights,
    perturb_embeddings,
    signal_to_noise,
    training_target,
)
from trainer.objective.noise import offset_noise, pyramid_noise, sample_timesteps, zero_terminal_snr_schedulers

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(**SD_BETAS, prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target(prediction_type: str):
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    alpha_bar = scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(training_target(scheduler(prediction_type), latents, noise, t), expected)


def test_offset_noise_adds_one_constant_per_channel():
    base = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    noise = offset_noise(torch.Size((2, 4, 8, 8)), 0.1, gen)
    gen2 = torch.Generator().manual_seed(0)
    expected = torch.randn((2, 4, 8, 8), generator=gen2)
    expected = expected + 0.1 * torch.randn((2, 4, 1, 1), generator=gen2)
    torch.testing.assert_close(noise, expected)
    assert torch.equal(offset_noise(torch.Size((2, 4, 8, 8)), 0.0, torch.Generator().manual_seed(0)), base)


def test_pyramid_noise_formula_and_unit_variance():
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    out = pyramid_noise(noise, 0.8, gen)
    gen2 = torch.Generator().manual_seed(2)
    expected = noise.clone()
    for i, size in enumerate([8, 4, 2, 1], start=1):
        expected += F.interpolate(torch.randn((1, 4, size, size), generator=gen2), size=(16, 16), mode="bilinear") * 0.8**i
    torch.testing.assert_close(out, expected / expected.std())
    assert abs(out.std().item() - 1.0) < 1e-5


def test_timesteps_stay_in_range():
    t = sample_timesteps(4096, 200, 300, torch.Generator().manual_seed(0))
    assert t.min() >= 200 and t.max() < 300 and len(t.unique()) == 100


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type: str):
    t = torch.tensor([0, 100, 500, 999])
    snr = signal_to_noise(scheduler(), t)
    alpha_bar = scheduler().alphas_cumprod[t]
    torch.testing.assert_close(snr, alpha_bar / (1 - alpha_bar))
    weights = min_snr_weights(snr, 5.0, prediction_type)
    expected = [min(s, 5.0) / (s + 1 if prediction_type == "v_prediction" else s) for s in snr.tolist()]
    torch.testing.assert_close(weights, torch.tensor(expected))
    assert weights[0] < 1 and weights[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))
    # at SNR 0 (zero terminal SNR) the weights stay finite
    assert torch.isfinite(min_snr_weights(torch.tensor([0.0, 1.0]), 5.0, prediction_type)).all()


def test_loss_types():
    pred, target = torch.tensor([0.0, 0.05, 3.0]), torch.zeros(3)
    c = 0.1
    torch.testing.assert_close(elementwise_loss(pred, target, "mse", c), pred**2)
    huber = elementwise_loss(pred, target, "huber", c)
    torch.testing.assert_close(huber, 2 * c * (torch.sqrt(pred**2 + c**2) - c))
    torch.testing.assert_close(elementwise_loss(pred, target, "smooth_l1", c), huber / c)
    assert huber[2] == pytest.approx(2 * c * 3.0, rel=0.05)  # linear for large errors
    assert huber[1] == pytest.approx(0.05**2, rel=0.1)  # quadratic for small ones


def test_everydream2_blends_of_mse_and_huber_by_noise_level():
    """mse_huber: all MSE at t/T 1, all Huber (delta 1) at 0, halfway between at 0.5; huber_mse the reverse."""
    pred, target = torch.tensor([[0.5, 3.0]] * 3), torch.zeros(3, 2)
    mse, huber = pred**2, torch.where(pred.abs() < 1, 0.5 * pred**2, pred.abs() - 0.5)
    level = torch.tensor([1.0, 0.0, 0.5])
    blend = elementwise_loss(pred, target, "mse_huber", 0.1, level)
    torch.testing.assert_close(blend, torch.stack([mse[0], huber[1], (mse[2] + huber[2]) / 2]))
    reverse = elementwise_loss(pred, target, "huber_mse", 0.1, level)
    torch.testing.assert_close(reverse, torch.stack([huber[0], mse[1], (mse[2] + huber[2]) / 2]))


def test_clip_skip_and_embedding_perturbation(tiny_model):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(tiny_model("sd1"), subfolder="text_encoder")
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        assert torch.equal(encode_prompts(te, ids, 0), out.last_hidden_state)
        assert torch.equal(encode_prompts(te, ids, 1), out.last_hidden_state)
        penultimate = te.final_layer_norm(out.hidden_states[-2])
        torch.testing.assert_close(encode_prompts(te, ids, 2), penultimate)
    states = torch.zeros(1, 77, 64)
    assert perturb_embeddings(states, 0.0, None) is states
    perturbed = perturb_embeddings(states, 0.5, torch.Generator().manual_seed(0))
    assert abs(perturbed.std().item() - 0.5) < 0.02


def test_zero_terminal_snr_schedulers():
    training, sampling = zero_terminal_snr_schedulers(scheduler("v_prediction"), PNDMScheduler(**SD_BETAS))
    assert training.alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-12)
    assert isinstance(sampling, DDIMScheduler) and sampling.config.timestep_spacing == "trailing"
    assert sampling.alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-12)
    assert training.config.prediction_type == "v_prediction"


def test_compute_loss_options_are_deterministic_and_weighted(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model("sd1"), subfolder="unet")
    latents, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)

    def loss(objective: Objective, sched=scheduler()) -> float:
        with torch.no_grad():
            return compute_loss(unet, sched, latents, states, torch.Generator().manual_seed(3), objective).item()

    plain = loss(Objective())
    assert plain == loss(Objective()) and plain > 0
    # only the late, low-SNR timesteps: min-SNR weights ~1 there for epsilon, so the loss barely changes
    late = Objective(timestep_start=900, timestep_end=1000)
    assert loss(Objective(timestep_start=900, timestep_end=1000, min_snr_gamma=5.0)) == pytest.approx(loss(late), rel=1e-4)
    # early, high-SNR timesteps get weight gamma/SNR < 1
    early = Objective(timestep_start=0, timestep_end=50)
    assert loss(Objective(timestep_start=0, timestep_end=50, min_snr_gamma=5.0)) < loss(early)
    for option in (Objective(loss_type="huber"), Objective(zero_frequency_noise_ratio=0.1),
                   Objective(pyramid_noise_discount=0.8), Objective(embedding_perturbation=0.1)):
        assert loss(option) != plain


def test_loss_weight_zero_rows_count_for_nothing(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model("sd1"), subfolder="unet")
    latents, states = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 64)
    with torch.no_grad():
        full = compute_loss(unet, scheduler(), latents, states, torch.Generator().manual_seed(5), Objective(),
                            torch.ones(4)).item()
        weighted = compute_loss(unet, scheduler(), latents, states, torch.Generator().manual_seed(5), Objective(),
                                torch.tensor([1.0, 1.0, 1.0, 0.0])).item()
        per_row = [compute_loss(unet, scheduler(), latents, states, torch.Generator().manual_seed(5), Objective(),
                                torch.eye(4)[i]).item() * 4 for i in range(4)]
    assert full == pytest.approx(sum(per_row) / 4, rel=1e-5)
    assert weighted == pytest.approx(sum(per_row[:3]) / 4, rel=1e-5)


def test_validation_loss_is_the_same_for_the_same_weights(tiny_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from trainer.objective.loss import validation_loss

    unet = UNet2DConditionModel.from_pretrained(tiny_model("sd1"), subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model("sd1"), subfolder="text_encoder")
    batches = [{"latents": torch.randn(2, 4, 8, 8), "input_ids": torch.full((2, 77), 49407)}]
    first = validation_loss(unet, text_encoder, scheduler(), batches, torch.device("cpu"))
    assert first == validation_loss(unet, text_encoder, scheduler(), batches, torch.device("cpu"))
    with torch.no_grad():
        unet.conv_out.bias += 0.5  # other weights, other loss
    assert validation_loss(unet, text_encoder, scheduler(), batches, torch.device("cpu")) > first


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_formula(prediction_type: str):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    target = training_target(scheduler, latents, noise, t)
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(target, expected)


@pytest.mark.slow
def test_model_bundle_describes_each_family_and_loss_is_deterministic(tiny_model):
    for family, expected in [("sd1", ("sd1", "epsilon", False)), ("sd2-v", ("sd2", "v_prediction", True))]:
        models = load_models(str(tiny_model(family)))
        info = models.info
        assert (info.family, info.prediction_type, info.upcast_attention) == expected
        assert info.native_resolution == 64
        assert models.noise_scheduler.config.prediction_type == expected[1]
        latents, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
        losses = [compute_loss(models.unet, models.noise_scheduler, latents, states, torch.Generator().manual_seed(1))
                  for _ in range(2)]
        assert losses[0].item() == losses[1].item() and losses[0].item() > 0
