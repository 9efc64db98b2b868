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
- Precision and recall: k-nearest-neighbour manifolds (k = 3) of the pool_3 features.
"""
import argparse
import dataclasses
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
from scipy import linalg
from tqdm.auto import tqdm

from downloads import PRETRAINED_DIR, fetch, first_line, sha256, sha256_in_name
from files import UserError, atomic_write, run_script

# pytorch-fid's conversion of the TensorFlow graph's weights; torch-fidelity's release of the same
# network has the same digest. The hex after the last "-" is the start of the file's sha256.
INCEPTION_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
INCEPTION_URL_ENV = "DIT_INCEPTION_URL"  # overrides INCEPTION_URL (a mirror, or the tests' local server)

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # ADM's names for the pool and spatial statistics
POOL_DIM, SPATIAL_CHANNELS, SPATIAL_DIM, NUM_LOGITS = 2048, 7, 17 * 17 * 7, 1008
IS_SPLIT_SIZE = 5000  # ADM's (and improved-gan's) split size for the Inception Score
NEIGHBOURS = 3  # ADM's k for the precision/recall manifolds
PR_BLOCK = 4096  # rows per distance block: 4096 x 4096 float32 is 64 MiB, at any number of images
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

    def __init__(self, weights):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights)
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
    torchvision's Inception3 uses, 1008 classes).

    :raises EvaluationError: the file cannot be read safely or does not fit the network.
    """
    if not os.path.isfile(path):
        raise EvaluationError(f"--inception {path}: no such file")
    # torch-fidelity reads the file with weights_only=False; reading it safely first means it only
    # ever unpickles tensors and plain containers.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise EvaluationError(f"cannot read {path} as Inception weights: {first_line(e)}") from e
    if not isinstance(state, dict):
        raise EvaluationError(f"{path} holds a {type(state).__name__}, not a state_dict of Inception weights")
    try:
        net = InceptionFeatures(path)
    except RuntimeError as e:  # load_state_dict's report: its second line names the keys
        detail = str(e).strip().splitlines()[1:2] or [first_line(e)]
        raise EvaluationError(f"{path} is not the Inception network in pytorch-fid's layout: "
                              f"{detail[0].strip()[:200]}") from e
    # Channels-last weights make every convolution run in NHWC, whatever layout the resize leaves:
    # 1.3-1.4x faster on the CPU (oneDNN) in bench/bench_evaluate.py, and the layout cuDNN prefers.
    return net.to(device, memory_format=torch.channels_last)


#################################################################################
#                                 Reading batches                               #
#################################################################################


@dataclasses.dataclass
class NpzBatch:
    """What an .npz holds, from its headers alone."""

    path: str
    keys: list  # the arrays in the file
    shape: tuple = None  # arr_0's [N, H, W, 3]; None when the file holds statistics only

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
    Open an .npz and check what evaluation needs, reading headers only.

    :raises EvaluationError: not an .npz; arr_0 not uint8 [N x H x W x 3] or fewer than 2 images;
        some but not all of mu, sigma, mu_s, sigma_s; neither images nor statistics.
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
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EvaluationError(f"{path} is not an .npz file ({first_line(e)})") from e
    present = [k for k in STATS_KEYS if k in keys]
    if present and len(present) != len(STATS_KEYS):
        raise EvaluationError(f"{path} holds {', '.join(present)} but not "
                              f"{', '.join(k for k in STATS_KEYS if k not in keys)}: statistics need all four")
    if shape is None and not present:
        raise EvaluationError(f"{path} has no arr_0 (images) and no mu, sigma, mu_s, sigma_s (statistics); "
                              f"it holds {', '.join(keys) or 'nothing'}")
    return NpzBatch(path, keys, None if shape is None else tuple(shape))


def image_batches(path, batch_size):
    """
    Yield arr_0 of an .npz a batch at a time, [B x H x W x 3] uint8, reading the zip member as a
    stream (stored or deflated): never more than one batch in memory, as ADM's reader.

    :raises EvaluationError: the file ends early or is corrupt.
    """
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, _, _ = _read_npy_header(f, f"arr_0 in {path}")
            for start in range(0, shape[0], batch_size):
                batch = np.empty((min(batch_size, shape[0] - start), *shape[1:]), np.uint8)
                got = f.readinto(memoryview(batch).cast("B"))
                if got != batch.nbytes:
                    raise EvaluationError(f"{path} is truncated: arr_0 ends inside image "
                                          f"{start + got // (batch.nbytes // len(batch))} of {shape[0]}")
                yield batch
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EvaluationError(f"{path} is corrupt ({first_line(e)})") from e


def read_stats(path):
    """ADM's precomputed statistics of a batch: ((mu, sigma), (mu_s, sigma_s))."""
    with np.load(path) as data:
        stats = [np.asarray(data[k], np.float64) for k in STATS_KEYS]
    for (mu, sigma), dim, names in ((stats[:2], POOL_DIM, "mu, sigma"), (stats[2:], SPATIAL_DIM, "mu_s, sigma_s")):
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise EvaluationError(f"{path}: {names} are {mu.shape} and {sigma.shape}, not ({dim},) and "
                                  f"({dim}, {dim}) as this network's features are")
    return tuple(stats[:2]), tuple(stats[2:])


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
    if batch.shape is None:
        stats, spatial_stats = read_stats(batch.path)
        return Summary(batch, None, None, stats, spatial_stats, True)
    pools, probs, moments, spatial_moments = [], [], Moments(), Moments()
    total = -(-batch.shape[0] // batch_size)
    for images in tqdm(image_batches(batch.path, batch_size), total=total, desc=os.path.basename(batch.path),
                       file=sys.stderr):
        pool, spatial, logits = net(torch.from_numpy(images).to(device))
        moments.add(pool)
        spatial_moments.add(spatial)
        pools.append(pool.cpu())
        probs.append(torch.softmax(logits, dim=1).cpu())
    if batch.has_stats:
        stats, spatial_stats = read_stats(batch.path)
    else:
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

    :raises EvaluationError: the root has a real imaginary part (statistics that are not covariances).
    """
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
    improved-gan). 0 log 0 counts as 0, where ADM's formula gives nan.

    :param probs: [N x C] class probabilities.
    """
    scores = []
    for part in probs.double().split(split_size):  # (n, C)
        marginal = part.mean(0, keepdim=True)  # (1, C)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _blocks(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def squared_distances(a, b):
    """[A x B] squared Euclidean distances between the rows of a [A x D] and b [B x D], as ADM's
    |u|^2 - 2 u.v + |v|^2 clamped at 0 (ADM tries float16 first; float32 here)."""
    norms = (a * a).sum(1)[:, None] + (b * b).sum(1)[None]  # (A, B)
    return norms.addmm_(a, b.T, alpha=-2).clamp_min_(0)  # -2 a.b added in place: no more (A, B) matrices


def knn_radii(x, k=NEIGHBOURS, block=PR_BLOCK):
    """
    Squared distance from each row of x [N x D] to its k-th nearest row, the row itself counted as the
    0th (ADM's manifold radii), found block by block: memory is a few block x block matrices at any N.
    """
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for rows in _blocks(len(x), block):
        nearest = []  # (b, <= k + 1) per column block: each block's own smallest distances, per row
        for cols in _blocks(len(x), block):
            d = squared_distances(x[rows], x[cols])  # (b, c)
            nearest.append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
        radii[rows] = torch.cat(nearest, dim=1).kthvalue(k + 1, dim=1).values  # k + 1: the row itself is the 0th
    return radii


def precision_recall(ref, sample, k=NEIGHBOURS, block=PR_BLOCK):
    """
    Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them: precision is the
    share of samples inside some reference ball (centre a reference feature, radius its k-th
    neighbour distance), recall the share of references inside some sample ball.

    :param ref: [N x D] reference features. :param sample: [M x D] sample features (same device).
    :return: (precision, recall).
    """
    ref_radii, sample_radii = knn_radii(ref, k, block), knn_radii(sample, k, block)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)
    for i in _blocks(len(ref), block):
        for j in _blocks(len(sample), block):
            d = squared_distances(ref[i], sample[j])  # (b_ref, b_sample)
            sample_in[j] |= (d <= ref_radii[i, None]).any(0)
            ref_in[i] |= (d <= sample_radii[None, j]).any(1)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


def score(ref, sample, device):
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
        results["precision"], results["recall"] = precision_recall(ref.pool.to(device), sample.pool.to(device))
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
    weights = args.inception or fetch_inception()
    device = torch.device(args.device)
    # Full float32 convolutions, as the TensorFlow graph runs: cuDNN's TF32 default would round inputs
    # to 10 mantissa bits on Ampere and newer GPUs.
    torch.backends.cudnn.allow_tf32 = False
    net = load_inception(weights, device)
    settings = dict(inception=os.path.basename(weights), inception_sha256=sha256(weights), batch_size=args.batch_size,
                    device=str(device), is_split_size=IS_SPLIT_SIZE, neighbours=NEIGHBOURS, fd_eps=FD_EPS,
                    torch=torch.__version__)

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
    results = score(ref, sample, device)
    for name, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                      ("Precision", "precision"), ("Recall", "recall")):
        print(f"{name}:", "not computed" if results[key] is None else results[key])

    record = dict(results, samples=sample_batch.path, reference=ref_batch.path,
                  num_samples=sample_batch.shape[0],
                  num_reference=None if ref_batch.shape is None else ref_batch.shape[0],
                  sample_size=list(sample_batch.size),
                  reference_size=None if ref_batch.size is None else list(ref_batch.size),
                  reference_stats="precomputed" if ref.precomputed else "computed",
                  sample_stats="precomputed" if sample.precomputed else "computed", settings=settings)
    output = args.output or default_output(ref_batch.path, sample_batch.path)
    with atomic_write(output, "w") as f:
        json.dump(record, f, indent=2)
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
