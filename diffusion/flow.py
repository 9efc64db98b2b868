"""The flow objective of SiT (Ma et al. 2024): the linear interpolant between noise and data, with a
model that predicts the velocity.

    from diffusion.flow import FlowMatching, TimeSampling
    flow = FlowMatching(TimeSampling.LOGIT_NORMAL)
    t = flow.sample_time(len(x1), x1.device)
    loss = flow.training_losses(model, x1, t, dict(y=y))["loss"].mean()

Time runs the other way from DDPM's: t = 0 is pure noise, t = 1 is data, and x_t = t x1 + (1 - t) x0
with x0 ~ N(0, I). The model is DiT unchanged and is fed t in [0, 1] itself, as SiT feeds it (its
timestep embedding sees values 1000 times smaller than DDPM's timesteps). The facts come from
willisma/SiT at 947f95b: transport/path.py (ICPlan), transport/transport.py (training_losses).
"""
import enum

import torch


class TimeSampling(enum.Enum):
    """How training draws t."""

    UNIFORM = "uniform"  # t ~ U[0, 1] (SiT's)
    # t = sigmoid(loc + scale * n), n ~ N(0, 1): more draws at middle times, where the velocity is hardest
    # to predict (Esser et al. 2024, SD3's rectified flow; LightningDiT keeps SD3's loc 0, scale 1).
    LOGIT_NORMAL = "logit-normal"


LOGIT_NORMAL_LOC, LOGIT_NORMAL_SCALE = 0.0, 1.0


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
