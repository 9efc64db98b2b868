"""diffusion/: parity with the published DiT code and invariants of respacing and sampling."""
import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from diffusion.respace import space_timesteps

from conftest import toy


def test_training_losses_match_reference(golden):
    g = golden["training_losses"]
    out = create_diffusion(timestep_respacing="").training_losses(toy, g["x_start"], g["t"], {}, noise=g["noise"])
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(out[key], g[key], rtol=1e-5, atol=1e-6)


def test_respaced_p_mean_variance_matches_reference(golden):
    g = golden["p_mean_variance_respaced50"]
    out = create_diffusion("50").p_mean_variance(toy, g["x"], g["t"], clip_denoised=False)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        torch.testing.assert_close(out[key].expand_as(g[key]), g[key], rtol=1e-5, atol=1e-6)


def test_ddim_matches_reference(golden):
    g = golden["ddim25_eta0"]
    sample = create_diffusion("ddim25").ddim_sample_loop(toy, g["noise"].shape, noise=g["noise"], clip_denoised=False, eta=0.0)
    torch.testing.assert_close(sample, g["sample"], rtol=1e-5, atol=1e-4)


def test_timestep_maps_match_reference(golden):
    assert create_diffusion("ddim25").timestep_map == golden["timestep_map_ddim25"].tolist()
    assert create_diffusion("50").timestep_map == golden["timestep_map_50"].tolist()


def test_defaults_are_dits():
    d = create_diffusion("")
    assert d.num_timesteps == 1000
    np.testing.assert_allclose(d.betas[[0, -1]], [1e-4, 0.02])
    assert create_diffusion("250").num_timesteps == 250
    assert create_diffusion("ddim50").timestep_map == list(range(0, 1000, 20))


def test_respacing_all_steps_is_the_identity():
    base = create_diffusion(None)
    full = create_diffusion("1000")
    assert full.timestep_map == list(range(1000))
    np.testing.assert_allclose(full.betas, base.betas, rtol=1e-12)
    np.testing.assert_allclose(full.alphas_cumprod, base.alphas_cumprod, rtol=1e-12)


def test_respaced_steps_keep_the_base_alphas_cumprod():
    base = create_diffusion("")
    for spacing in ("250", "ddim25", "10,20,5"):
        spaced = create_diffusion(spacing)
        np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-10)
    assert len(space_timesteps(1000, "10,20,5")) == 35


def test_bad_respacing_is_a_clear_error():
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim300")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "20")
    with pytest.raises(ValueError, match="unknown beta schedule"):
        create_diffusion("", noise_schedule="quadratic")


def test_q_sample_marginals():
    d = create_diffusion("")
    x0 = torch.full((20000, 1), 0.5)
    t = torch.full((20000,), 999)
    xt = d.q_sample(x0, t)
    mean, var, _ = d.q_mean_variance(x0, t)
    assert abs(xt.mean() - mean.mean()) < 0.02
    assert abs(xt.var() - var.mean()) < 0.03


@pytest.mark.parametrize("kwargs", [dict(noise_schedule="cosine"), dict(learn_sigma=False), dict(learn_sigma=False, sigma_small=True),
                                    dict(use_kl=True), dict(rescale_learned_sigmas=True), dict(predict_xstart=True)])
def test_every_configuration_trains_and_samples(kwargs):
    d = create_diffusion("", **kwargs)
    model = toy if kwargs.get("learn_sigma", True) else (lambda x, t, **kw: torch.sin(x))
    x0 = torch.rand(4, 2, 4, 4) * 2 - 1
    losses = d.training_losses(model, x0, torch.tensor([0, 1, 500, 999]))
    assert losses["loss"].shape == (4,) and torch.isfinite(losses["loss"]).all()
    sample = create_diffusion("10", **kwargs).p_sample_loop(model, (2, 2, 4, 4), noise=torch.randn(2, 2, 4, 4))
    assert sample.shape == (2, 2, 4, 4) and torch.isfinite(sample).all()


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not():
    d = create_diffusion("ddim10")
    noise = torch.randn(2, 3, 4, 4)
    a = d.ddim_sample_loop(toy, noise.shape, noise=noise, eta=0.0)
    b = d.ddim_sample_loop(toy, noise.shape, noise=noise, eta=0.0)
    assert torch.equal(a, b)
    c = d.ddim_sample_loop(toy, noise.shape, noise=noise, eta=1.0)
    assert not torch.allclose(a, c)


def test_sampling_keeps_the_models_dtype():
    def bf16_model(x, t, **kwargs):
        assert x.dtype == torch.bfloat16
        return toy(x, t).to(torch.bfloat16)

    d = create_diffusion("5")
    noise = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    out = d.p_sample_loop(bf16_model, noise.shape, noise=noise)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out = d.ddim_sample_loop(bf16_model, noise.shape, noise=noise)
    assert out.dtype == torch.bfloat16


def test_model_is_called_with_original_timesteps():
    seen = []

    def spy(x, t, **kwargs):
        seen.append(t.tolist())
        return toy(x, t)

    d = create_diffusion("ddim4")
    d.ddim_sample_loop(spy, (1, 1, 2, 2), noise=torch.randn(1, 1, 2, 2))
    assert seen == [[750], [500], [250], [0]]
