"""The Gaussian diffusion of DDPM with learned variances (Ho et al. 2020; Nichol & Dhariwal 2021).

    from diffusion import create_diffusion
    diffusion = create_diffusion(timestep_respacing="")     # training: all 1000 steps
    diffusion = create_diffusion(timestep_respacing="250")  # sampling: 250 evenly spaced steps

Same signature, defaults and numbers as the published DiT code's `create_diffusion`.
"""
from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """
    :param timestep_respacing: which steps to sample with: "" or None for all, "250", "ddim50",
        or comma-separated section counts (see `space_timesteps`).
    :param noise_schedule: "linear" (DDPM's, DiT's) or "cosine" (Nichol & Dhariwal).
    :param use_kl: train on the rescaled variational bound instead of the MSE.
    :param sigma_small: with fixed variances, use the posterior variance rather than beta_t.
    :param predict_xstart: the model predicts x_0 instead of the noise.
    :param learn_sigma: the model also outputs the variance interpolation (DiT: True).
    :param rescale_learned_sigmas: scale the variational term by num_timesteps / 1000.
    :param diffusion_steps: length of the trained process.
    :return: a SpacedDiffusion.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        model_var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )
