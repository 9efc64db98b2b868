"""Gaussian diffusion: forward process, training losses, ancestral (DDPM) and DDIM sampling.

Notation follows Ho et al. 2020: alpha_t = 1 - beta_t, alphas_cumprod[t] = prod_{s<=t} alpha_s,
q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I). Learned variances
interpolate, in the log domain, between beta_t and the posterior variance (Nichol & Dhariwal 2021).
Schedules are computed in float64 with numpy; every per-step coefficient is cast to the dtype of
the tensor it multiplies, so sampling runs in whatever device and dtype the model runs in.
"""
import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import discretized_gaussian_log_likelihood, normal_kl


def mean_flat(tensor):
    """The mean over all non-batch dimensions: [N x ...] -> [N]."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


class ModelMeanType(enum.Enum):
    """What the model predicts."""

    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    LEARNED = enum.auto()        # the model outputs log sigma^2
    FIXED_SMALL = enum.auto()    # the posterior variance beta~_t
    FIXED_LARGE = enum.auto()    # beta_t (beta~_1 at t = 0, for a sensible decoder likelihood)
    LEARNED_RANGE = enum.auto()  # the model outputs v in [-1, 1], interpolating the two above


class LossType(enum.Enum):
    MSE = enum.auto()           # noise MSE (+ the variational bound when variances are learned)
    RESCALED_MSE = enum.auto()  # as MSE, the bound term scaled by num_timesteps / 1000
    KL = enum.auto()            # the variational bound
    RESCALED_KL = enum.auto()   # the bound times num_timesteps, comparable with the MSE

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    :param schedule_name: "linear" (Ho et al., scaled so any step count spans the same range) or
        "cosine" (Nichol & Dhariwal).
    :return: [num_diffusion_timesteps] float64 betas.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {schedule_name!r}: use 'linear' or 'cosine'")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """
    Discretises a continuous alpha_bar(t), t in [0, 1], into betas.
    :param max_beta: the largest beta, to avoid a singularity at t = 1.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class GaussianDiffusion:
    """
    :param betas: [T] float64 noise variances per step.
    :param model_mean_type: a ModelMeanType.
    :param model_var_type: a ModelVarType.
    :param loss_type: a LossType.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        self.betas = betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must lie in (0, 1]"
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # FIXED_LARGE uses beta_t, except beta~_1 at t = 0.
        self.large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.large_log_variance = np.log(self.large_variance)

        self._torch_tables = {}  # (name, device) -> float32 tensor; built on first use per device

    def _extract(self, name, t, x):
        """
        :param name: the name of a [T] numpy schedule attribute.
        :param t: [N] integer timesteps.
        :param x: the [N x ...] tensor the coefficient will multiply.
        :return: [N x 1 x ...] coefficients, broadcastable against x, in x's dtype.
        """
        key = (name, t.device)
        if key not in self._torch_tables:
            # Cast float64 -> float32 before indexing, which gives the reference's values and works
            # on devices without float64.
            self._torch_tables[key] = torch.from_numpy(getattr(self, name)).float().to(t.device)
        res = self._torch_tables[key][t]
        return res.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    # ---------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0).
        :return: (mean, variance, log_variance), each broadcastable to x_start's shape.
        """
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """
        Draws x_t ~ q(x_t | x_0).
        :param x_start: [N x C x ...] clean data.
        :param t: [N] timesteps (0 is the first step of noise).
        :param noise: optional [N x C x ...] standard normal noise.
        :return: [N x C x ...] noisy data.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The posterior q(x_{t-1} | x_t, x_0).
        :return: (mean [N x C x ...], variance, log_variance_clipped), the latter two [N x 1 x ...].
        """
        assert x_start.shape == x_t.shape
        mean = self._extract("posterior_mean_coef1", t, x_t) * x_start + self._extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self._extract("posterior_variance", t, x_t)
        log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance_clipped

    # ---------------------------------------------------------------- reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """
        Applies the model to get p(x_{t-1} | x_t) and the implied prediction of x_0.
        :param model: called as model(x, t, **model_kwargs).
        :param x: [N x C x ...] x_t.
        :param t: [N] timesteps.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: optional function applied to the x_0 prediction before clipping.
        :return: dict with 'mean', 'variance', 'log_variance' and 'pred_xstart' (all [N x C x ...])
            and 'extra' (a model's second output, if it returns a tuple).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:]), "a learned-variance model outputs 2C channels"
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("log_betas", t, x)
                frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                names = "large_variance", "large_log_variance"
            else:
                names = "posterior_variance", "posterior_log_variance_clipped"
            model_variance = self._extract(names[0], t, x).expand(x.shape)
            model_log_variance = self._extract(names[1], t, x).expand(x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shifts the mean by the variance times cond_fn's gradient of log p(y | x) (Sohl-Dickstein
        et al. 2015; Dhariwal & Nichol 2021, Algorithm 1).
        """
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Score-based conditioning for DDIM (Song et al. 2020): the gradient shifts eps, and the x_0
        prediction and mean are recomputed from it.
        :return: a new p_mean_var dict.
        """
        alpha_bar = self._extract("alphas_cumprod", t, x)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None):
        """
        One ancestral step x_t -> x_{t-1}.
        :return: dict with 'sample' [N x C x ...] and 'pred_xstart'.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # no noise at t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False):
        """
        Ancestral sampling from pure noise through every step of this process.
        :param shape: the [N x C x ...] shape of the samples.
        :param noise: optional starting noise of that shape (which also sets device and dtype).
        :return: [N x C x ...] samples.
        """
        final = None
        for sample in self.p_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                     denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                     model_kwargs=model_kwargs, device=device, progress=progress):
            final = sample
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Yields each step's p_sample dict, from t = T-1 down to 0."""
        yield from self._loop(self.p_sample, model, shape, noise, progress, device,
                              clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                              model_kwargs=model_kwargs)

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0):
        """
        One DDIM step x_t -> x_{t-1} (Song et al. 2020, Eq. 12); eta = 0 is deterministic, eta = 1
        has the DDPM posterior's variance.
        :return: dict with 'sample' and 'pred_xstart'.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0):
        """DDIM sampling through every step of this process; arguments as p_sample_loop."""
        final = None
        for sample in self.ddim_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                        denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                        model_kwargs=model_kwargs, device=device,
                                                        progress=progress, eta=eta):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        """Yields each DDIM step's dict, from t = T-1 down to 0."""
        yield from self._loop(self.ddim_sample, model, shape, noise, progress, device,
                              clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                              model_kwargs=model_kwargs, eta=eta)

    def _loop(self, step, model, shape, noise, progress, device, **step_kwargs):
        """Runs `step` from t = T-1 down to 0 without gradients, yielding each step's output."""
        if noise is not None:
            img = noise
        else:
            if device is None:
                device = next(model.parameters()).device
            img = torch.randn(*shape, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(indices, disable=not progress):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
            yield out
            img = out["sample"]

    # ---------------------------------------------------------------- training

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """
        One term of the variational bound, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, the discretised decoder NLL at t = 0.
        :return: dict with 'output' [N] and 'pred_xstart'.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        Per-sample training losses at timesteps t.
        :param model: called as model(x_t, t, **model_kwargs).
        :param x_start: [N x C x ...] clean data.
        :param t: [N] timesteps.
        :param noise: optional [N x C x ...] noise used to make x_t.
        :return: dict of [N] tensors: 'loss', and with the MSE loss types 'mse' and (when the
            variance is learned) 'vb'.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            assert model_output.shape == (B, C * 2, *x_t.shape[2:])
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # The bound trains only the variance: the mean's gradient comes from the MSE alone
            # (Nichol & Dhariwal 2021, Section 3.1), so the mean output is detached here.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, r=frozen_out: r, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Dividing by 1000 is equivalent to the paper's lambda = 0.001 at 1000 steps.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
