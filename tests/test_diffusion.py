"""diffusion/: parity with the published DiT code and invariants of respacing and sampling."""
import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from diffusion import gaussian_diffusion as gd
from diffusion.dpm_solver import DPMSolver, Spacing, solver_timesteps
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
    sample = create_diffusion("ddim25").ddim_sample_loop(toy, g["noise"].shape, noise=g["noise"], clip_denoised=False,
                                                         eta=0.0)
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


def point_oracle(kwargs, x0, v=-1.0):
    """
    The exact model for data that is the single point x0: its x_0 prediction is x0 at every step.

    :param kwargs: create_diffusion's arguments: the schedule and what the model outputs (eps or x_0,
                   and learned-variance channels).
    :param v: the learned-variance channels, in [-1, 1] (-1 is the posterior variance).
    """
    diffusion = create_diffusion("", **kwargs)  # respaced processes call the model with these timesteps
    learned = diffusion.model_var_type in (gd.ModelVarType.LEARNED, gd.ModelVarType.LEARNED_RANGE)
    ac = torch.from_numpy(diffusion.alphas_cumprod).float()

    def model(x, t, **kwargs):
        a = ac[t].view(-1, 1, 1, 1)
        out = x0.expand_as(x) if diffusion.model_mean_type is gd.ModelMeanType.START_X \
            else (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([out, torch.full_like(out, v)], dim=1) if learned else out
    return model


CONFIGURATIONS = [dict(), dict(noise_schedule="cosine"), dict(learn_sigma=False),
                  dict(learn_sigma=False, sigma_small=True), dict(use_kl=True), dict(rescale_learned_sigmas=True),
                  dict(predict_xstart=True)]


@pytest.mark.parametrize("kwargs", CONFIGURATIONS)
def test_every_configuration_has_zero_loss_and_returns_the_point_for_the_exact_model(kwargs):
    """For data that is one point, the exact model has zero loss (away from t = 0, where the learned
    variance's bound has the decoder's likelihood term) and every sampler returns that point: a wrong
    coefficient in the loss, the posterior or a sampler shows up here."""
    x0 = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    d = create_diffusion("", **kwargs)
    t = torch.tensor([1, 500, 999])
    losses = d.training_losses(point_oracle(kwargs, x0), x0, t)
    # The KL loss is the bound (in bits) times T = 1000, which scales float32 rounding to 2e-4.
    torch.testing.assert_close(losses["loss"], torch.zeros(3), atol=1e-3, rtol=0)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    model = point_oracle(kwargs, x0)
    # float32: the last x_0 estimate divides by sqrt(1 - alphas_cumprod[0]) = 0.01, so rounding shows at 1e-4.
    for spaced in (create_diffusion("10", **kwargs), create_diffusion("ddim10", **kwargs)):
        torch.testing.assert_close(spaced.p_sample_loop(model, x0.shape, noise=noise), x0, atol=2e-4, rtol=0)
        torch.testing.assert_close(spaced.ddim_sample_loop(model, x0.shape, noise=noise), x0, atol=2e-4, rtol=0)


def test_configurations_choose_their_variances_and_loss_terms():
    """What each flag of create_diffusion changes, against the formulas it stands for."""
    t = torch.tensor([0, 1, 400, 999])
    x0 = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    base = create_diffusion("")

    # cosine: alphas_cumprod follows the closed form f(t + 1) / f(0) until betas are capped at 0.999.
    f = lambda s: np.cos((s / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    cosine = create_diffusion("", noise_schedule="cosine")
    np.testing.assert_allclose(cosine.alphas_cumprod[:990], f(np.arange(1, 991)) / f(0), rtol=1e-9)

    # Fixed variances: beta_t ("large", DDPM's; posterior variance at t = 0) or the posterior variance.
    eps_model = lambda x, t, **kw: torch.sin(x)
    large = create_diffusion("", learn_sigma=False).p_mean_variance(eps_model, x, t)["variance"][:, 0, 0, 0]
    small = create_diffusion("", learn_sigma=False, sigma_small=True).p_mean_variance(eps_model, x, t)["variance"]
    beta = torch.tensor(base.betas[t]).float()
    post = torch.tensor(base.posterior_variance[[1, 1, 400, 999]]).float()  # clipped: t = 0 takes t = 1's
    torch.testing.assert_close(large, torch.cat([post[:1], beta[1:]]))
    torch.testing.assert_close(small[:, 0, 0, 0], torch.tensor(base.posterior_variance[t]).float())
    # Learned range: v = 1 gives beta_t, v = -1 the (clipped) posterior variance, v = 0 their geometric mean.
    for v, expected in ((1.0, beta), (-1.0, post), (0.0, (beta * post).sqrt())):
        out = base.p_mean_variance(lambda x, t, **kw: torch.cat([torch.sin(x), torch.full_like(x, v)], 1), x, t)
        torch.testing.assert_close(out["variance"][:, 0, 0, 0], expected, rtol=1e-5, atol=0)

    # Loss terms: MSE + the bound; the KL loss is the same bound times T; rescaling scales it by T / 1000.
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x_t = base.q_sample(x0, t, noise=noise)
    mse = base.training_losses(toy, x0, t, noise=noise)
    torch.testing.assert_close(mse["loss"], mse["mse"] + mse["vb"])
    torch.testing.assert_close(mse["mse"], ((noise - toy(x_t, t)[:, :2]) ** 2).mean(dim=(1, 2, 3)))
    kl = create_diffusion("", use_kl=True).training_losses(toy, x0, t, noise=noise)
    torch.testing.assert_close(kl["loss"], 1000 * mse["vb"])
    short = dict(diffusion_steps=250)
    t250 = t // 4
    mse250 = create_diffusion("", **short).training_losses(toy, x0, t250, noise=noise)
    rescaled = create_diffusion("", rescale_learned_sigmas=True, **short).training_losses(toy, x0, t250, noise=noise)
    torch.testing.assert_close(rescaled["loss"], mse250["mse"] + 0.25 * mse250["vb"])
    # x_0 prediction: the MSE is against the data, not the noise.
    xstart = create_diffusion("", predict_xstart=True).training_losses(toy, x0, t, noise=noise)
    torch.testing.assert_close(xstart["mse"], ((x0 - toy(x_t, t)[:, :2]) ** 2).mean(dim=(1, 2, 3)))


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


#################################################################################
#            The rest of the reference's sampling API (DiT's signatures)          #
#################################################################################


def test_progressive_loops_yield_every_step_and_end_at_the_loops_result(golden):
    """The *_progressive loops (for watching a sample form) yield one dict per step; each step's sample
    is the next step's input, and the last is what the plain loops return (golden for DDIM)."""
    g = golden["ddim25_eta0"]
    d = create_diffusion("ddim25")
    steps = list(d.ddim_sample_loop_progressive(toy, g["noise"].shape, noise=g["noise"], clip_denoised=False))
    assert len(steps) == 25
    torch.testing.assert_close(steps[-1]["sample"], g["sample"], rtol=1e-5, atol=1e-4)
    t = torch.full((len(g["noise"]),), 10)  # steps[k] is the step from respaced index 24 - k
    again = d.ddim_sample(toy, steps[13]["sample"], t, clip_denoised=False)
    torch.testing.assert_close(again["sample"], steps[14]["sample"])
    torch.testing.assert_close(again["pred_xstart"], steps[14]["pred_xstart"])

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    d = create_diffusion("8")
    torch.manual_seed(1)
    steps = list(d.p_sample_loop_progressive(toy, noise.shape, noise=noise))
    torch.manual_seed(1)
    assert len(steps) == 8 and torch.equal(steps[-1]["sample"], d.p_sample_loop(toy, noise.shape, noise=noise))


def test_denoised_fn_acts_on_the_x0_prediction_before_clipping():
    d = create_diffusion("10")
    x = 3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([9, 2])
    plain = d.p_mean_variance(toy, x, t, clip_denoised=False)
    # Clamping in denoised_fn is what clip_denoised does.
    clamped = d.p_mean_variance(toy, x, t, clip_denoised=False, denoised_fn=lambda x0: x0.clamp(-1, 1))
    clipped = d.p_mean_variance(toy, x, t, clip_denoised=True)
    torch.testing.assert_close(clamped["mean"], clipped["mean"])
    assert (plain["pred_xstart"].abs() > 1).any()  # so the comparison above can fail
    # It is applied before clipping, and the mean is the posterior's at the processed prediction.
    halved = d.p_mean_variance(toy, x, t, clip_denoised=True, denoised_fn=lambda x0: x0 / 2)
    torch.testing.assert_close(halved["pred_xstart"], (plain["pred_xstart"] / 2).clamp(-1, 1))
    mean, _, _ = d.q_posterior_mean_variance(halved["pred_xstart"], x, t)
    torch.testing.assert_close(halved["mean"], mean)
    # The loops pass it through: an x_0 prediction forced to zero leads DDIM to zero.
    zero = d.ddim_sample_loop(toy, x.shape, noise=x, denoised_fn=torch.zeros_like)
    assert torch.equal(zero, torch.zeros_like(x))


def test_cond_fn_shifts_the_mean_and_the_score_as_classifier_guidance_does():
    """Classifier guidance (Dhariwal & Nichol 2021): ancestral steps move the mean by the variance
    times cond_fn's gradient (Algorithm 1); DDIM steps move eps by -sqrt(1 - alphas_cumprod) times it
    (Algorithm 2), which is sampling a model with that eps. Respaced processes pass cond_fn the
    original timesteps, as they do the model."""
    d = create_diffusion("ddim10")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([9, 3])
    seen = []

    def cond_fn(x, t, y=None):
        seen.append(t.tolist())
        return torch.cos(x) * (1 + y.view(-1, 1, 1, 1))  # any differentiable log p(y | x)'s gradient

    kwargs = dict(y=torch.tensor([0, 2]))
    torch.manual_seed(0)
    guided = d.p_sample(toy, x, t, cond_fn=cond_fn, model_kwargs=kwargs)["sample"]
    torch.manual_seed(0)
    plain = d.p_sample(toy, x, t, model_kwargs=kwargs)["sample"]
    variance = d.p_mean_variance(toy, x, t)["variance"]
    torch.testing.assert_close(guided - plain, variance * cond_fn(x, torch.tensor([900, 300]), **kwargs))
    assert seen[0] == [900, 300]

    ac = torch.from_numpy(create_diffusion("").alphas_cumprod).float()

    def shifted_eps(x, t, y=None):
        out = toy(x, t)
        eps = out[:, :3] - (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * cond_fn(x, t, y=y)
        return torch.cat([eps, out[:, 3:]], dim=1)

    a = d.ddim_sample_loop(toy, x.shape, noise=x, clip_denoised=False, cond_fn=cond_fn, model_kwargs=kwargs)
    b = d.ddim_sample_loop(shifted_eps, x.shape, noise=x, clip_denoised=False, model_kwargs=kwargs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, d.ddim_sample_loop(toy, x.shape, noise=x, clip_denoised=False))


def test_a_model_returning_extra_outputs_samples_as_the_plain_model():
    """Models that return (output, extra), e.g. REPA's with projected features, sample unchanged, and
    p_mean_variance hands the extra output back under "extra"."""
    d = create_diffusion("10")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([9, 0])
    features = torch.randn(2, 16, 8)
    out = d.p_mean_variance(lambda x, t: (toy(x, t), features), x, t)
    plain = d.p_mean_variance(toy, x, t)
    assert out["extra"] is features and plain["extra"] is None
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert torch.equal(out[key], plain[key])


#################################################################################
#                  DPM-Solver++ against diffusers' implementation                 #
#################################################################################


def diffusers_dpm_solver(**config):
    """diffusers' multistep DPM-Solver++ (2M, midpoint) for DiT's process, first order at the first
    and the last step as diffusion/dpm_solver.py is, stopping at t = 0 (sigma_min) as it does."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        final_sigmas_type="sigma_min", euler_at_final=True, **config)


def gaussian_eps(alphas_cumprod, std=0.5):
    """The exact noise prediction for data drawn per pixel from N(0, std^2), at fractional timesteps
    (samples stay of unit scale, so float32 differences stay visible)."""
    log_ac = np.log(alphas_cumprod)

    def model(x, t, **kwargs):
        a2 = torch.from_numpy(np.exp(np.interp(t.double().numpy(), np.arange(len(log_ac)), log_ac)))
        a2 = a2.view(-1, 1, 1, 1).to(x.dtype)
        eps = (1 - a2).sqrt() * x / (a2 * std ** 2 + 1 - a2)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)
    return model


def test_logsnr_grid_is_uniform_in_log_snr_and_is_diffusers_lu_grid():
    """diffusers' use_lu_lambdas grid (the DPM-Solver paper's) holds the same points, with one more
    at its end: it evaluates the model a last time at t = 0 for a step of length zero."""
    scheduler = diffusers_dpm_solver(use_lu_lambdas=True)
    ac = scheduler.alphas_cumprod.double().numpy()  # diffusers' float32 schedule, so only the grid differs
    for steps in (10, 20):
        grid = solver_timesteps(ac, steps, Spacing.LOGSNR)
        solver = DPMSolver(ac, grid)
        np.testing.assert_allclose(np.diff(solver.lam), (solver.lam[-1] - solver.lam[0]) / steps, rtol=1e-9)
        scheduler.set_timesteps(steps + 1)
        np.testing.assert_allclose(scheduler.sigmas[:steps + 1].double().numpy(), solver.sigma / solver.alpha,
                                   rtol=3e-7)
        assert scheduler.timesteps.tolist() == np.round(grid).tolist()  # the times it reports are rounded


@pytest.mark.parametrize("steps", [9, 27])
def test_time_uniform_grid_is_diffusers_linspace_grid(steps):
    """diffusers rounds its time grid to integer timesteps: the grids are the same when steps divides 999."""
    scheduler = diffusers_dpm_solver(timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    ac = scheduler.alphas_cumprod.double().numpy()
    assert solver_timesteps(ac, steps, Spacing.TIME).tolist() == scheduler.timesteps.tolist() + [0]


@pytest.mark.parametrize("spacing", list(Spacing))
@pytest.mark.parametrize("steps", [10, 20])
def test_solver_steps_equal_diffusers_on_the_same_grid(spacing, steps):
    """Given our grid (its sigmas; the model evaluated at our times), diffusers' steps give the same
    samples up to its float32 arithmetic."""
    scheduler = diffusers_dpm_solver()
    ac = scheduler.alphas_cumprod.double().numpy()
    model = gaussian_eps(ac)
    grid = solver_timesteps(ac, steps, spacing)
    solver = DPMSolver(ac, grid)
    noise = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    ours = solver.sample(model, noise)

    scheduler.set_timesteps(timesteps=list(range(steps, 0, -1)))  # step labels; the grid is set next
    scheduler.sigmas = torch.from_numpy(solver.sigma / solver.alpha).float()  # diffusers' sigma: sigma / alpha
    x = noise
    for i, label in enumerate(scheduler.timesteps):
        eps = model(x, torch.full((len(x),), grid[i]))[:, :3]
        x = scheduler.step(eps, label, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=3e-6)
    assert (ours - noise).abs().max() > 0.1  # the solver moved the samples
