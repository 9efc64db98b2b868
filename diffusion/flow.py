"""The flow objective of SiT (Ma et al. 2024): the linear interpolant between noise and data, with a
model that predicts the velocity.

    from diffusion.flow import FlowMatching, TimeSampling
    flow = FlowMatching(TimeSampling.LOGIT_NORMAL)
    t = flow.sample_time(len(x1), x1.device)
    loss = flow.training_losses(model, x1, t, dict(y=y))["loss"].mean()
    x1 = flow.sample_ode(model.forward, z, 50, ODESolver.HEUN, dict(y=y))   # z ~ N(0, I) at t = 0
    x1 = flow.sample_sde(model.forward, z, noise, 250, dict(y=y))           # noise(): the per-step draws

Time runs the other way from DDPM's: t = 0 is pure noise, t = 1 is data, and x_t = t x1 + (1 - t) x0
with x0 ~ N(0, I). The model is DiT unchanged and is fed t in [0, 1] itself, as SiT feeds it (its
timestep embedding sees values 1000 times smaller than DDPM's timesteps). The facts come from
willisma/SiT at 947f95b: transport/path.py (ICPlan), transport/transport.py (training_losses,
Sampler), transport/integrators.py; bench/sit_parity.py checks the samplers against that code.
"""
import enum

import torch
from tqdm.auto import tqdm


class TimeSampling(enum.Enum):
    """How training draws t."""

    UNIFORM = "uniform"  # t ~ U[0, 1] (SiT's)
    # t = sigmoid(loc + scale * n), n ~ N(0, 1): more draws at middle times, where the velocity is hardest
    # to predict (Esser et al. 2024, SD3's rectified flow; LightningDiT keeps SD3's loc 0, scale 1).
    LOGIT_NORMAL = "logit-normal"


LOGIT_NORMAL_LOC, LOGIT_NORMAL_SCALE = 0.0, 1.0


class ODESolver(enum.Enum):
    """Fixed-step solvers of the probability-flow ODE dx/dt = v(x, t), as torchdiffeq's that SiT uses."""

    EULER = "euler"  # one model evaluation per step
    HEUN = "heun"  # Heun's second-order method (torchdiffeq's heun2): two evaluations per step


# SiT's SDE sampler as its sample.py and sample_ddp.py run it by default: Euler-Maruyama with the
# diffusion coefficient w(t) = 1 - t ("sigma", norm 1), and a last deterministic step ("Mean") of this
# size from t = 1 - 0.04 to 1. Not SiT's sample_sde's function default "SBDM" (w = (1 - t) / t): with
# velocity prediction SiT starts at t = 0 (sample_eps is 0), where that coefficient is infinite and
# its samples are NaN.
SDE_LAST_STEP_SIZE = 0.04


def mean_flat(tensor):
    """:return: [N] the mean over every dimension but the first."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def expand_like(t, x):
    """:return: t [N] viewed as [N x 1 x ... x 1] to broadcast against x."""
    return t.view(-1, *[1] * (x.ndim - 1))


class FlowMatching:
    """
    SiT's linear path (ICPlan) with velocity prediction: x_t = t x1 + (1 - t) x0, and the target
    velocity u_t = d x_t / dt = x1 - x0. SiT takes no epsilon off either end for this pairing
    (train_eps = sample_eps = 0 in create_transport), nor does this code.
    """

    def __init__(self, time_sampling=TimeSampling.UNIFORM):
        """:param time_sampling: a TimeSampling or its value."""
        self.time_sampling = TimeSampling(time_sampling)

    def sample_time(self, n, device):
        """:return: [n] float32 times in [0, 1] drawn from the global torch RNG of `device`."""
        if self.time_sampling is TimeSampling.UNIFORM:
            return torch.rand(n, device=device)
        return torch.sigmoid(LOGIT_NORMAL_LOC + LOGIT_NORMAL_SCALE * torch.randn(n, device=device))

    def interpolate(self, x0, x1, t):
        """:return: (x_t, u_t), each shaped as x1: the point on the path and its velocity."""
        t = expand_like(t, x1)
        return t * x1 + (1 - t) * x0, x1 - x0

    def training_losses(self, model, x1, t, model_kwargs=None, noise=None):
        """
        :param model: called as model(x_t, t, **model_kwargs); the first C channels of its output are
            the velocity. A DiT with learned sigma outputs 2C channels: the others are ignored, as
            SiT's forward drops them (they get no gradient).
        :param x1: [N x C x H x W] data.
        :param t: [N] times in [0, 1].
        :param noise: [N x C x H x W] x0, standard normal noise; drawn when None.
        :return: {"loss": [N] float32 mean squared velocity error per sample}.
        """
        x0 = torch.randn_like(x1) if noise is None else noise
        x_t, u_t = self.interpolate(x0, x1, t)
        v = model(x_t, t, **(model_kwargs or {}))[:, : x1.shape[1]]
        return {"loss": mean_flat((v.float() - u_t.float()) ** 2)}

    def score(self, v, x, t):
        """
        The score of p_t from the velocity (SiT's get_score_from_velocity for the linear path): x_t given
        x1 is N(t x1, (1 - t)^2 I) and E[x0 | x_t] = x_t - t v, so grad log p_t(x) = -E[x0 | x] / (1 - t)
        = (t v - x) / (1 - t). (SiT divides by (1 - t)^2 + t (1 - t), the same number.)
        :param v, x: [N x C x H x W]; t: [N] times below 1.
        """
        t = expand_like(t, x)
        return (t * v - x) / (1 - t)

    def sample_ode(self, model, z, steps, solver=ODESolver.EULER, model_kwargs=None, progress=False):
        """
        Integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 on a uniform grid of `steps` times, SiT's
        convention: steps - 1 intervals, so steps - 1 model evaluations for Euler, 2 (steps - 1) for Heun.

        :param model: model(x, t, **model_kwargs) whose first C output channels are the velocity.
        :param z: [N x C x H x W] the starting noise.
        :param solver: an ODESolver (or its value).
        :return: [N x C x H x W] samples at t = 1.
        """
        solver, kwargs = ODESolver(solver), model_kwargs or {}
        grid = torch.linspace(0, 1, steps).to(z.device)
        x = z
        for i in tqdm(range(steps - 1), disable=not progress, leave=False):
            t, dt = grid[i], grid[i + 1] - grid[i]
            k1 = self.velocity(model, x, t, kwargs)
            if solver is ODESolver.EULER:
                x = x + dt * k1
            else:  # the trapezoid of the slopes at both ends, the second taken after an Euler step
                k2 = self.velocity(model, x + dt * k1, t + dt, kwargs)
                x = x + dt * (0.5 * k1 + 0.5 * k2)
        return x

    def sample_sde(self, model, z, noise, steps, model_kwargs=None, progress=False):
        """
        SiT's SDE sampler (see SDE_LAST_STEP_SIZE): dx = [v + w(t) score] dt + sqrt(2 w(t)) dW with
        w(t) = 1 - t, Euler-Maruyama over steps - 1 intervals of [0, 1 - SDE_LAST_STEP_SIZE], then one
        step of the drift alone to t = 1. `steps` model evaluations.

        :param noise: a callable returning [N x C x H x W] standard normal noise for each step, so that
            each image can have its own stream (sampling.ImageNoise).
        :return: [N x C x H x W] samples.
        """
        kwargs = model_kwargs or {}
        grid = torch.linspace(0, 1 - SDE_LAST_STEP_SIZE, steps).to(z.device)
        dt = grid[1] - grid[0]

        def drift(x, t):
            v = self.velocity(model, x, t, kwargs)
            return v + (1 - t) * self.score(v, x, t.repeat(len(x)))

        x = z
        for t in tqdm(grid[:-1], disable=not progress, leave=False):
            dw = noise() * torch.sqrt(dt)
            x = x + drift(x, t) * dt + torch.sqrt(2 * (1 - t)) * dw
        return x + drift(x, grid[-1]) * SDE_LAST_STEP_SIZE  # SiT's "Mean" last step: no noise

    @staticmethod
    def velocity(model, x, t, kwargs):
        """:return: the model's velocity at x and the one time t (a 0-d tensor): its first C channels."""
        return model(x, t.repeat(len(x)), **kwargs)[:, : x.shape[1]]

    def noise_quartile(self, t):
        """:return: [N] int64 in 0..3, 0 the least noisy quarter (t near 1), 3 the noisiest (t near 0)."""
        return ((1 - t) * 4).long().clamp(0, 3)

    def config(self):
        """:return: the objective as plain data, recorded in checkpoints."""
        record = {
            "objective": "flow",
            "path": "linear",
            "prediction": "velocity",
            "time": "t=0 noise, t=1 data; the model is fed t in [0, 1]",
            "time_sampling": self.time_sampling.value,
        }
        if self.time_sampling is TimeSampling.LOGIT_NORMAL:
            record.update(logit_normal_loc=LOGIT_NORMAL_LOC, logit_normal_scale=LOGIT_NORMAL_SCALE)
        return record
