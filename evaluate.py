"""
Score samples the way ADM's evaluation suite does (FID, sFID, Inception Score, precision, recall), in
PyTorch: a replacement for openai/guided-diffusion's TensorFlow `evaluations/evaluator.py`.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/<run name>.npz        # what sample_ddp.py wrote
    python evaluate.py --save-stats imagenet256_stats.npz imagenet256_train.npz   # summarise a reference once
    python evaluate.py imagenet256_stats.npz samples/<run name>.npz                # ... and reuse it
    python evaluate.py --inception pt_inception-2015-12-05-6726825d.pth REF.npz SAMPLES.npz

Each .npz holds `arr_0`, uint8 images [N x H x W x 3] of any size (what sample_ddp.py writes), read a
batch at a time. A file that also holds `mu`, `sigma`, `mu_s`, `sigma_s` (ADM's reference batches, or
what --save-stats writes) has its FID and sFID statistics taken from there, as ADM does. The five
figures go to stdout in ADM's words, and with the file names, counts and settings into
<samples>.eval-<reference>.json beside the samples (--output to choose). The network is the
2015-12-05 Inception of the FID papers, as ported by torch-fidelity, with pytorch-fid's weights
(fetched once into pretrained_models/, verified against the digest in their name; $DIT_INCEPTION_URL
points at a mirror; --inception takes a local file).

What is computed, after ADM's evaluator (github.com/openai/guided-diffusion, commit 22e0df8,
evaluations/evaluator.py):
- Inception input: the uint8 values as float32, resized to 299x299 with TensorFlow 1's bilinear
  rule, then (x - 128) / 128 (torch-fidelity reproduces both; see InceptionFeatures).
- FID: Frechet distance of the `pool_3` features (2048); sFID: the same on the first 7 channels of
  `mixed_6/conv` (17 x 17 x 7 = 2023, flattened in TensorFlow's height, width, channel order).
- Inception Score: softmax of pool_3 times the logits weight (no bias), over splits of 5000.
- Precision and recall: k-nearest-neighbour manifolds (k = 3) of the pool_3 features, from ADM's
  float16 distances (see Distances; --float32-distances for float32 ones).
"""
import argparse
import dataclasses
import enum
import hashlib
import io
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
from scipy import linalg
from tqdm.auto import tqdm

from downloads import PRETRAINED_DIR, fetch, first_line, sha256_in_name
from files import UserError, atomic_write, run_script

# pytorch-fid's conversion of the TensorFlow graph's weights; torch-fidelity's release of the same
# network has the same digest. The hex after the last "-" is the start of the file's sha256.
INCEPTION_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
INCEPTION_URL_ENV = "DIT_INCEPTION_URL"  # overrides INCEPTION_URL (a mirror, or the tests' local server)

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # ADM's names for the pool and spatial statistics
POOL_DIM, SPATIAL_CHANNELS, SPATIAL_DIM, NUM_LOGITS = 2048, 7, 17 * 17 * 7, 1008
STATS_SHAPES = dict(mu=(POOL_DIM,), sigma=(POOL_DIM, POOL_DIM), mu_s=(SPATIAL_DIM,), sigma_s=(SPATIAL_DIM, SPATIAL_DIM))
IS_SPLIT_SIZE = 5000  # ADM's (and improved-gan's) split size for the Inception Score
NEIGHBOURS = 3  # ADM's k for the precision/recall manifolds
PR_BLOCK = 4096  # rows per distance block: a 4096 x 4096 product in float64 is 128 MiB, at any number of images
FD_EPS = 1e-6  # ADM's diagonal offset when the covariance product is singular


class EvaluationError(UserError, ValueError):
    """An input cannot be scored (not an .npz, wrong layout, too few images, unreadable weights)."""


#################################################################################
#                                  The network                                  #
#################################################################################


def fetch_inception(name=INCEPTION_NAME, dest_dir=PRETRAINED_DIR, base_url=None):
    """
    The Inception weights file `name`, downloaded into dest_dir the first time; the file (downloaded or
    found there) is used only if its sha256 starts with the digest in its name.

    :param base_url: the folder that holds it; default $DIT_INCEPTION_URL or INCEPTION_URL.
    :return: the path of the file.
    :raises downloads.DownloadError.
    """
    base_url = base_url or os.environ.get(INCEPTION_URL_ENV) or INCEPTION_URL
    return fetch(base_url, name, dest_dir, sha256_in_name(name))


class InceptionFeatures(torch.nn.Module):
    """
    The 2015-12-05 Inception network (the TensorFlow graph FID was defined with), as torch-fidelity
    ports it, giving what ADM's evaluator reads from that graph:

    - input: torch-fidelity casts the uint8 values to float32 and resizes to 299x299 with TensorFlow
      1's ResizeBilinear (align_corners=False, no half-pixel centres: output pixel i samples input
      position i * in / out). torch's F.interpolate(mode="bilinear") samples (i + 0.5) * in / out - 0.5,
      a sub-pixel shift that moves FID. It then scales to (x - 128) / 128, as the graph does, where
      torchvision-style ports use x / 127.5 - 1. For 299x299 inputs the resize is the identity.
    - pool_3 (2048) and the bias-free logits (pool_3 times the softmax layer's weight, 1008 classes),
      from the port itself.
    - mixed_6/conv: the graph's mixed, mixed_1, ... mixed_10 are the port's Mixed_5b ... Mixed_7c, so
      mixed_6 is Mixed_6d and its `conv` the 1x1 branch (branch1x1, after its ReLU), [N x 192 x 17 x 17].
      ADM keeps channels 0-6 and flattens them in TensorFlow's NHWC order; the reference batches'
      mu_s and sigma_s are in that order, so it is kept here.
    """

    def __init__(self, state):
        """:param state: the weights, a state_dict of tensors already read safely (see load_inception)."""
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # The port reads its weights with torch.load(weights_only=False) from a path or file object: it is
        # given these checked tensors, saved again in memory, never the user's file.
        checked = io.BytesIO()
        torch.save(state, checked)
        checked.seek(0)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=checked)
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_mixed_6)
        self._mixed_6 = None

    def _keep_mixed_6(self, module, inputs, output):
        self._mixed_6 = output

    def forward(self, images):
        """
        :param images: [N x H x W x 3] uint8.
        :return: pool [N x 2048], spatial [N x 2023], logits [N x 1008], all float32.
        """
        # The port takes [N x 3 x H x W] uint8. Contiguous planes make its resize's row and column
        # gathers twice as fast on the CPU than the NHWC view; see load_inception for the layout after.
        pool, logits = self.net(images.permute(0, 3, 1, 2).contiguous())
        spatial = self._mixed_6[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(images), -1)  # (N, 17 * 17 * 7), HWC order
        self._mixed_6 = None
        return pool, spatial, logits


def load_inception(path, device):
    """
    The network with the weights at `path`: a state_dict in pytorch-fid's layout (the module names
    torchvision's Inception3 uses, 1008 classes). The file is read once, and only as tensors and plain
    containers (weights_only); what was checked is what the network gets, and what the digest is of.

    :return: (the network, the sha256 of the file's bytes that were loaded).
    :raises EvaluationError: the file cannot be read safely, holds non-finite weights or does not fit
        the network.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EvaluationError(f"--inception {path}: {e.strerror or first_line(e)}") from e
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise EvaluationError(f"cannot read {path} as Inception weights: {first_line(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvaluationError(f"{path} holds a {type(state).__name__} that is not a state_dict of tensors "
                              f"(Inception weights)")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad is not None:
        raise EvaluationError(f"{path}: the weights {bad} hold NaN or infinite values")
    try:
        net = InceptionFeatures(state)
    except RuntimeError as e:  # load_state_dict's report: its second line names the keys
        detail = str(e).strip().splitlines()[1:2] or [first_line(e)]
        raise EvaluationError(f"{path} is not the Inception network in pytorch-fid's layout: "
                              f"{detail[0].strip()[:200]}") from e
    # Channels-last weights make every convolution run in NHWC, whatever layout the resize leaves:
    # 1.3-1.4x faster on the CPU (oneDNN) in bench/bench_evaluate.py, and the layout cuDNN prefers.
    return net.to(device, memory_format=torch.channels_last), hashlib.sha256(data).hexdigest()


#################################################################################
#                                 Reading batches                               #
#################################################################################


@dataclasses.dataclass
class NpzBatch:
    """What an .npz holds, from its headers alone."""

    path: str
    keys: list  # the arrays in the file
    shape: tuple = None  # arr_0's [N, H, W, 3]; None when the file holds statistics only
    stats: tuple = None  # ((mu, sigma), (mu_s, sigma_s)) when the file holds them, read and checked

    @property
    def has_stats(self):
        return "mu" in self.keys

    @property
    def size(self):
        return None if self.shape is None else tuple(self.shape[1:3])


def _read_npy_header(f, where):
    """(shape, fortran_order, dtype) from an open .npy stream, positioned at the data after it."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise EvaluationError(f"{where} is not a valid .npy array ({first_line(e)})") from e
    raise EvaluationError(f"{where} is in .npy format version {version}, which this reader does not know")


def inspect_batch(path):
    """
    Open an .npz and check what evaluation needs, reading the images' header only (and the statistics,
    when it holds them).

    :raises EvaluationError: not an .npz; arr_0 not uint8 [N x H x W x 3] or fewer than 2 images or
        empty images; some but not all of mu, sigma, mu_s, sigma_s, or one not a float array of this
        network's size, or not finite; neither images nor statistics.
    """
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
            shape = None
            if "arr_0" in keys:
                with zf.open("arr_0.npy") as f:
                    shape, fortran, dtype = _read_npy_header(f, f"arr_0 in {path}")
                if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
                    layout = "Fortran-ordered " if fortran else ""
                    raise EvaluationError(f"arr_0 in {path} is {layout}{dtype} {tuple(shape)}: images must be uint8 "
                                          f"N x H x W x 3 (NHWC, values 0-255), as sample_ddp.py writes them")
                if shape[0] < 2:
                    raise EvaluationError(f"{path} holds {shape[0]} image(s): at least 2 are needed "
                                          f"(the statistics include a covariance)")
                if 0 in shape[1:3]:
                    raise EvaluationError(f"arr_0 in {path} holds images of {shape[1]}x{shape[2]} pixels")
            for key, expected in STATS_SHAPES.items():
                if key in keys:
                    with zf.open(f"{key}.npy") as f:
                        found, _, dtype = _read_npy_header(f, f"{key} in {path}")
                    if dtype.kind not in "fiu" or tuple(found) != expected:
                        raise EvaluationError(f"{key} in {path} is {dtype} {tuple(found)}, not a float array of "
                                              f"shape {expected} as this network's statistics are")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EvaluationError(f"{path} is not an .npz file ({first_line(e)})") from e
    present = [k for k in STATS_KEYS if k in keys]
    if present and len(present) != len(STATS_KEYS):
        raise EvaluationError(f"{path} holds {', '.join(present)} but not "
                              f"{', '.join(k for k in STATS_KEYS if k not in keys)}: statistics need all four")
    if shape is None and not present:
        raise EvaluationError(f"{path} has no arr_0 (images) and no mu, sigma, mu_s, sigma_s (statistics); "
                              f"it holds {', '.join(keys) or 'nothing'}")
    stats = read_reference_stats(path) if present else None
    return NpzBatch(path, keys, None if shape is None else tuple(shape), stats)


def image_batches(batch, batch_size):
    """
    Yield arr_0 of an inspected .npz a batch at a time, [B x H x W x 3] uint8, reading the zip member
    as a stream (stored or deflated): never more than one batch in memory, as ADM's reader.

    :param batch: inspect_batch's NpzBatch.
    :raises EvaluationError: the file ends early, is corrupt, or holds other images than when inspected.
    """
    path = batch.path
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, fortran, dtype = _read_npy_header(f, f"arr_0 in {path}")
            if (tuple(shape), fortran, dtype) != (batch.shape, False, np.uint8):
                raise EvaluationError(f"{path} changed since it was checked: arr_0 is now {dtype} {tuple(shape)}")
            for start in range(0, shape[0], batch_size):
                batch = np.empty((min(batch_size, shape[0] - start), *shape[1:]), np.uint8)
                got = f.readinto(memoryview(batch).cast("B"))
                if got != batch.nbytes:
                    raise EvaluationError(f"{path} is truncated: arr_0 ends inside image "
                                          f"{start + got // (batch.nbytes // len(batch))} of {shape[0]}")
                yield batch
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EvaluationError(f"{path} is corrupt ({first_line(e)})") from e


def read_reference_stats(path):
    """
    The FID and sFID statistics an .npz holds under ADM's reference-batch names (what --save-stats
    writes): ((mu, sigma), (mu_s, sigma_s)), float64. inspect_batch has checked their headers; the
    arrays are checked again as read (the file may have changed since), never unpickled.

    :raises EvaluationError: an array is not a float array of this network's size, or not finite.
    """
    stats = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key, expected in STATS_SHAPES.items():
                value = data[key]
                if value.dtype.kind not in "fiu" or value.shape != expected:
                    raise EvaluationError(f"{key} in {path} is {value.dtype} {value.shape}, not a float array of "
                                          f"shape {expected} as this network's statistics are")
                stats[key] = value.astype(np.float64)
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, MemoryError) as e:
        raise EvaluationError(f"cannot read the statistics in {path}: {first_line(e)}") from e
    for key, value in stats.items():
        check_finite(value, f"{key} in {path}")
    return (stats["mu"], stats["sigma"]), (stats["mu_s"], stats["sigma_s"])


def check_finite(array, what):
    """:raises EvaluationError: array (numpy or torch) holds NaN or infinite values, named as `what`."""
    finite = array.isfinite().all() if isinstance(array, torch.Tensor) else np.isfinite(array).all()
    if not finite:
        raise EvaluationError(f"{what} holds NaN or infinite values")


#################################################################################
#                                   Features                                    #
#################################################################################


class Moments:
    """
    Mean and covariance (np.cov's, divided by n - 1) of feature rows added batch by batch, in
    float64. Sums are taken around the first batch's mean, which keeps E[x x^T] - mu mu^T from
    cancelling away the digits a covariance of large-mean features needs.
    """

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def add(self, x):
        """:param x: [B x D]."""
        x = x.double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=x.dtype, device=x.device)
        d = x - self.shift  # (B, D)
        self.n += len(x)
        self.sum += d.sum(0)
        self.outer += d.T @ d  # (D, D)

    def result(self):
        """:return: mu [D], sigma [D x D] as float64 numpy arrays."""
        mean = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return (self.shift + mean).cpu().numpy(), sigma.cpu().numpy()


@dataclasses.dataclass
class Summary:
    """What scoring needs of one batch."""

    batch: NpzBatch
    pool: torch.Tensor  # [N x 2048] float32 on the CPU; None for a file of statistics only
    probs: torch.Tensor  # [N x 1008] softmax of the bias-free logits; None likewise
    stats: tuple  # (mu, sigma) of the pool features
    spatial_stats: tuple  # (mu_s, sigma_s) of the spatial features
    precomputed: bool  # the statistics came from the file, not from its images


@torch.no_grad()
def summarize(batch, net, batch_size, device):
    """Run the network over a batch's images (if any) and take its statistics, the file's own
    when it holds them (as ADM does)."""
    if batch.has_stats:
        stats, spatial_stats = batch.stats
    if batch.shape is None:
        return Summary(batch, None, None, stats, spatial_stats, True)
    pools, probs, moments, spatial_moments = [], [], Moments(), Moments()
    total = -(-batch.shape[0] // batch_size)
    for images in tqdm(image_batches(batch, batch_size), total=total, desc=os.path.basename(batch.path),
                       file=sys.stderr):
        pool, spatial, logits = net(torch.from_numpy(images).to(device))
        for features, name in ((pool, "pool_3 features"), (spatial, "mixed_6/conv features"), (logits, "logits")):
            check_finite(features, f"the {name} of {batch.path}")
        moments.add(pool)
        spatial_moments.add(spatial)
        pools.append(pool.cpu())
        probs.append(torch.softmax(logits, dim=1).cpu())
    if not batch.has_stats:
        stats, spatial_stats = moments.result(), spatial_moments.result()
    return Summary(batch, torch.cat(pools), torch.cat(probs), stats, spatial_stats, batch.has_stats)


#################################################################################
#                                    Metrics                                    #
#################################################################################


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=FD_EPS):
    """
    ADM's Frechet distance |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), with scipy's
    sqrtm; when the product is singular (non-finite root), eps is added to both diagonals, and a
    negligible imaginary part of the root is dropped, as there.

    :raises EvaluationError: a statistic is not finite (scipy's sqrtm would not return), or the root has
        a real imaginary part (statistics that are not covariances).
    """
    for value, name in ((mu1, "mu1"), (sigma1, "sigma1"), (mu2, "mu2"), (sigma2, "sigma2")):
        check_finite(value, f"the Frechet distance's {name}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # the singular case is handled below, as ADM's disp=False did
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            print(f"note: the covariance product is singular; adding {eps} to the diagonals (as ADM does)",
                  file=sys.stderr)
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise EvaluationError(f"the Frechet distance's matrix root has an imaginary component of "
                                  f"{np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=IS_SPLIT_SIZE):
    """
    exp(E_x KL(p(y|x) || p(y))) per split of `split_size` rows, averaged over the splits (ADM's, after
    improved-gan), in ADM's own arithmetic: numpy in float32, operation for operation, so the figure is
    ADM's to the last bit on the same probabilities (float64 would move it by up to ~5e-6 relative on
    confident sets, measured with bench/adm_parity.py --offline). One deviation: 0 log 0 counts as 0,
    where ADM's formula gives nan.

    :param probs: [N x C] class probabilities.
    """
    probs = probs.float().cpu().numpy()
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]  # (n, C) float32
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))  # (n, C)
        kl = np.where(part == 0, np.float32(0), kl)  # 0 log 0 = 0
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _blocks(n, size, start=0):
    return [slice(i, min(i + size, n)) for i in range(start, n, size)]


class Distances(enum.Enum):
    """How precision and recall take the squared distances between features."""

    ADM = "adm-float16"  # ADM's float16 arithmetic, float32 for blocks where it is not finite (the default)
    FLOAT32 = "float32"  # float32 throughout (--float32-distances)


# ADM's evaluator (github.com/openai/guided-diffusion, commit 22e0df8183507e13a7813f8d38d51b072ca1e67c,
# evaluations/evaluator.py: DistanceBlock, _batch_pairwise_distances, ManifoldEstimator) takes the distances
# of features cast to float16: |u|^2 - 2 u.v + |v|^2, clamped at 0, each operation rounded to float16; a
# 10000 x 10000 block (its row and column batch size) with any non-finite float16 distance is taken again in
# float32. Its float16 distances are coarse (the float16 step at a distance of 500 is 0.25), so that many
# fall exactly on a radius: precision and recall move by whole percents against float32 arithmetic
# (0.0836 against 0.0752 on pool-like features). Every published figure (DiT-XL/2's 0.83 / 0.57) was
# computed ADM's way, so that is the default here; --float32-distances gives the better-rounded figures.
# What is reproduced, as TensorFlow's CPU kernels do it (the GPU ones accumulate in their own order):
# - |u|^2: tf.reduce_sum of the float16 squares is Eigen's tree reduction in float16: halves while more
#   than 8 x 200 values remain (split on an 8-value packet boundary counted from the row's first value in
#   the batch), 4 accumulators of 8 float16 lanes within a leaf; every addition rounded to float16.
#   _tensorflow_sum repeats it exactly (bench/adm_parity.py --offline checks it bit for bit).
# - u.v: TensorFlow's float16 matmul accumulates in float32 and rounds to float16 once. Its float32
#   summation order depends on the matrix shapes and the CPU, so the product here is summed in float64
#   (products of float16 values are exact in it, and the sum is exact to far below a float16 step) before
#   the same rounding; TensorFlow's own float32 rounding moves about 1 product in 10^4 by one float16 step
#   (bench/adm_parity.py --offline reports whether that changes a figure).
# - The float32 fallback repeats the same graph in float32 (norms bit for bit, the product rounded from
#   float64), so it equals ADM's to float32 rounding, not bit for bit. Pool_3 features, whose squared
#   norms are in the hundreds to thousands, stay far below float16's 65504 and never reach it.
ADM_BATCH = 10_000  # ADM's ManifoldEstimator row_batch_size and col_batch_size
EIGEN_PACKET, EIGEN_LEAF = 8, 200  # float16 lanes per AVX packet; Eigen's LeafSize<half> (1024 for float)


def _rounded_add(a, b):
    """a + b in float32, rounded to a's dtype: what Eigen does for each float16 addition on the CPU (and
    not what a GPU's native float16 addition does: that rounds once, this twice)."""
    return (a.float() + b.float()).to(a.dtype)


def _leaf_sum(x):
    """Eigen's vectorised leaf: 4 packet accumulators over runs of 4 packets, folded into the first, then
    whole packets, then single values; the packet's lanes are summed in float32 (pairwise) and rounded.
    :param x: [N x n] of one dtype. :return: [N]."""
    n, p = x.shape[1], EIGEN_PACKET
    lanes = [torch.zeros(len(x), p, dtype=x.dtype, device=x.device) for _ in range(4)]
    run = n // (4 * p) * 4 * p
    for j in range(0, run, 4 * p):
        for a in range(4):
            lanes[a] = _rounded_add(lanes[a], x[:, j + a * p:j + (a + 1) * p])
    for a in range(1, 4):
        lanes[0] = _rounded_add(lanes[0], lanes[a])
    packets = n // p * p
    for j in range(run, packets, p):
        lanes[0] = _rounded_add(lanes[0], x[:, j:j + p])
    single = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for j in range(packets, n):
        single = _rounded_add(single, x[:, j])
    folded = lanes[0].float()
    while folded.shape[1] > 1:
        folded = folded[:, :folded.shape[1] // 2] + folded[:, folded.shape[1] // 2:]
    return _rounded_add(single, folded[:, 0].to(x.dtype))


def _tree_sum(x, first, leaf):
    """Eigen's InnerMostDimReducer over the rows of x [N x n], which start at flat index `first` of the
    reduced tensor (the split point is aligned from there)."""
    n, p = x.shape[1], EIGEN_PACKET
    if n <= p * leaf:
        return _leaf_sum(x)
    split = p * -(-(first + -(-n // 2)) // p)
    left = min(split - first, n)
    total = _tree_sum(x[:, :left], first, leaf)
    return total if left == n else _rounded_add(total, _tree_sum(x[:, left:], split, leaf))


def _tensorflow_sum(x):
    """tf.reduce_sum(x, 1) on the CPU for the rows of x [N x D], float16 or float32, bit for bit, for x
    fed in ADM's batches of ADM_BATCH rows (a row's flat start index decides where its sum is split)."""
    leaf = EIGEN_LEAF if x.dtype == torch.float16 else 1024
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    starts = torch.arange(len(x), device=x.device) % ADM_BATCH * x.shape[1]
    for offset in range(EIGEN_PACKET):  # rows whose start has the same offset in its packet split alike
        rows = (starts % EIGEN_PACKET == offset).nonzero()[:, 0]
        if len(rows):
            out[rows] = _tree_sum(x[rows], offset, leaf)
    return out


def _squared_norms(x, distances):
    """|u|^2 of each row of x: (float16 norms, float32 norms for the fallback) as ADM's graph takes them,
    or (float32 sums, None)."""
    if distances is Distances.FLOAT32:
        return (x * x).sum(1), None
    x16 = x.half()
    return _tensorflow_sum((x16.float() * x16.float()).half()), _tensorflow_sum(x * x)


def squared_distances(a, b, a_norms=None, b_norms=None, dtype=None):
    """
    [A x B] squared Euclidean distances between the rows of a [A x D] and b [B x D], as ADM's
    max(|u|^2 - 2 u.v + |v|^2, 0), returned as float32.

    :param a_norms, b_norms: the rows' squared norms, in dtype (default: float32 sums).
    :param dtype: None for float32 arithmetic; float16 or float32 for ADM's graph in that dtype: the
        features cast to it, u.v rounded to it from its exact sum, each further operation rounded to it.
    """
    if a_norms is None:
        a_norms, b_norms = (a * a).sum(1), (b * b).sum(1)
    if dtype is None:
        norms = a_norms[:, None] + b_norms[None]  # (A, B)
        return norms.addmm_(a, b.T, alpha=-2).clamp_min_(0)  # -2 a.b added in place: no more (A, B) matrices
    a, b = a.to(dtype).double(), b.to(dtype).double()
    twice_dot = (2 * (a @ b.T).float().to(dtype).float()).to(dtype)  # (A, B): 2 u.v overflows to inf as there
    d = _rounded_add(_rounded_add(a_norms[:, None], -twice_dot), b_norms[None])  # (A, B)
    return d.clamp_min_(0).float()


def _reduced_distance_blocks(a, b, distances, reduce, block):
    """
    Yield (rows, cols, reduce(rows, cols, d)) for blocks d of the squared distances between a and b that
    together cover them, memory a few block x block matrices at any size. With ADM's distances, the
    blocks of one ADM_BATCH x ADM_BATCH pair are all float16, or all float32 when one holds a non-finite
    value (ADM's fallback, decided per pair as there).
    """
    norms_a, norms_b = _squared_norms(a, distances), _squared_norms(b, distances)
    half = distances is Distances.ADM
    dtype = torch.float16 if half else None
    for outer_rows in _blocks(len(a), ADM_BATCH):
        for outer_cols in _blocks(len(b), ADM_BATCH):
            pairs = [(rows, cols) for rows in _blocks(outer_rows.stop, block, outer_rows.start)
                     for cols in _blocks(outer_cols.stop, block, outer_cols.start)]
            parts, finite = [], True
            for rows, cols in pairs:
                d = squared_distances(a[rows], b[cols], norms_a[0][rows], norms_b[0][cols], dtype)
                finite = finite and bool(d.isfinite().all())
                parts.append((rows, cols, reduce(rows, cols, d)))
            if half and not finite:
                parts = [(rows, cols, reduce(rows, cols, squared_distances(
                    a[rows], b[cols], norms_a[1][rows], norms_b[1][cols], torch.float32))) for rows, cols in pairs]
            yield from parts


def knn_radii(x, k=NEIGHBOURS, block=PR_BLOCK, distances=Distances.ADM):
    """
    Squared distance from each row of x [N x D] to its k-th nearest row, the row itself counted as the
    0th (ADM's manifold radii), found block by block.
    """
    nearest = {}  # per row block (by its first row): each column block's smallest distances

    def smallest(rows, cols, d):
        return d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values  # (b, <= k + 1)

    for rows, _, values in _reduced_distance_blocks(x, x, distances, smallest, block):
        nearest.setdefault(rows.start, []).append(values)
    # k + 1: the row itself is the 0th
    return torch.cat([torch.cat(nearest[start], dim=1).kthvalue(k + 1, dim=1).values for start in sorted(nearest)])


def precision_recall(ref, sample, k=NEIGHBOURS, block=PR_BLOCK, distances=Distances.ADM):
    """
    Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them: precision is the
    share of samples inside some reference ball (centre a reference feature, radius its k-th
    neighbour distance), recall the share of references inside some sample ball; inside means a
    distance <= the radius.

    :param ref: [N x D] reference features. :param sample: [M x D] sample features (same device).
    :return: (precision, recall).
    """
    ref_radii, sample_radii = knn_radii(ref, k, block, distances), knn_radii(sample, k, block, distances)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)

    def inside(rows, cols, d):  # d: (b_ref, b_sample)
        return (d <= ref_radii[rows, None]).any(0), (d <= sample_radii[None, cols]).any(1)

    for rows, cols, (samples_inside, refs_inside) in _reduced_distance_blocks(ref, sample, distances, inside,
                                                                               block):
        sample_in[cols] |= samples_inside
        ref_in[rows] |= refs_inside
    return sample_in.double().mean().item(), ref_in.double().mean().item()


def score(ref, sample, device, distances=Distances.ADM):
    """The five figures, as ADM's evaluator computes them (None where the inputs cannot give one)."""
    results = dict(inception_score=inception_score(sample.probs),
                   fid=frechet_distance(*sample.stats, *ref.stats),
                   sfid=frechet_distance(*sample.spatial_stats, *ref.spatial_stats),
                   precision=None, recall=None)
    if ref.pool is None:
        print(f"note: {ref.batch.path} holds statistics only; precision and recall need its images (arr_0)",
              file=sys.stderr)
    elif min(len(ref.pool), len(sample.pool)) <= NEIGHBOURS:
        print(f"note: precision and recall need more than {NEIGHBOURS} images on each side", file=sys.stderr)
    else:
        results["precision"], results["recall"] = precision_recall(ref.pool.to(device), sample.pool.to(device),
                                                                   distances=distances)
    return results


#################################################################################
#                                     Main                                      #
#################################################################################


def inspect_inputs(args):
    """Check every input from its headers before any network work."""
    ref = inspect_batch(args.ref_batch)
    if args.save_stats:
        if ref.shape is None:
            raise EvaluationError(f"--save-stats needs images: {ref.path} has no arr_0")
        if os.path.exists(args.save_stats) and os.path.samefile(args.save_stats, ref.path):
            raise EvaluationError(f"--save-stats {args.save_stats} would overwrite the batch it summarises")
        return ref, None
    sample = inspect_batch(args.sample_batch)
    if sample.shape is None:
        raise EvaluationError(f"{sample.path} has no arr_0: the Inception Score and precision need the samples' images")
    if ref.size is not None and ref.size != sample.size:
        print(f"note: the reference images are {ref.size[0]}x{ref.size[1]}, the samples {sample.size[0]}x"
              f"{sample.size[1]}; both are resized to 299x299 (as in ADM), but the figures compare "
              f"different resolutions", file=sys.stderr)
    return ref, sample


def check_output(path, flag):
    """:raises EvaluationError: `path` cannot be written as a file (checked before any network work)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise EvaluationError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise EvaluationError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EvaluationError(f"{flag} {path}: the folder {folder} is not writable")


def save_stats(path, summary):
    """Write a batch's statistics under ADM's reference-batch names (float64)."""
    (mu, sigma), (mu_s, sigma_s) = summary.stats, summary.spatial_stats
    with atomic_write(path) as f:
        np.savez(f, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


def default_output(ref_path, sample_path):
    """<samples>.eval-<reference>.json beside the samples: scores against two references do not collide."""
    ref_name, sample_name = (os.path.splitext(os.path.basename(p))[0] for p in (ref_path, sample_path))
    return os.path.join(os.path.dirname(sample_path), f"{sample_name}.eval-{ref_name}.json")


def main(args):
    ref_batch, sample_batch = inspect_inputs(args)
    output = args.save_stats or args.output or default_output(ref_batch.path, sample_batch.path)
    check_output(output, "--save-stats" if args.save_stats else "--output")
    weights = args.inception or fetch_inception()
    device = torch.device(args.device)
    # Full float32 convolutions, as the TensorFlow graph runs: cuDNN's TF32 default would round inputs
    # to 10 mantissa bits on Ampere and newer GPUs.
    torch.backends.cudnn.allow_tf32 = False
    net, digest = load_inception(weights, device)
    distances = Distances.FLOAT32 if args.float32_distances else Distances.ADM
    settings = dict(inception=os.path.basename(weights), inception_sha256=digest, batch_size=args.batch_size,
                    device=str(device), is_split_size=IS_SPLIT_SIZE, neighbours=NEIGHBOURS, fd_eps=FD_EPS,
                    distances=distances.value, torch=torch.__version__)

    print(f"computing {'statistics' if args.save_stats else 'reference batch activations'}...", file=sys.stderr)
    ref = summarize(ref_batch, net, args.batch_size, device)
    if args.save_stats:
        save_stats(args.save_stats, ref)
        print(f"wrote {args.save_stats}: mu, sigma, mu_s, sigma_s of the {ref_batch.shape[0]} images "
              f"in {ref_batch.path}")
        return
    print("computing sample batch activations...", file=sys.stderr)
    sample = summarize(sample_batch, net, args.batch_size, device)

    print("computing evaluations...", file=sys.stderr)
    results = score(ref, sample, device, distances)
    for name, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                      ("Precision", "precision"), ("Recall", "recall")):
        print(f"{name}:", "not computed" if results[key] is None else results[key])
    not_finite = [key for key, value in results.items() if value is not None and not np.isfinite(value)]
    if not_finite:
        raise EvaluationError(f"{', '.join(not_finite)} came out non-finite; nothing written")

    record = dict(results, samples=sample_batch.path, reference=ref_batch.path,
                  num_samples=sample_batch.shape[0],
                  num_reference=None if ref_batch.shape is None else ref_batch.shape[0],
                  sample_size=list(sample_batch.size),
                  reference_size=None if ref_batch.size is None else list(ref_batch.size),
                  reference_stats="precomputed" if ref.precomputed else "computed",
                  sample_stats="precomputed" if sample.precomputed else "computed", settings=settings)
    with atomic_write(output, "w") as f:
        json.dump(record, f, indent=2, allow_nan=False)
    print(f"wrote {output}", file=sys.stderr)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("ref_batch", help="reference .npz (images in arr_0, and/or ADM's mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_batch", nargs="?", help="samples .npz (images in arr_0)")
    parser.add_argument("--save-stats", metavar="OUT.npz",
                        help="write the one batch's mu, sigma, mu_s, sigma_s to OUT.npz instead of scoring")
    parser.add_argument("--inception", metavar="PATH",
                        help=f"Inception weights in pytorch-fid's layout (default: {INCEPTION_NAME}, "
                             f"downloaded into {PRETRAINED_DIR}/)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--float32-distances", action="store_true",
                        help="precision and recall from float32 distances instead of ADM's float16 ones (whose "
                             "figures are the published ones; see Distances)")
    parser.add_argument("--output", metavar="PATH.json",
                        help="where to write the figures (default: <samples>.eval-<reference>.json beside the samples)")
    args = parser.parse_args(argv)
    if args.save_stats and args.sample_batch:
        parser.error("--save-stats takes one batch: python evaluate.py --save-stats OUT.npz BATCH.npz")
    if not args.save_stats and not args.sample_batch:
        parser.error("give a reference batch and a sample batch (or --save-stats OUT.npz BATCH.npz)")
    if args.save_stats and args.output:
        parser.error("--output is the scores' JSON; --save-stats writes statistics only")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
