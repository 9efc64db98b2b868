"""evaluate.py: the network against pytorch-fid's with the same (random) weights, each metric against
its closed form, the streaming reader, the CLI end to end and bad inputs (the weights download: test_downloads)."""
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from unittest import mock

import numpy as np
import pytest
import torch

import evaluate
from evaluate import EvaluationError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: every test here on one thread


#################################################################################
#                                  The network                                  #
#################################################################################


def pytorch_fid_network(state_dict):
    """pytorch-fid's FID Inception (its own blocks and wiring) with the given weights instead of a
    download, fed already preprocessed input; and its Mixed_6d (the graph's mixed_6)."""
    import pytorch_fid.inception as pfi

    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=state_dict):
        net = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    return net, net.blocks[2][6]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights in pytorch-fid's format: the state_dict of its fid_inception_v3(), saved as its
    released file is. Convolutions get He-scaled weights (torch's default init shrinks the signal
    layer by layer until the features barely depend on the image) and batch norms random statistics,
    so that every loaded value matters."""
    import pytorch_fid.inception as pfi
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                            init_weights=False).state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith("running_mean"):
            value.uniform_(-0.1, 0.1)
        elif key.endswith("conv.weight"):
            value.normal_(0, (2 / value[0].numel()) ** 0.5)
    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=state):
        network = pfi.fid_inception_v3()  # a strict load: the keys are exactly pytorch-fid's
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(network.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(weights):
    """load_inception(weights) once for the module: (network, digest, the torch.load calls as (type of
    the source, weights_only), the files opened)."""
    loads, opened, real_load, real_open = [], [], torch.load, open

    def recorded_load(f, *args, **kwargs):
        loads.append((type(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    def recorded_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    with mock.patch.object(torch, "load", recorded_load), mock.patch("builtins.open", recorded_open):
        net, digest = evaluate.load_inception(weights, "cpu")
    return net, digest, loads, opened


@pytest.fixture(scope="module")
def net(loaded):
    return loaded[0]


@torch.no_grad()
def test_features_equal_pytorch_fids_network_on_the_same_input(weights, net):
    """For 299x299 images (no resize) the port's features equal pytorch-fid's network's on
    (x - 128) / 128: pool_3, the bias-free logits and mixed_6/conv's first 7 channels in HWC order."""
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8)
    pool, spatial, logits = net(images)

    state = torch.load(weights, weights_only=True)
    theirs, mixed_6 = pytorch_fid_network(state)
    kept = {}
    mixed_6.branch1x1.register_forward_hook(lambda m, i, out: kept.update(out=out))
    expected_pool = theirs((images.permute(0, 3, 1, 2).float() - 128) / 128)[0].flatten(1)
    out = kept["out"]  # (N, 192, 17, 17)
    expected_spatial = torch.stack([out[:, c, h, w] for h in range(17) for w in range(17) for c in range(7)], 1)

    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    assert pool.std() > 0.1 and spatial.std() > 0.1  # features that depend on the image
    # float32 noise only: features are O(1-10), and the two runs lay memory out differently.
    torch.testing.assert_close(pool, expected_pool, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(spatial, expected_spatial, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected_pool @ state["fc.weight"].T, rtol=1e-4, atol=1e-4)


def tf1_resize(images, size):
    """TensorFlow 1's ResizeBilinear (align_corners=False), written out: output pixel i reads input
    position i * in / out, interpolating between floor and floor + 1 (clamped at the edge).
    :param images: [N x H x W x C] float64 numpy."""
    def axis(n_in):
        pos = np.arange(size) * (n_in / size)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo

    (y0, y1, fy), (x0, x1, fx) = axis(images.shape[1]), axis(images.shape[2])
    rows = images[:, y0] * (1 - fy)[None, :, None, None] + images[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


@torch.no_grad()
def test_small_images_are_resized_as_tensorflow_1_does(weights, net):
    """A 40x40 image's features are those of TF1's bilinear resize to 299, then (x - 128) / 128; torch's
    default half-pixel resize would give other features."""
    torch.manual_seed(2)
    images = torch.randint(0, 256, (1, 40, 40, 3), dtype=torch.uint8)
    pool = net(images)[0]
    theirs, _ = pytorch_fid_network(torch.load(weights, weights_only=True))
    resized = torch.from_numpy(tf1_resize(images.double().numpy(), 299)).float().permute(0, 3, 1, 2)
    torch.testing.assert_close(pool, theirs((resized - 128) / 128)[0].flatten(1), rtol=1e-4, atol=1e-4)
    half_pixel = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float(), size=(299, 299), mode="bilinear")
    assert (pool - theirs((half_pixel - 128) / 128)[0].flatten(1)).abs().max() > 1e-2


#################################################################################
#                                    Metrics                                    #
#################################################################################


def closed_form_fd(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), through symmetric eigendecompositions."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


def test_frechet_distance_of_a_set_to_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((300, 24)) * 3 + 1
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(1)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2, s1, s2 = rng.standard_normal(6), rng.standard_normal(6), rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # Covariances that do not commute.
    a, b = rng.standard_normal((16, 16)), rng.standard_normal((16, 16))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(16), b @ b.T + 0.1 * np.eye(16)
    assert evaluate.frechet_distance(mu1[:1].repeat(16), sigma1, mu2[:1].repeat(16), sigma2) == pytest.approx(
        closed_form_fd(mu1[:1].repeat(16), sigma1, mu2[:1].repeat(16), sigma2), rel=1e-8)


def test_frechet_distance_falls_back_to_an_offset_when_the_root_is_not_finite(monkeypatch, capsys):
    """ADM's fallback: a non-finite sqrtm result is recomputed with eps on both diagonals."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    sigma1, sigma2, mu = a @ a.T, b @ b.T, np.zeros(8)
    real_sqrtm, calls = evaluate.linalg.sqrtm, []

    def first_call_fails(m):
        calls.append(m)
        return np.full_like(m, np.inf) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(evaluate.linalg, "sqrtm", first_call_fails)
    eps = 1e-2  # large enough for the offset to show in the figure
    fd = evaluate.frechet_distance(mu, sigma1, mu, sigma2, eps=eps)
    offset = eps * np.eye(8)
    assert len(calls) == 2 and "singular" in capsys.readouterr().err
    root = real_sqrtm((sigma1 + offset) @ (sigma2 + offset)).real
    expected = np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root)
    assert fd == pytest.approx(expected, rel=1e-10)


def test_moments_streamed_in_batches_equal_numpys_mean_and_cov():
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((103, 12)) + 1e4)  # a large mean
    moments = evaluate.Moments()
    for part in x.split(10):
        moments.add(part)
    mu, sigma = moments.result()
    np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-9, atol=1e-9)


def test_inception_score_uniform_is_one_and_confident_over_k_classes_is_k():
    assert evaluate.inception_score(torch.full((100, 1008), 1 / 1008)) == pytest.approx(1.0, abs=1e-5)  # float32 logs
    one_hot = torch.nn.functional.one_hot(torch.arange(10_000) % 8, 32).float()  # 0 log 0 everywhere else
    assert evaluate.inception_score(one_hot) == pytest.approx(8.0, rel=1e-6)
    # Splits of 5000 are scored apart and averaged: confident over 4 classes, then uniform.
    mixed = torch.cat([torch.nn.functional.one_hot(torch.arange(5000) % 4, 32).float(), torch.full((5000, 32), 1 / 32)])
    assert evaluate.inception_score(mixed) == pytest.approx((4 + 1) / 2, rel=1e-6)


def test_inception_score_is_adms_float32_figure():
    """ADM computes the score in numpy float32, which on confident predictions is 2.4e-6 away from the exact
    value; evaluate.py gives ADM's figure. 163.14561462402344 is what ADM's Evaluator.compute_inception_score
    (guided-diffusion 22e0df8, numpy 2.4.6) returned for these probabilities; float64 gives 163.145218828."""
    logits = np.random.default_rng(7).standard_normal((2000, 1008)).astype(np.float32) * np.float32(5)
    e = np.exp(logits - logits.max(1, keepdims=True))
    probs = (e / e.sum(1, keepdims=True)).astype(np.float32)
    assert evaluate.inception_score(torch.from_numpy(probs)) == pytest.approx(163.14561462402344, rel=1e-7)


def test_precision_recall_of_a_set_with_itself_is_one_and_far_apart_sets_zero():
    x = torch.randn(60, 32, generator=torch.Generator().manual_seed(4))
    assert evaluate.precision_recall(x, x.clone()) == (1.0, 1.0)
    assert evaluate.precision_recall(x, x + 1000) == (0.0, 0.0)


def test_precision_recall_on_a_worked_example():
    """1-D, k = 3. Reference 0..3: radii 3, 2, 2, 3 (distances), so its manifold is [-3, 6]; only the
    sample at 5 is inside (precision 1/4). Samples 5, 10, 20, 21: the ball around 5 has radius 16 and
    holds every reference (recall 1)."""
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    sample = torch.tensor([[5.0], [10.0], [20.0], [21.0]])
    torch.testing.assert_close(evaluate.knn_radii(ref), torch.tensor([9.0, 4.0, 4.0, 9.0]))
    assert evaluate.precision_recall(ref, sample) == (0.25, 1.0)


def test_precision_recall_in_blocks_equal_the_whole_distance_matrix():
    """Blocked radii and membership (memory bounded at any size) give what the full matrices give."""
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(37, 8, generator=g, dtype=torch.float64)
    sample = torch.randn(53, 8, generator=g, dtype=torch.float64) + 0.3
    d_ref, d_sample, d_cross = (torch.cdist(a, b) ** 2 for a, b in ((ref, ref), (sample, sample), (ref, sample)))
    r_ref, r_sample = d_ref.sort(1).values[:, 3], d_sample.sort(1).values[:, 3]
    precision = (d_cross <= r_ref[:, None]).any(0).double().mean().item()
    recall = (d_cross <= r_sample[None]).any(1).double().mean().item()
    assert 0.2 < precision < 1 and 0.2 < recall < 1  # a case where membership is decided row by row
    float32 = evaluate.Distances.FLOAT32  # plain arithmetic, in the features' dtype
    torch.testing.assert_close(evaluate.knn_radii(ref, block=5, distances=float32), r_ref)
    assert evaluate.precision_recall(ref, sample, block=5, distances=float32) == pytest.approx((precision, recall),
                                                                                               abs=1e-12)
    assert evaluate.precision_recall(ref, sample, block=7, distances=float32) == \
        evaluate.precision_recall(ref, sample, distances=float32)
    ref, sample = ref.float() * 30, sample.float() * 30  # ADM's float16 distances: the same in any blocks
    torch.testing.assert_close(evaluate.knn_radii(ref, block=5), evaluate.knn_radii(ref), rtol=0, atol=0)
    assert evaluate.precision_recall(ref, sample, block=7) == evaluate.precision_recall(ref, sample)


def adm_float16_distances(a, b):
    """ADM's DistanceBlock in numpy float16 (each operation rounded to float16 from float32, as numpy and
    Eigen do on the CPU), for features of under 8 dims, whose squared norms TensorFlow sums one value
    after another; u.v summed exactly, then rounded."""
    a16, b16 = a.astype(np.float16), b.astype(np.float16)

    def norms(x):
        total = np.zeros(len(x), np.float16)
        for j in range(x.shape[1]):
            total = total + x[:, j] * x[:, j]
        return total

    with np.errstate(over="ignore", invalid="ignore"):
        dot = (a16.astype(np.float64) @ b16.astype(np.float64).T).astype(np.float32).astype(np.float16)
        d = (norms(a16)[:, None] - np.float16(2) * dot) + norms(b16)[None]
    return np.maximum(d, np.float16(0)).astype(np.float32)


def test_precision_recall_take_adms_float16_distances_by_default():
    """The worked example 100 and 200 away from 0. At 100 the float16 squares (step 8 near 10^4) give
    radii 8, 8, 0, 8 where float32 gives 9, 4, 4, 9. At 200, 2 u.v >= 80000 overflows float16 to inf, so
    every ADM distance is max(-inf, 0) = 0 (finite, so no float32 fallback): precision = recall = 1, where
    float32 distances give 1/4 and 1."""
    steps = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([[5.0], [10.0], [20.0], [21.0]])
    ref, sample = (x + 100 for x in steps)
    d = adm_float16_distances(ref.numpy(), ref.numpy())
    torch.testing.assert_close(evaluate.knn_radii(ref), torch.from_numpy(np.partition(d, 3, axis=1)[:, 3]))
    torch.testing.assert_close(evaluate.knn_radii(ref), torch.tensor([8.0, 8.0, 0.0, 8.0]))
    torch.testing.assert_close(evaluate.knn_radii(ref, distances=evaluate.Distances.FLOAT32),
                               torch.tensor([9.0, 4.0, 4.0, 9.0]))
    ref, sample = (x + 200 for x in steps)
    assert (adm_float16_distances(ref.numpy(), sample.numpy()) == 0).all()
    assert evaluate.precision_recall(ref, sample) == (1.0, 1.0)
    assert evaluate.precision_recall(ref, sample, distances=evaluate.Distances.FLOAT32) == (0.25, 1.0)


def test_a_block_with_a_non_finite_float16_distance_is_taken_in_float32(monkeypatch):
    """ADM decides per row batch x column batch (10000 each; 4 here): a value of 300 squares to 90000,
    past float16's 65504, so the blocks that hold its row or column are float32 throughout, even their
    sub-blocks (block=2) that are finite in float16; the others stay float16."""
    monkeypatch.setattr(evaluate, "ADM_BATCH", 4)
    x = np.random.default_rng(6).uniform(90, 110, (8, 3)).astype(np.float32)
    x[0, 0] = 300
    d16 = adm_float16_distances(x, x)
    sq = (x * x).astype(np.float32)
    d32 = np.maximum((sq[:, 0] + sq[:, 1] + sq[:, 2])[:, None] - 2 * (x.astype(np.float64) @ x.T.astype(np.float64))
                     .astype(np.float32) + (sq[:, 0] + sq[:, 1] + sq[:, 2])[None], 0)
    expected = d16.copy()
    expected[:4], expected[:, :4] = d32[:4], d32[:, :4]  # the blocks with row 0 or column 0
    assert not np.isfinite(d16[:4, :4]).all() and (expected != d16).any()
    radii = torch.from_numpy(np.partition(expected, 3, axis=1)[:, 3])
    torch.testing.assert_close(evaluate.knn_radii(torch.from_numpy(x), block=2), radii, rtol=0, atol=0)


def test_tensorflows_float16_sum_is_a_tree_of_packets():
    """2048 then 63 ones, in float16 (step 2 above 2048): one value after another gives 2048, the exact
    sum rounds to 2112; TensorFlow's CPU kernel gives 2110 (measured with tensorflow-cpu 2.21): its
    first lane holds 2048 + 1 -> 2048 and the 31 others 1 + 1, four packet accumulators fold into one
    (lane 0: 2048 + 2 + 2 + 2 = 2054, the others 8), and the lanes add up to 2054 + 7 * 8 = 2110."""
    x = torch.ones(1, 64, dtype=torch.float16)
    x[0, 0] = 2048
    assert evaluate._tensorflow_sum(x).item() == 2110


#################################################################################
#                                Reading batches                                #
#################################################################################


def images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_image_batches_stream_arr_0(tmp_path, save):
    arr, path = images(7, 5), str(tmp_path / "b.npz")
    save(path, arr_0=arr, labels=np.arange(7))
    batches = list(evaluate.image_batches(evaluate.inspect_batch(path), 3))
    assert [len(b) for b in batches] == [3, 3, 1] and np.array_equal(np.concatenate(batches), arr)
    assert evaluate.inspect_batch(path).shape == (7, 5, 5, 3)


def test_truncated_npz_is_an_error(tmp_path):
    path = tmp_path / "b.npz"
    np.savez(path, arr_0=images(20, 16))
    batch = evaluate.inspect_batch(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EvaluationError, match="not an .npz|corrupt|truncated"):
        list(evaluate.image_batches(batch, 4))


def test_a_batch_changed_after_its_check_is_refused(tmp_path):
    path = str(tmp_path / "b.npz")
    np.savez(path, arr_0=images(4, 8))
    batch = evaluate.inspect_batch(path)
    np.savez(path, arr_0=images(4, 8).astype(np.float32))
    with pytest.raises(EvaluationError, match="changed since it was checked: arr_0 is now float32"):
        list(evaluate.image_batches(batch, 2))


def bad_inputs(tmp_path):
    """(arguments, part of the one-line message) for inputs evaluate.py refuses."""
    good = str(tmp_path / "good.npz")
    np.savez(good, arr_0=images(4, 8))
    cases = []

    def npz(name, **arrays):
        path = str(tmp_path / name)
        np.savez(path, **arrays)
        return path

    text = tmp_path / "notes.npz"
    text.write_text("not a zip")
    cases.append(([str(text), good], "is not an .npz file"))
    cases.append(([str(tmp_path / "missing.npz"), good], "no such file"))
    cases.append(([good, npz("labels.npz", labels=np.arange(4))], "has no arr_0"))
    cases.append(([good, npz("float.npz", arr_0=images(4, 8).astype(np.float32))], "must be uint8"))
    cases.append(([good, npz("nchw.npz", arr_0=images(4, 8).transpose(0, 3, 1, 2))], "NHWC"))
    cases.append(([good, npz("one.npz", arr_0=images(1, 8))], "at least 2"))
    cases.append(([npz("part.npz", arr_0=images(4, 8), mu=np.zeros(2048)), good], "need all four"))
    stats = dict(mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    cases.append(([good, npz("stats.npz", **stats)], "the Inception Score and precision need"))
    cases.append((["--save-stats", good, good], "would overwrite"))
    cases.append(([good, npz("empty.npz", arr_0=np.zeros((4, 0, 0, 3), np.uint8))], "holds images of 0x0 pixels"))
    small = dict(sigma=np.eye(2), mu_s=np.zeros(2), sigma_s=np.eye(2))  # mu is checked first: these are never read
    for name, value in (("object", np.array([None] * 2048)), ("string", np.array(["0.5"] * 2048)),
                        ("short", np.zeros(10))):
        cases.append(([npz(f"{name}.npz", mu=value, **small), good], rf"mu in .*{name}.npz is .*not a float"))
    huge = tmp_path / "huge.npz"  # mu's header claims 2^20 x 2^20 float64 (8 TiB)
    with zipfile.ZipFile(huge, "w") as zf:
        for key, value in dict(small, mu=None).items():
            with zf.open(f"{key}.npy", "w") as f:
                if key == "mu":  # the header alone
                    np.lib.format.write_array_header_1_0(f, dict(descr="<f8", fortran_order=False, shape=(2**20,) * 2))
                else:
                    np.lib.format.write_array(f, value)
    cases.append(([str(huge), good], r"mu in .*huge.npz is float64 \(1048576, 1048576\)"))
    for key, value in (("sigma", np.nan), ("mu_s", np.inf)):
        bad = {k: v.copy() for k, v in stats.items()}
        bad[key][3] = value
        cases.append(([npz(f"nan_{key}.npz", **bad), good], rf"{key} in .*nan_{key}.npz holds NaN or infinite values"))
    folder = tmp_path / "folder"
    folder.mkdir()
    cases.append(([good, good, "--output", str(folder)], "--output .* is a folder"))
    cases.append(([good, good, "--output", str(tmp_path / "missing" / "s.json")], "missing does not exist"))
    cases.append((["--save-stats", str(folder), good], "--save-stats .* is a folder"))
    cases.append((["--save-stats", str(tmp_path / "missing" / "s.npz"), good], "missing does not exist"))
    return cases


def test_bad_inputs_are_one_line_errors_before_any_network_work(tmp_path):
    for argv, message in bad_inputs(tmp_path):
        _, args = evaluate.parse_args(argv + ["--inception", str(tmp_path / "never-read.pth")])
        with pytest.raises(EvaluationError, match=message) as e:
            evaluate.main(args)
        assert "\n" not in str(e.value)


def test_cli_reports_a_bad_input_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("<html>not found</html>")
    good = str(tmp_path / "good.npz")
    np.savez(good, arr_0=images(3, 8))
    p = subprocess.run([sys.executable, "evaluate.py", str(bad), good], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate.py: error: ") and "is not an .npz file" in last


def test_statistics_changed_after_their_check_are_refused_when_read(tmp_path):
    path = str(tmp_path / "stats.npz")
    np.savez(path, mu=np.zeros(10), sigma=np.eye(10), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(EvaluationError, match=r"mu in .* is float64 \(10,\), not a float array of shape \(2048,\)"):
        evaluate.read_reference_stats(path)
    np.savez(path, mu=np.array([None] * 2048), sigma=np.eye(10), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(EvaluationError, match="cannot read the statistics in .*: Object arrays cannot be loaded"):
        evaluate.read_reference_stats(path)


def test_weights_are_read_once_as_tensors_and_the_network_gets_those(weights, loaded):
    """torch-fidelity would torch.load a path with weights_only=False; it gets the checked tensors in
    memory instead, and the file is opened once (a file swapped after the check is never read)."""
    net, digest, loads, opened = loaded
    assert opened.count(weights) == 1 and digest == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert loads[0] == (evaluate.io.BytesIO, True) and all(kind is evaluate.io.BytesIO for kind, _ in loads)
    state = torch.load(weights, weights_only=True)
    torch.testing.assert_close(net.net.fc.weight, state["fc.weight"], rtol=0, atol=0)


def test_unreadable_or_non_finite_weights_are_errors(tmp_path):
    nan = tmp_path / "nan.pth"
    torch.save({"Mixed_6d.branch1x1.conv.weight": torch.tensor([1.0, float("nan")])}, nan)
    with pytest.raises(EvaluationError, match="the weights Mixed_6d.branch1x1.conv.weight hold NaN"):
        evaluate.load_inception(str(nan), "cpu")
    with pytest.raises(EvaluationError, match="--inception .*: Is a directory"):
        evaluate.load_inception(str(tmp_path), "cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(EvaluationError, match="cannot read .* as Inception weights"):
        evaluate.load_inception(str(junk), "cpu")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(EvaluationError, match="not the Inception network in pytorch-fid's layout"):
        evaluate.load_inception(str(other), "cpu")


#################################################################################
#                                 End to end                                    #
#################################################################################


def test_cli_end_to_end_writes_the_json_and_reuses_saved_statistics(tmp_path, weights, monkeypatch, capsys):
    """Reference (4 images, 16x16) and samples (4, 24x24) through the CLI's parser and main: ADM's five
    lines, the JSON beside the samples; FID on pool statistics, sFID on spatial ones; --save-stats
    writes the very statistics scoring uses, and a statistics-only reference is scored with them.
    scipy's sqrtm takes a minute on 2048 x 2048 on this machine, so the distance is recorded and
    replaced here (the metric tests check it)."""
    ref, samples = str(tmp_path / "ref.npz"), str(tmp_path / "run.npz")
    np.savez(ref, arr_0=images(4, 16, seed=1))
    np.savez(samples, arr_0=images(4, 24, seed=2), labels=np.arange(4))
    calls = []

    def recorded_fd(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(len(mu1)) + 0.5

    monkeypatch.setattr(evaluate, "frechet_distance", recorded_fd)
    loaded, load = {}, evaluate.load_inception  # the network is built once; the later runs reuse it
    monkeypatch.setattr(evaluate, "load_inception", lambda path, device: loaded.get(path) or
                        loaded.setdefault(path, load(path, device)))
    common = ["--inception", weights, "--device", "cpu", "--batch-size", "3"]

    evaluate.main(evaluate.parse_args([ref, samples, *common])[1])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert "16x16, the samples 24x24" in err
    record = json.loads((tmp_path / "run.eval-ref.json").read_text())
    assert record["fid"] == 2048.5 and record["sfid"] == 2023.5 and lines[1] == "FID: 2048.5"
    assert 1 <= record["inception_score"] <= 1008 and 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
    assert (record["num_samples"], record["num_reference"], record["sample_size"], record["reference_size"]) == \
        (4, 4, [24, 24], [16, 16])
    assert record["reference_stats"] == record["sample_stats"] == "computed"
    assert record["settings"]["inception_sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert record["settings"]["distances"] == "adm-float16"
    assert record["samples"] == samples and record["reference"] == ref
    ref_mu, ref_sigma = calls[0][2], calls[0][3]
    assert ref_sigma.shape == (2048, 2048) and calls[1][2].shape == (2023,)

    stats = str(tmp_path / "ref_stats.npz")
    evaluate.main(evaluate.parse_args(["--save-stats", stats, ref, *common])[1])
    with np.load(stats) as saved:
        assert sorted(saved.files) == ["mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(saved["mu"], ref_mu)
        np.testing.assert_array_equal(saved["sigma"], ref_sigma)
        np.testing.assert_array_equal(saved["mu_s"], calls[1][2])

    evaluate.main(evaluate.parse_args([stats, samples, *common, "--output", str(tmp_path / "scores.json"),
                                       "--float32-distances"])[1])
    out, err = capsys.readouterr()
    record = json.loads((tmp_path / "scores.json").read_text())
    assert record["settings"]["distances"] == "float32"
    assert record["reference_stats"] == "precomputed" and record["num_reference"] is None
    assert record["precision"] is None and "Precision: not computed" in out and "statistics only" in err
    np.testing.assert_array_equal(calls[-2][2], ref_mu)  # the FID used the saved reference statistics
