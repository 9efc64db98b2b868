"""sampling.py, sample.py, sample_ddp.py and diffusion/dpm_solver.py on tiny models (CPU, no network)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import sample
import sample_ddp
import sampling
from checkpoints import CheckpointError
from conftest import SMALL_MODEL, SMALL_SIZE, randomize, released_like, small_state_dict, toy, train_checkpoint
from diffusion import create_diffusion
from diffusion.dpm_solver import DPMSolver, Spacing, solver_timesteps
from files import run_script
from models import DiT, Guidance
from sampling import ImageNoise, Sampler, SamplingError
from vae import decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # 2 shared cores: no thread oversubscription


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: every test here on one thread


def tiny_dit(in_channels=4, input_size=8, num_classes=10):
    return randomize(DiT(input_size=input_size, patch_size=2, in_channels=in_channels, hidden_size=64, depth=2,
                         num_heads=4, num_classes=num_classes))


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "plain.pt"
    torch.save(small_state_dict(), path)
    return str(path)


#################################################################################
#                                    Samplers                                   #
#################################################################################


def _sample(model, sampler, steps, seed=0, cfg_scale=1.0, **kw):
    y = torch.tensor([1, 2, 3])
    noise = ImageNoise(seed, range(3), (model.in_channels, model.input_size, model.input_size), "cpu")
    return sampling.sample_latents(model, noise, y, sampler, steps, cfg_scale, **kw)


@pytest.mark.parametrize("sampler", list(Sampler))
def test_samplers_are_reproducible_and_ddim_solver_deterministic(sampler):
    model = tiny_dit()
    a = _sample(model, sampler, 10, cfg_scale=4.0)
    assert torch.equal(a, _sample(model, sampler, 10, cfg_scale=4.0)) and torch.isfinite(a).all()
    assert not torch.allclose(a, _sample(model, sampler, 10, seed=1, cfg_scale=4.0))


def test_images_do_not_depend_on_their_batch():
    model = tiny_dit()
    for sampler in Sampler:  # DDPM included: its per-step noise is per image as well
        y = torch.tensor([5, 1, 2, 7])
        full = sampling.sample_latents(model, ImageNoise(3, [10, 11, 12, 13], (4, 8, 8), "cpu"), y, sampler, 8, 1.5)
        part = sampling.sample_latents(model, ImageNoise(3, [12], (4, 8, 8), "cpu"), y[2:3], sampler, 8, 1.5)
        torch.testing.assert_close(part, full[2:3], rtol=1e-5, atol=1e-5)
    labels = sampling.random_labels(0, range(50), 10)
    assert torch.equal(labels[20:30], sampling.random_labels(0, range(20, 30), 10)) and len(set(labels.tolist())) > 5


def test_ddpm_loop_equals_p_sample_loop():
    """sample_latents' DDPM loop (which exists to take per-image noise) is the reference ancestral
    sampler: fed the same noise sequence, it gives p_sample_loop's result."""
    model = tiny_dit()
    y = torch.tensor([3, 8])
    torch.manual_seed(0)
    ours = sampling.sample_latents(model, lambda: torch.randn(2, 4, 8, 8), y, Sampler.DDPM, 20)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    ref = create_diffusion("20").p_sample_loop(model.forward, z.shape, noise=z, clip_denoised=False,
                                                 model_kwargs=dict(y=y))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", list(Guidance))
def test_guidance_at_scale_one_equals_no_guidance(guidance):
    model = tiny_dit()
    ac = create_diffusion("").alphas_cumprod
    solver = DPMSolver(ac, solver_timesteps(ac, 6))
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 4, 9])
    plain = solver.sample(model.forward, z, dict(y=y))
    guided = solver.sample(model.forward_with_cfg, torch.cat([z, z]),
                           dict(y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=1.0, guidance=guidance))
    torch.testing.assert_close(guided[:3], plain, rtol=1e-5, atol=1e-5)
    stronger = solver.sample(model.forward_with_cfg, torch.cat([z, z]),
                             dict(y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=4.0, guidance=guidance))
    assert (stronger[:3] - plain).abs().max() > 1e-3  # the comparison above can fail
    # An interval that holds none of the sampled timesteps turns guidance off.
    outside = _sample(model, Sampler.DPM_SOLVER, 6, cfg_scale=4.0, guidance=guidance, interval=(1000.0, 2000.0))
    torch.testing.assert_close(outside, _sample(model, Sampler.DPM_SOLVER, 6), rtol=1e-5, atol=1e-5)


def test_guidance_needs_a_null_class():
    model = randomize(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                          num_classes=10, class_dropout_prob=0.0))
    with pytest.raises(SamplingError, match="trained without label dropout.*use --cfg-scale 1"):
        _sample(model, Sampler.DDIM, 2, cfg_scale=4.0)
    assert _sample(model, Sampler.DDIM, 2).shape == (3, 4, 8, 8)


def test_first_order_solver_is_ddim():
    diffusion = create_diffusion("ddim25")
    ac = create_diffusion("").alphas_cumprod
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = diffusion.ddim_sample_loop(toy, noise.shape, noise=noise, clip_denoised=False, eta=0.0)
    # DDIM ends with a jump from t=0 to x_0; the solver stops at t=0, so take that jump by hand.
    times = np.asarray(diffusion.timestep_map, dtype=np.float64)[::-1]
    x = DPMSolver(ac, times, order=1).sample(toy, noise)
    t0 = torch.zeros(len(x))
    x0 = (x - np.sqrt(1 - ac[0]) * toy(x, t0)[:, :4]) / np.sqrt(ac[0])
    torch.testing.assert_close(x0, ddim, rtol=1e-5, atol=1e-5)


def mixture_eps(ac, means=(-1.5, -0.2, 1.0), stds=(0.1, 0.3, 0.05)):
    """The exact noise prediction for data drawn per pixel from an equal-weight 1-D Gaussian mixture."""
    M, S = torch.tensor(means, dtype=torch.float64), torch.tensor(stds, dtype=torch.float64)

    def eps(x, t, **kw):
        a = torch.from_numpy(np.exp(0.5 * np.interp(t.double().numpy(), np.arange(len(ac)), np.log(ac))))
        a = a.view(-1, 1, 1, 1, 1)
        x = x.double().unsqueeze(-1)
        sigma = (1 - a ** 2).sqrt()
        var = a ** 2 * S ** 2 + sigma ** 2
        w = (-0.5 * (x - a * M) ** 2 / var - 0.5 * var.log()).softmax(-1)  # posterior over components
        e = (w * sigma * (x - a * M) / var).sum(-1)
        return torch.cat([e, torch.zeros_like(e)], dim=1)
    return eps


def test_solver_converges_at_second_order_and_beats_ddim():
    ac = create_diffusion("").alphas_cumprod
    model = mixture_eps(ac)
    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = DPMSolver(ac, solver_timesteps(ac, 1000)).sample(model, z)

    def error(steps, order=2, spacing=Spacing.LOGSNR):
        return (DPMSolver(ac, solver_timesteps(ac, steps, spacing), order).sample(model, z) - reference).abs().mean()
    e10, e20, e40 = error(10), error(20), error(40)
    assert e20 < e10 / 3 and e40 < e20 / 3  # second order: about 4x less error per doubling
    assert e20 < error(20, order=1) / 5  # first order (= DDIM) at the same cost is far worse
    assert error(20, spacing=Spacing.TIME) < error(20, order=1, spacing=Spacing.TIME)
    ts = solver_timesteps(ac, 20)
    assert len(ts) == 21 and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)


#################################################################################
#                                  The scripts                                  #
#################################################################################


def kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own sessions,
    so killing its process group would leave them running)."""
    parents = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):  # not a process, or it just ended
            pass
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, ppid in parents.items() if ppid in frontier]
        tree += frontier
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(args, nproc=1, expect_ok=True, timeout=240):
    """Run a script (under torchrun for nproc > 1, on a free port); on timeout kill it with its workers."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    p = subprocess.Popen(launch + args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        raise
    if expect_ok:
        assert p.returncode == 0, stdout + stderr
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


DDP = ["--vae", "none", "--image-size", "8", "--model", SMALL_MODEL, "--num-classes", "10", "--num-fid-samples", "7",
       "--sampler", "dpm-solver", "--num-sampling-steps", "100", "--cfg-scale", "2.0"]


def sample_ddp_main(argv):
    """sample_ddp.py in this process: one process, the path a one-process launch takes."""
    sample_ddp.main(sample_ddp.parse_args(argv)[1])


def npz_of(sample_dir):
    (name,) = [f for f in os.listdir(sample_dir) if f.endswith(".npz")]
    with np.load(os.path.join(sample_dir, name)) as f:
        return f["arr_0"], f["labels"]


def run_folder(sample_dir):
    (folder,) = [os.path.join(sample_dir, d) for d in os.listdir(sample_dir)
                 if os.path.isdir(os.path.join(sample_dir, d))]
    return folder


def pngs(folder):
    return [f for f in os.listdir(folder) if f.endswith(".png")] if os.path.isdir(folder) else []


def test_sample_ddp_one_vs_many_processes_and_resume(tmp_path):
    """One process samples 7 images; a killed run's files are then finished by 4 processes in 2 sequence-parallel
    groups of 2 (each image's 4 tokens split over a group: sequence.py, DeepSpeed's Ulysses attention; the second
    group's collectives over ranks 2 and 3) with another batch size: the .npz is the one process's, byte for byte.
    A flow model with Heun and guidance (every step runs the batched conditional and null passes), whose images,
    unlike the DDPM model's here, are not saturated."""
    one, ckpt = str(tmp_path / "one"), flow_checkpoint(tmp_path / "flow.pt")
    flags = ["--num-fid-samples", "7", "--sampler", "heun", "--num-sampling-steps", "3", "--cfg-scale", "2.0"]
    sample_ddp_main(flags + ["--ckpt", ckpt, "--sample-dir", one, "--per-proc-batch-size", "3"])
    arr, labels = npz_of(one)
    assert arr.shape == (7, 8, 8, 3) and arr.dtype == np.uint8 and arr.std() > 10
    assert ((arr > 0) & (arr < 255)).mean() > 0.5  # not saturated: the pixels depend on the attention
    assert np.array_equal(labels, sampling.random_labels(0, range(7), 10).numpy())

    # A killed run seen from its files (what atomic writes leave): two images missing, one cut mid-write, no .npz.
    folder = run_folder(one)
    os.remove(folder + ".npz")
    for i in (2, 5):
        os.remove(os.path.join(folder, f"{i:06d}.png"))
    with open(os.path.join(folder, "000005.png.tmp"), "wb") as f:
        f.write(b"\x89PNG half")
    kept = {i: os.stat(os.path.join(folder, f"{i:06d}.png")).st_mtime_ns for i in (0, 1, 3, 4, 6)}
    # Finished by two groups of two processes with another batch size: they keep what was finished, and the .npz is
    # the one process's, image for image.
    p = run(["sample_ddp.py", *flags, "--ckpt", ckpt, "--sample-dir", one, "--per-proc-batch-size", "2",
             "--sequence-parallel", "2"], nproc=4)
    assert "5 of 7 images already" in p.stdout and "on 4 process(es) in 2 groups of 2" in p.stdout
    assert "images/s" in p.stdout
    assert all(os.stat(os.path.join(folder, f"{i:06d}.png")).st_mtime_ns == m for i, m in kept.items())
    assert not [f for f in os.listdir(folder) if ".tmp" in f]
    arr2, labels2 = npz_of(one)
    assert np.array_equal(arr, arr2) and np.array_equal(labels, labels2)


def test_sample_py_with_train_checkpoint_and_autoencoder(tiny_vae_path, tmp_path):
    with open(os.path.join(tiny_vae_path, "config.json")) as f:
        size = SMALL_SIZE * 2 ** (len(json.load(f)["block_out_channels"]) - 1)  # image side for the latents
    ckpt = train_checkpoint(tmp_path / "0000100.pt", small_state_dict(in_channels=4), vae=tiny_vae_path,
                            image_size=size, in_channels=4, scaling_factor=0.5)
    out = str(tmp_path / "grid.png")
    labels = ["--class-labels", "1", "2", "3", "4", "5"]
    sample.main(sample.parse_args(["--ckpt", ckpt, *labels, "--sampler", "ddim", "--num-sampling-steps", "5",
                                   "--output", out])[1])
    assert Image.open(out).size == (4 * size + 5 * 2, 2 * size + 3 * 2)  # save_image's grid, padding 2
    sample.main(sample.parse_args(["--ckpt", ckpt, *labels, "--sampler", "ddim", "--num-sampling-steps", "2",
                                   "--nrow", "5", "--output", out])[1])
    assert Image.open(out).size == (5 * size + 6 * 2, size + 2 * 2)
    with pytest.raises(CheckpointError, match="--model DiT-B/8 contradicts"):
        sample.main(sample.parse_args(["--ckpt", ckpt, "--model", "DiT-B/8", "--output", out])[1])


def test_sample_py_on_a_real_train_py_checkpoint(latent_store, tmp_path, capsys):
    """train.py's own checkpoint (2 steps on the tiny-autoencoder store) samples with no repeated flags."""
    import train

    _, targs = train.parse_args(["--features-path", latent_store, "--results-dir", str(tmp_path), "--model",
                                 "DiT-Digits/2", "--global-batch-size", "4", "--num-workers", "0", "--no-progress",
                                 "--max-steps", "2"])
    exp = train.main(targs)
    ckpt = os.path.join(exp, "checkpoints", "0000002.pt")
    out = str(tmp_path / "digits.png")
    capsys.readouterr()
    sample.main(sample.parse_args(["--ckpt", ckpt, "--class-labels", "0", "1", "2", "--sampler", "dpm-solver",
                                   "--num-sampling-steps", "3", "--nrow", "3", "--output", out])[1])
    assert "DiT-Digits/2" in capsys.readouterr().out
    # The grid holds exactly what the checkpoint's EMA weights sample for image i's stream.
    _, args = sample.parse_args(["--ckpt", ckpt])
    loaded = sampling.load_model(args, "cpu", default_vae="mse")
    z = sampling.sample_latents(loaded.model, ImageNoise(0, range(3), loaded.latent_shape, "cpu"),
                                torch.tensor([0, 1, 2]), Sampler.DPM_SOLVER, 3, 4.0)
    expected = sampling.to_uint8(decode(loaded.vae, z, loaded.scaling_factor))  # [3, 16, 16, 3]
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    side = expected.shape[1]
    for i in range(3):
        tile = grid[2:2 + side, 2 + i * (side + 2):2 + i * (side + 2) + side]
        assert np.abs(tile - expected[i]).max() <= 1  # save_image rounds from [0, 1], to_uint8 from [-1, 1]


def test_user_errors_come_before_any_work(plain_ckpt, tmp_path, capsys):
    """Bad output paths, step counts and labels are one-line errors at once, not after a sampling run."""
    common = ["--ckpt", plain_ckpt, "--vae", "none", "--image-size", "8", "--model", SMALL_MODEL,
              "--num-classes", "10"]
    (tmp_path / "a_file").write_text("")
    for script, args, message in [
            (sample, ["--output", str(tmp_path / "missing" / "x.png")], "the folder .*missing does not exist"),
            (sample, ["--output", str(tmp_path / "x.pngg")], "unknown extension '.pngg'"),
            (sample, ["--num-sampling-steps", "0"], "--num-sampling-steps must be in 1..1000, got 0"),
            (sample, ["--class-labels", "3", "-1"], "--class-labels must be >= 0, got -1"),
            (sample_ddp, ["--sample-dir", str(tmp_path / "a_file")], "--sample-dir .*a_file is a file")]:
        with pytest.raises(SystemExit) as e:
            script.parse_args(common + args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(f"error: .*{message}", err), err
    # Labels the model does not have: known once the checkpoint is read, before any sampling.
    output = str(tmp_path / "x.png")
    with pytest.raises(SamplingError, match=r"--class-labels \[10, 12\] are outside the model's 10 classes"):
        sample.main(sample.parse_args(common + ["--class-labels", "1", "10", "12", "--output", output])[1])
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
    # The same through the script: a one-line error, no traceback.
    p = run(["sample.py", *common, "--class-labels", "10", "--output", output], expect_ok=False, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.endswith("sample.py: error: --class-labels [10] are outside the model's 10 classes (0 to 9)\n")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_load_model_leaves_the_flags_as_they_are(tmp_path, monkeypatch):
    """No --ckpt means the released checkpoint; the file used is in the result, `args` stays as parsed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt").write_bytes(released_like(256))
    _, args = sample_ddp.parse_args(["--vae", "none"])
    with pytest.raises(CheckpointError, match=r"^pretrained_models/DiT-XL-2-256x256.pt does not fit DiT-XL/2 for "
                                              r"3-channel 256x256 inputs"):
        sampling.load_model(args, "cpu", default_vae="ema")
    assert args.ckpt is None


def test_sample_ddp_refuses_non_finite_weights(tmp_path):
    """A diverged run's weights would sample blank images: refused before any is written."""
    path, out = tmp_path / "diverged.pt", tmp_path / "samples"
    weights = small_state_dict()
    weights["pos_embed"][0, 1, 2] = float("nan")
    torch.save(weights, path)
    with pytest.raises(CheckpointError, match=r"diverged.pt: pos_embed is not finite"):
        sample_ddp_main(DDP + ["--ckpt", str(path), "--sample-dir", str(out)])
    assert not out.exists()


def test_sample_ddp_refuses_to_mix_weights_under_one_path(tmp_path, monkeypatch, capsys):
    """A checkpoint replaced under the same path does not add its images to the other weights' .npz."""
    path, out = tmp_path / "model.pt", str(tmp_path / "samples")
    torch.save(small_state_dict(seed=0), path)
    first = checkpoints.weights_digest(small_state_dict(seed=0))
    sample_ddp_main(DDP + ["--ckpt", str(path), "--sample-dir", out, "--num-sampling-steps", "2"])
    torch.save(small_state_dict(seed=1), path)
    monkeypatch.setattr(sys, "argv", ["sample_ddp.py", *DDP, "--num-fid-samples", "9", "--num-sampling-steps", "2",
                                      "--ckpt", str(path), "--sample-dir", out])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_script(sample_ddp.parse_args, sample_ddp.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"holds samples of other weights (sha256 {first}" in err
    assert checkpoints.weights_digest(small_state_dict(seed=1)) in err
    assert len(pngs(run_folder(out))) == 7

    # A folder written before settings.json recorded the objective (all DDPM then) is continued.
    torch.save(small_state_dict(seed=0), path)
    settings_path = os.path.join(run_folder(out), "settings.json")
    with open(settings_path) as f:
        settings = json.load(f)
    with open(settings_path, "w") as f:
        json.dump({k: v for k, v in settings.items() if k != "objective"}, f)
    sample_ddp_main(DDP + ["--ckpt", str(path), "--sample-dir", out, "--num-sampling-steps", "2",
                           "--num-fid-samples", "8"])
    assert len(pngs(run_folder(out))) == 8


def test_sample_ddp_full_disk_is_one_line(plain_ckpt, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing an image: the script's one-line error (exit 1), and no partial file left."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    monkeypatch.setattr(sys, "argv", ["sample_ddp.py", *DDP, "--ckpt", plain_ckpt, "--sample-dir", str(tmp_path),
                                      "--num-sampling-steps", "2"])
    with pytest.raises(SystemExit) as e:
        run_script(sample_ddp.parse_args, sample_ddp.main)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"sample_ddp.py: error: no space left on the device while writing \S+/000000.png \(\d+ MiB "
                        r"free there\); nothing was written, free some space and rerun", err.splitlines()[-1]), err
    assert os.listdir(run_folder(str(tmp_path))) == ["settings.json"]


def flow_checkpoint(path):
    """train_checkpoint's file, recording SiT's flow objective as train.py --objective flow does."""
    data = torch.load(train_checkpoint(path, small_state_dict()), weights_only=True)
    torch.save(dict(data, objective=checkpoints.SIT_OBJECTIVE), path)
    return str(path)


def test_the_checkpoints_objective_picks_the_sampler(plain_ckpt, tmp_path):
    flow, ddpm = flow_checkpoint(tmp_path / "flow.pt"), train_checkpoint(tmp_path / "ddpm.pt", small_state_dict())
    choose = sampling.choose_sampler
    assert choose(checkpoints.load_checkpoint(flow)) == ("flow", Sampler.SDE, 250)
    assert choose(checkpoints.load_checkpoint(ddpm), None, 30) == ("ddpm", Sampler.DDPM, 30)
    plain = checkpoints.load_checkpoint(plain_ckpt)  # records nothing: DDPM unless a flow sampler is asked for
    assert choose(plain) == ("ddpm", Sampler.DDPM, 250) and choose(plain, "heun") == ("flow", Sampler.HEUN, 50)
    with pytest.raises(SamplingError, match=rf"^{flow} holds a flow model; --sampler ddim is for DDPM models: use "
                                            r"sde, euler, heun$"):
        sample.main(sample.parse_args(["--ckpt", flow, "--sampler", "ddim", "--output", str(tmp_path / "x.png")])[1])
    with pytest.raises(SamplingError, match=rf"^{ddpm} holds a DDPM model; --sampler euler is for flow models: use "
                                            r"ddpm, ddim, dpm-solver \(SiT's released weights: --ckpt SiT-XL-2"):
        choose(checkpoints.load_checkpoint(ddpm), "euler")
    with pytest.raises(SamplingError, match="--sampler sde needs --num-sampling-steps >= 2"):
        choose(plain, "sde", 1)
    assert not os.path.exists(tmp_path / "x.png")


def test_flow_guidance_interval_is_in_the_flows_time():
    model = tiny_dit()
    guided = _sample(model, Sampler.EULER, 6, cfg_scale=4.0)
    for interval, expected in [((2.0, 3.0), _sample(model, Sampler.EULER, 6)), ((0.0, 1.0), guided)]:
        torch.testing.assert_close(_sample(model, Sampler.EULER, 6, cfg_scale=4.0, interval=interval), expected)
    assert (_sample(model, Sampler.EULER, 6, cfg_scale=4.0, interval=(0.5, 1.0)) - guided).abs().max() > 1e-4


def test_sample_ddp_records_a_flow_checkpoints_objective_and_sampler(tmp_path):
    out = str(tmp_path / "samples")
    args = [a for a in DDP if a not in ("--sampler", "dpm-solver")]
    sample_ddp_main(args + ["--ckpt", flow_checkpoint(tmp_path / "flow.pt"), "--sample-dir", out,
                            "--num-sampling-steps", "4", "--num-fid-samples", "2"])
    folder = run_folder(out)
    assert folder.endswith("-cfg-2.0-sde-4-seed-0") and len(pngs(folder)) == 2
    with open(os.path.join(folder, "settings.json")) as f:
        settings = json.load(f)
    assert (settings["objective"], settings["sampler"], settings["num_sampling_steps"]) == ("flow", "sde", 4)


def test_solver_spacing_reaches_the_sampler_and_names_the_run(plain_ckpt):
    _, args = sample_ddp.parse_args(DDP + ["--ckpt", plain_ckpt, "--solver-spacing", "time"])
    loaded = sampling.load_model(args, "cpu", default_vae="ema")
    assert sample_ddp.run_name(args, loaded).endswith("-spacing-time")
    noise = lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # noqa: E731
    y = torch.tensor([1, 2])
    time_grid = sampling.sample_latents(loaded.model, noise, y, Sampler.DPM_SOLVER, 4, spacing=args.solver_spacing)
    logsnr_grid = sampling.sample_latents(loaded.model, noise, y, Sampler.DPM_SOLVER, 4)
    assert (time_grid - logsnr_grid).abs().max() > 1e-3


#################################################################################
#                                     Video                                     #
#################################################################################

VIDEO_MODEL, FRAMES = "VDiT-Digits/4", 3


def video_checkpoint(path, seed=0):
    """A train.py checkpoint of a randomized VDiT-Digits/4 for 3-frame clips of 8x8 pixels (--vae none)."""
    from models import VDiT_models

    ema = randomize(VDiT_models[VIDEO_MODEL](input_size=SMALL_SIZE, in_channels=3, num_classes=10,
                                             num_frames=FRAMES), seed).state_dict()
    torch.save(dict(
        model=ema, ema=ema, opt={}, step=100,
        model_config=dict(model=VIDEO_MODEL, input_size=SMALL_SIZE, in_channels=3, num_classes=10, learn_sigma=True,
                          class_dropout_prob=0.1, num_frames=FRAMES),
        latents=dict(vae="none", scaling_factor=1.0, image_size=SMALL_SIZE, frames=FRAMES,
                     latent_shape=[3, FRAMES, SMALL_SIZE, SMALL_SIZE], num_classes=10),
        train_config=dict(global_batch_size=4)), path)
    return str(path)


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory):
    return video_checkpoint(tmp_path_factory.mktemp("video") / "0000100.pt")


def test_a_video_checkpoint_samples_clips_with_per_clip_streams(video_ckpt):
    _, args = sample.parse_args(["--ckpt", video_ckpt])
    loaded = sampling.load_model(args, "cpu", default_vae="mse")
    assert loaded.latent_shape == (3, FRAMES, SMALL_SIZE, SMALL_SIZE) and loaded.spec.num_frames == FRAMES
    y = torch.tensor([4, 1, 7])
    for sampler in (Sampler.DDPM, Sampler.DPM_SOLVER):  # DDPM draws per-step noise from each clip's stream too
        full = sampling.sample_latents(loaded.model, ImageNoise(2, [5, 6, 7], loaded.latent_shape, "cpu"), y, sampler,
                                       4, 3.0)
        part = sampling.sample_latents(loaded.model, ImageNoise(2, [6], loaded.latent_shape, "cpu"), y[1:2], sampler,
                                       4, 3.0)
        assert full.shape == (3, 3, FRAMES, SMALL_SIZE, SMALL_SIZE)
        torch.testing.assert_close(part, full[1:2], rtol=0, atol=2e-3)  # batched float32 sums differ a little
    # The frames of a clip are not the same picture: the model sees a clip, and each frame has its own noise.
    assert (full[:, :, 0] - full[:, :, 1]).abs().max() > 0.05
    videos = torch.rand(2, 3, FRAMES, 4, 5) * 2 - 1
    frames = sample.animated_grid(videos, nrow=2)  # (F, H', W', 3): frame f is the grid of every clip's frame f
    assert frames.shape == (FRAMES, 2 + 4 + 2, 2 + 2 * (5 + 2), 3)
    assert np.array_equal(frames[1, 2:6, 9:14], sampling.to_uint8(videos)[1, 1])


def test_sample_py_writes_an_animated_gif_or_mp4(video_ckpt, plain_ckpt, tmp_path, capsys):
    import av

    labels = ["--class-labels", "1", "2", "3", "--nrow", "3", "--sampler", "ddim", "--num-sampling-steps", "2"]
    side = 2 + 3 * (SMALL_SIZE + 2), 2 + SMALL_SIZE + 2
    gif = str(tmp_path / "clips.gif")
    sample.main(sample.parse_args(["--ckpt", video_ckpt, *labels, "--output", gif])[1])
    assert f"{FRAMES} frames of 8x8" in capsys.readouterr().out
    with Image.open(gif) as image:
        assert image.n_frames == FRAMES and image.size == side and image.info["loop"] == 0
    mp4 = str(tmp_path / "clips.mp4")
    sample.main(sample.parse_args(["--ckpt", video_ckpt, *labels, "--output", mp4, "--fps", "4"])[1])
    with av.open(mp4) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (side[1], side[0] + side[0] % 2, 3)  # padded to even sides
    plain = ["--ckpt", plain_ckpt, "--model", SMALL_MODEL, "--image-size", "8", "--vae", "none", "--num-classes", "10"]
    for ckpt, output, message in ((["--ckpt", video_ckpt], "clips.png", "samples videos, written as .gif or .mp4"),
                                  (plain, "grid.gif", "samples images, written as .png or .jpg")):
        with pytest.raises(SamplingError, match=message):
            sample.main(sample.parse_args([*ckpt, *labels, "--output", str(tmp_path / output)])[1])
        assert not os.path.exists(tmp_path / output)


def test_sample_ddp_packs_clips_and_resumes(video_ckpt, tmp_path):
    argv = ["--ckpt", video_ckpt, "--num-fid-samples", "3", "--sampler", "dpm-solver", "--num-sampling-steps", "3",
            "--cfg-scale", "2.0"]
    one = str(tmp_path / "one")
    sample_ddp_main(argv + ["--sample-dir", one, "--per-proc-batch-size", "3"])
    arr, labels = npz_of(one)
    assert arr.shape == (3, FRAMES, SMALL_SIZE, SMALL_SIZE, 3) and arr.dtype == np.uint8 and arr.std() > 10
    assert np.array_equal(labels, sampling.random_labels(0, range(3), 10).numpy())
    folder = run_folder(one)  # each clip one PNG, its frames top to bottom
    assert np.array_equal(np.asarray(Image.open(os.path.join(folder, "000001.png"))), arr[1].reshape(-1, 8, 3))
    # Clip i is the same whatever the batch, and a run missing a clip's file samples that clip again.
    os.remove(os.path.join(folder, "000001.png"))
    os.remove(folder + ".npz")
    sample_ddp_main(argv + ["--sample-dir", one, "--per-proc-batch-size", "1"])
    assert np.array_equal(npz_of(one)[0], arr)
    two = str(tmp_path / "two")
    sample_ddp_main(argv + ["--sample-dir", two, "--per-proc-batch-size", "2"])
    assert np.array_equal(npz_of(two)[0], arr)


def test_decode_runs_the_autoencoder_frame_by_frame(tiny_vae_path):
    from vae import load_vae

    vae = load_vae(tiny_vae_path)
    z = torch.randn(2, 4, 3, 4, 4)
    clips = decode(vae, z, 0.5)
    assert clips.shape[:3] == (2, 3, 3)
    for f in range(3):
        torch.testing.assert_close(clips[:, :, f], decode(vae, z[:, :, f], 0.5))
