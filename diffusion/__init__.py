"""The training objectives: DDPM's Gaussian diffusion with learned variances (Ho et al. 2020; Nichol &
Dhariwal 2021), DiT's, and SiT's linear flow with velocity prediction (Ma et al. 2024, diffusion/flow.py).

    from diffusion import create_diffusion
    diffusion = create_diffusion(timestep_respacing="")     # training: all 1000 steps
    diffusion = create_diffusion(timestep_respacing="250")  # sampling: 250 evenly spaced steps

    from diffusion import create_objective
    objective = create_objective("flow", "logit-normal")    # what train.py trains with (--objective)
    t = objective.sample_time(n, device)
    loss = objective.training_losses(model, x, t, model_kwargs, noise)["loss"]

`create_diffusion` has the same signature, defaults and numbers as the published DiT code's.
"""
import enum

import torch

from . import gaussian_diffusion as gd
from .flow import FlowMatching, TimeSampling
from .respace import SpacedDiffusion, space_timesteps


class Objective(enum.Enum):
    """What a model is trained to predict, recorded in its checkpoints (train.py's --objective)."""

    DDPM = "ddpm"  # DiT's: the noise and the variance interpolation, 1000 discrete linear-schedule steps
    FLOW = "flow"  # SiT's: the velocity of the linear path from noise (t = 0) to data (t = 1)


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


class DDPMObjective:
    """DiT's training objective with the interface every objective has (see create_objective)."""

    def __init__(self):
        self.diffusion = create_diffusion(timestep_respacing="")

    def sample_time(self, n, device):
        """:return: [n] int64 timesteps, uniform over the 1000 steps (DiT's draw, from the global RNG)."""
        return torch.randint(0, self.diffusion.num_timesteps, (n,), device=device)

    def training_losses(self, model, x, t, model_kwargs=None, noise=None):
        """DiT's loss: the noise MSE plus the variational bound's term for the learned variance.
        :return: {"loss": [N] float32, ...} as GaussianDiffusion.training_losses."""
        return self.diffusion.training_losses(model, x, t, model_kwargs, noise=noise)

    def noise_quartile(self, t):
        """:return: [N] int64 in 0..3; 0: the quarter of steps with the least noise."""
        return (t * 4 // self.diffusion.num_timesteps).long()

    def config(self):
        """What a checkpoint records about the objective (plain data)."""
        return dict(objective=Objective.DDPM.value, diffusion_steps=self.diffusion.num_timesteps,
                    noise_schedule="linear", learn_sigma=True, time_sampling=TimeSampling.UNIFORM.value)


def create_objective(objective, time_sampling=TimeSampling.UNIFORM):
    """
    :param objective: an Objective or its value.
    :param time_sampling: a TimeSampling or its value: how training draws t (DDPM: uniform only).
    :return: an object with sample_time(n, device), training_losses(model, x, t, model_kwargs, noise),
             noise_quartile(t) and config().
    :raises ValueError: logit-normal time for DDPM, whose steps are discrete.
    """
    objective, time_sampling = Objective(objective), TimeSampling(time_sampling)
    if objective is Objective.FLOW:
        return FlowMatching(time_sampling)
    if time_sampling is not TimeSampling.UNIFORM:
        raise ValueError(f"--time-sampling {time_sampling.value} is for --objective flow; DDPM draws its 1000 "
                         f"discrete steps uniformly, as DiT")
    return DDPMObjective()
