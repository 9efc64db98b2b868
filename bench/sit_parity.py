"""
Parity with SiT's own code: the same tiny random model in this project's models.DiT and in SiT's
models.SiT, the same noise, and diffusion/flow.py's loss and samplers against SiT's transport/.

    git clone https://github.com/willisma/SiT /tmp/sit && git -C /tmp/sit checkout 947f95b
    pip install timm torchdiffeq                                   # what SiT's code imports
    python bench/sit_parity.py --sit /tmp/sit                      # prints the max abs differences
    python bench/sit_parity.py --sit /tmp/sit --golden tests/golden/sit_reference.pt   # and writes SiT's outputs

Compared: the training loss for fixed t and noise; the ODE with Euler and with Heun (SiT's
sample_ode with torchdiffeq's euler and heun2); the SDE (SiT's sample_sde with its sample.py's
defaults, Euler-Maruyama and diffusion form "sigma", its per-step torch.randn replaced for the run
by the draws this project's sampler takes from its noise callable); each sampler without guidance
and with DiT's 3-channel guidance through forward_with_cfg. --golden writes SiT's inputs and outputs
(no code) for tests/test_flow.py. Needs SiT's checkout, so neither the tests nor bench/run.py run it.
"""
import argparse
import contextlib
import importlib.util
import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion.flow import FlowMatching, ODESolver  # noqa: E402
from models import DiT  # noqa: E402

# The tiny model both codes build, and the sampling settings compared.
MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
             learn_sigma=True)
BATCH, CFG_SCALE = 3, 4.0
STEPS = {"euler": 10, "heun": 10, "sde": 20}


def reference_weights(model):
    """Every state_dict entry k is 0.05 * randn seeded with crc32("sit:" + k) (tests/golden/README.md)."""
    return {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(zlib.crc32(("sit:" + k).encode()))) * 0.05
            for k, v in sorted(model.state_dict().items())}


def reference_inputs():
    """The starting noise, labels, SDE per-step noise and the loss's data, noise and times."""
    g = torch.Generator().manual_seed(18)
    shape = (BATCH, MODEL["in_channels"], MODEL["input_size"], MODEL["input_size"])
    return dict(z=torch.randn(shape, generator=g), y=torch.tensor([0, 3, 9]),
                sde_noise=torch.randn((STEPS["sde"] - 1, *shape), generator=g),
                x1=torch.randn(shape, generator=g), x0=torch.randn(shape, generator=g), t=torch.tensor([0.05, 0.5, 0.93]))


def load_sit(sit_dir):
    """SiT's models.py (as the module sit_models: this project's is `models`) and its transport package."""
    spec = importlib.util.spec_from_file_location("sit_models", os.path.join(sit_dir, "models.py"))
    sit_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sit_models)
    sys.path.insert(0, os.path.abspath(sit_dir))
    import transport
    return sit_models, transport


def guided(inputs, cfg):
    """(z, model kwargs) as both codes' sample.py set them up: the batch doubled with null labels under guidance."""
    z, y = inputs["z"], inputs["y"]
    if not cfg:
        return z, dict(y=y)
    return torch.cat([z, z]), dict(y=torch.cat([y, torch.full_like(y, MODEL["num_classes"])]), cfg_scale=CFG_SCALE)


@contextlib.contextmanager
def randn_from(draws):
    """torch.randn returns the next of `draws` (each repeated over a doubled batch) while inside: SiT's
    Euler-Maruyama step draws its noise with torch.randn(x.size())."""
    original, it = torch.randn, iter(draws)

    def fake(*size, **kwargs):
        d = next(it)
        return torch.cat([d] * (size[0][0] // len(d)))

    torch.randn = fake
    try:
        yield
    finally:
        torch.randn = original


def run_sit(sit, transport, inputs):
    """SiT's outputs: {"loss": [N], "<sampler>" and "<sampler>_cfg": samples}."""
    model = sit.SiT(**MODEL).eval()
    model.load_state_dict(reference_weights(model), strict=True)
    flow = transport.create_transport("Linear", "velocity")
    sampler = transport.Sampler(flow)
    out = {}
    flow.sample = lambda x1: (inputs["t"], inputs["x0"], x1)  # its t and x0 would be drawn here
    with torch.no_grad():
        out["loss"] = flow.training_losses(model, inputs["x1"], dict(y=inputs["y"]))["loss"]
        for cfg in (False, True):
            z, kwargs = guided(inputs, cfg)
            fn = model.forward_with_cfg if cfg else model.forward
            suffix = "_cfg" if cfg else ""
            for name, method in (("euler", "euler"), ("heun", "heun2")):
                ode = sampler.sample_ode(sampling_method=method, num_steps=STEPS[name])
                out[name + suffix] = ode(z, fn, **kwargs)[-1][:BATCH]
            # sample.py's SDE defaults (train_utils.parse_sde_args): Euler, sigma, norm 1, Mean, 0.04
            sde = sampler.sample_sde(sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0,
                                     last_step="Mean", last_step_size=0.04, num_steps=STEPS["sde"])
            with randn_from(inputs["sde_noise"]):
                out["sde" + suffix] = sde(z, fn, **kwargs)[-1][:BATCH]
    return out


def run_ours(inputs):
    """The same with models.DiT and diffusion/flow.py."""
    model = DiT(**MODEL).eval()
    model.load_state_dict(reference_weights(model), strict=True)
    flow = FlowMatching()
    out = {}
    with torch.no_grad():
        out["loss"] = flow.training_losses(model, inputs["x1"], inputs["t"], dict(y=inputs["y"]),
                                           noise=inputs["x0"])["loss"]
        for cfg in (False, True):
            z, kwargs = guided(inputs, cfg)
            fn = model.forward_with_cfg if cfg else model.forward
            suffix = "_cfg" if cfg else ""
            for name in ("euler", "heun"):
                out[name + suffix] = flow.sample_ode(fn, z, STEPS[name], ODESolver(name), kwargs)[:BATCH]
            draws = iter(inputs["sde_noise"])
            out["sde" + suffix] = flow.sample_sde(fn, z, lambda: torch.cat([next(draws)] * (len(z) // BATCH)),
                                                  STEPS["sde"], kwargs)[:BATCH]
    return out


def main(args):
    torch.set_num_threads(1)  # the same reduction order in both codes' matmuls
    sit, transport = load_sit(args.sit)
    inputs = reference_inputs()
    theirs, ours = run_sit(sit, transport, inputs), run_ours(inputs)
    print(f"SiT at {args.sit} vs this project, float32 CPU, model {MODEL}")
    print("| output | max abs difference | max abs value |\n|---|---|---|")
    for key in theirs:
        print(f"| {key} | {(theirs[key] - ours[key]).abs().max().item():.2e} | {theirs[key].abs().max().item():.3f} |")
    if args.golden:
        outputs = {k: v.clone() for k, v in theirs.items()}  # not the views of whole trajectories they are
        torch.save(dict(model=MODEL, cfg_scale=CFG_SCALE, steps=STEPS, inputs=inputs, outputs=outputs), args.golden)
        print(f"wrote {args.golden}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--sit", required=True, help="a checkout of willisma/SiT (947f95b)")
    parser.add_argument("--golden", default=None, help="also write SiT's inputs and outputs here")
    return parser, parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args()[1])
