"""diffusion/flow.py: SiT's linear interpolant with velocity prediction, its time sampling and samplers."""
import json
import zlib

import pytest
import torch

from conftest import GOLDEN_DIR
from diffusion.flow import LOGIT_NORMAL_LOC, LOGIT_NORMAL_SCALE, FlowMatching, ODESolver, TimeSampling
from models import DiT


def test_loss_is_the_velocity_error_on_the_first_channels():
    torch.manual_seed(0)
    x1, x0 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.0, 0.25, 0.7, 1.0])
    seen = {}

    def model(x, t, y):  # velocity x_t + y, then 3 "learned sigma" channels that must be ignored
        seen.update(x=x, t=t)
        return torch.cat([x + y.view(-1, 1, 1, 1), torch.full_like(x, 1e6)], dim=1)

    y = torch.arange(4.0)
    loss = FlowMatching().training_losses(model, x1, t, dict(y=y), noise=x0)["loss"]
    x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    assert torch.equal(seen["t"], t) and torch.allclose(seen["x"], x_t)  # fed t in [0, 1] itself
    expected = ((x_t + y.view(-1, 1, 1, 1) - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    assert loss.shape == (4,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_the_exact_velocity_has_zero_loss():
    """For one data point x1 the field (x1 - x) / (1 - t) is exact: t = 0 must be noise, t = 1 data."""
    torch.manual_seed(1)
    x1 = torch.randn(1, 4, 4, 4).expand(6, -1, -1, -1)
    t = torch.linspace(0, 0.9, 6)
    loss = FlowMatching().training_losses(lambda x, t: (x1 - x) / (1 - t.view(-1, 1, 1, 1)), x1, t)["loss"]
    assert loss.max() < 1e-10


def test_time_sampling():
    torch.manual_seed(0)
    expected = torch.rand(8)
    torch.manual_seed(0)
    assert torch.equal(FlowMatching("uniform").sample_time(8, "cpu"), expected)

    torch.manual_seed(0)
    t = FlowMatching("logit-normal").sample_time(200_000, "cpu")
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    # t = sigmoid(n), n ~ N(0, 1): median 1/2, quartiles sigmoid(-+0.6745), mean 1/2 by symmetry
    q = torch.quantile(t[:100_000], torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(q, torch.sigmoid(torch.tensor([-0.6745, 0.0, 0.6745])), atol=4e-3, rtol=0)
    assert abs(t.mean().item() - 0.5) < 2e-3
    assert (LOGIT_NORMAL_LOC, LOGIT_NORMAL_SCALE) == (0.0, 1.0)


def test_noise_quartile_counts_from_the_data_end():
    t = torch.tensor([1.0, 0.8, 0.74, 0.5, 0.3, 0.1, 0.0])
    assert FlowMatching().noise_quartile(t).tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_config_is_plain_data():
    assert FlowMatching(TimeSampling.UNIFORM).config()["time_sampling"] == "uniform"
    record = FlowMatching("logit-normal").config()
    assert json.loads(json.dumps(record)) == record
    assert record["objective"] == "flow" and record["logit_normal_scale"] == 1.0
    with pytest.raises(ValueError):
        FlowMatching("lognormal")


#################################################################################
#                                    Samplers                                   #
#################################################################################


def reference_model(config):
    """The golden file's model in this project's DiT (tests/golden/README.md, sit_reference.pt)."""
    model = DiT(**config).eval()
    model.load_state_dict({k: torch.randn(v.shape, generator=torch.Generator().manual_seed(
        zlib.crc32(("sit:" + k).encode()))) * 0.05 for k, v in model.state_dict().items()}, strict=True)
    return model.requires_grad_(False)


def test_loss_and_samplers_match_sits_code(one_thread):
    ref = torch.load(GOLDEN_DIR / "sit_reference.pt", weights_only=True)
    model, inputs, steps, n = reference_model(ref["model"]), ref["inputs"], ref["steps"], len(ref["inputs"]["z"])
    flow = FlowMatching()
    ours = {"loss": flow.training_losses(model, inputs["x1"], inputs["t"], dict(y=inputs["y"]), inputs["x0"])["loss"]}
    for cfg in (False, True):
        z, kwargs, fn = inputs["z"], dict(y=inputs["y"]), model.forward
        if cfg:
            z, fn = torch.cat([z, z]), model.forward_with_cfg
            kwargs = dict(y=torch.cat([inputs["y"], torch.full_like(inputs["y"], model.num_classes)]),
                          cfg_scale=ref["cfg_scale"])
        suffix = "_cfg" if cfg else ""
        for name in ("euler", "heun"):
            ours[name + suffix] = flow.sample_ode(fn, z, steps[name], ODESolver(name), kwargs)[:n]
        draws = iter(inputs["sde_noise"])
        ours["sde" + suffix] = flow.sample_sde(fn, z, lambda: torch.cat([next(draws)] * (len(z) // n)), steps["sde"],
                                               kwargs)[:n]
    assert ours.keys() == ref["outputs"].keys()
    for key, expected in ref["outputs"].items():
        torch.testing.assert_close(ours[key], expected, rtol=1e-5, atol=1e-5, msg=key)


class Counted:
    """A velocity model that counts its calls."""

    def __init__(self, velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.velocity(x, t)


def test_ode_solvers_end_exactly_where_the_flow_does():
    torch.manual_seed(0)
    z, x1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # One data point x1: the exact field (x1 - x) / (1 - t) moves on straight lines, which Euler follows exactly.
    euler = Counted(lambda x, t: (x1 - x) / (1 - t.view(-1, 1, 1, 1)))
    torch.testing.assert_close(FlowMatching().sample_ode(euler, z, 7, ODESolver.EULER), x1, rtol=0, atol=1e-5)
    # dx/dt = 2 t c: x(1) = z + c, and Heun's trapezoid is exact for a slope linear in t (Euler is not).
    c = torch.randn(2, 3, 4, 4)
    heun = Counted(lambda x, t: 2 * t.view(-1, 1, 1, 1) * c)
    torch.testing.assert_close(FlowMatching().sample_ode(heun, z, 7, "heun"), z + c, rtol=0, atol=1e-5)
    assert not torch.allclose(FlowMatching().sample_ode(heun, z, 7, "euler"), z + c, atol=1e-2)
    assert (euler.calls, heun.calls) == (6, 12 + 6)  # SiT's steps: 7 grid times, 6 intervals


def test_sde_takes_one_noise_draw_per_step_and_steps_evaluations():
    model, draws = Counted(lambda x, t: torch.zeros_like(x)), []

    def noise():
        draws.append(torch.randn(1, 1, 2, 2))
        return draws[-1]

    FlowMatching().sample_sde(model, torch.randn(1, 1, 2, 2), noise, 9)
    assert (model.calls, len(draws)) == (9, 8)
