"""
Parity with ADM's TensorFlow evaluator: run openai/guided-diffusion's evaluations/evaluator.py and
evaluate.py on the same two batches, and print each figure side by side with the difference.

    pip install tensorflow requests                 # what ADM's evaluator needs, beside this project's
    git clone https://github.com/openai/guided-diffusion
    wget https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb
    python bench/adm_parity.py --adm guided-diffusion/evaluations/evaluator.py --graph classify_image_graph_def.pb \\
        VIRTUAL_imagenet256_labeled.npz samples/<run name>.npz
    python bench/adm_parity.py --adm guided-diffusion/evaluations/evaluator.py --offline   # no graph, no images

The target: FID within 0.5% of ADM's on 50,000 DiT samples. ADM's figures come from its own
classes called in the order of its main() (its code unchanged, its graph read from --graph instead
of a download); ours from evaluate.py's functions, with the weights evaluate.py uses
(--inception to give a file). Besides the five figures it compares the samples' pool_3 features
image by image and the statistics of both batches, which tells where a difference starts. ADM's
evaluator was written for numpy < 1.24; where numpy no longer has `np.bool` this script sets it to
the builtin bool (what it was an alias of) for ADM's code. This script needs TensorFlow and the
graph, so neither the tests nor bench/run.py run it.

--offline needs TensorFlow but neither the graph nor images: it builds feature arrays (OFFLINE_SETS:
pool-like, ties and near-ties at the radii, other distributions) and feeds the same arrays to ADM's
FIDStatistics, Inception Score formula and ManifoldEstimator and to evaluate.py's functions: the
parity of the metric arithmetic alone, the network aside. A TensorFlow that sees a GPU runs ADM's
matrix products there; evaluate.py's float16 distances follow TensorFlow's CPU kernels.
"""
import argparse
import importlib.util
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402

FIGURES = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
           ("Recall", "recall"))


def load_adm(path, graph):
    """ADM's evaluator.py as a module, reading its Inception graph from `graph`."""
    spec = importlib.util.spec_from_file_location("adm_evaluator", path)
    adm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adm)
    if graph:
        adm.INCEPTION_V3_PATH = os.path.abspath(graph)  # read when the graph is built; it exists, so no download
    if not hasattr(np, "bool"):
        np.bool = bool  # removed in numpy 1.24; ADM's evaluate_pr uses it as a dtype
    return adm


def run_adm(adm, ref_path, sample_path):
    """ADM's main(), step by step: its figures, and the samples' pool features and both statistics."""
    tf = adm.tf
    config = tf.ConfigProto(allow_soft_placement=True)
    config.gpu_options.allow_growth = True
    with tf.Session(config=config) as session:
        evaluator = adm.Evaluator(session)
        evaluator.warmup()
        ref_acts = evaluator.read_activations(ref_path)
        ref_stats, ref_spatial = evaluator.read_statistics(ref_path, ref_acts)
        sample_acts = evaluator.read_activations(sample_path)
        sample_stats, sample_spatial = evaluator.read_statistics(sample_path, sample_acts)
        precision, recall = evaluator.compute_prec_recall(ref_acts[0], sample_acts[0])
        figures = dict(inception_score=evaluator.compute_inception_score(sample_acts[0]),
                       fid=sample_stats.frechet_distance(ref_stats),
                       sfid=sample_spatial.frechet_distance(ref_spatial), precision=precision, recall=recall)
    stats = dict(ref=(ref_stats.mu, ref_spatial.mu), sample=(sample_stats.mu, sample_spatial.mu))
    return figures, sample_acts[0], stats


class PoolLike:
    """Non-negative 2048-d features shaped like pool_3 (averages of ReLUs: many near 0, a long tail, mean
    about 0.5): rows drawn around 20 shared cluster centres, scaled per coordinate by a shared profile.
    More noise spreads a set's rows; two sets of the same noise overlap."""

    def __init__(self, rng):
        self.rng, self.profile, self.centres = rng, rng.gamma(0.5, 0.8, (1, 2048)), rng.gamma(2.0, 0.5, (20, 2048))

    def __call__(self, n, noise=0.5, scale=1.0):
        centres = self.centres[self.rng.integers(0, len(self.centres), n)]
        return (self.profile * (centres + self.rng.gamma(2.0, 0.5, (n, 2048)) * noise) * scale).astype(np.float32)

    def nudged(self, x, share=0.01):
        """x with `share` of its values moved by -2..2 float16 steps: distances at, or one float16
        rounding away from, those of x."""
        step = np.spacing(np.abs(x).astype(np.float16)).astype(np.float32)
        moved = self.rng.integers(-2, 3, x.shape) * (self.rng.random(x.shape) < share)
        return np.maximum(x + step * moved, 0).astype(np.float32)


def offline_sets(rng):
    """(name, reference [N x 2048], samples [M x 2048], sample logits [M x 1008], whether to compare FID and
    sFID) feature sets. scipy's sqrtm of a 2048 x 2048 matrix takes about a minute on 2 CPU cores, so the
    Frechet distances (the same scipy calls on both sides) are compared on two of the sets."""
    logits = lambda m, s: (rng.standard_normal((m, 1008)) * s).astype(np.float32)  # noqa: E731
    pool = PoolLike(rng)
    ref = pool(3000)
    tied = np.repeat(pool(500), 4, axis=0)  # groups of 4 near-copies: radii decided by float16 roundings
    tied = pool.nudged(tied)
    tied_samples = np.concatenate([pool.nudged(tied[rng.permutation(2000)[:1000]]), pool(1000)])
    return [
        ("pool-like 3000 x 2500", ref, pool(2500, noise=0.55), logits(2500, 3), True),
        ("pool-like, one distribution 3000 x 2500", ref, pool(2500), logits(2500, 1), False),
        ("ties and near-ties 2000 x 2000", tied, tied_samples, logits(2000, 5), True),
        ("gaussian (signed) 1500 x 1200", rng.standard_normal((1500, 2048)).astype(np.float32),
         (rng.standard_normal((1200, 2048)) * 1.02).astype(np.float32), logits(1200, 2), False),
        ("pool-like x 40 (float16 overflows: ADM's float32 fallback) 1200 x 1000", pool(1200, scale=40.0),
         pool(1000, scale=40.0), logits(1000, 4), False),
    ]


def run_offline(adm):
    """ADM's classes and evaluate.py's functions on the same arrays; a table per feature set."""
    tf = adm.tf
    tf.disable_eager_execution()
    rng = np.random.default_rng(0)
    with tf.Session(config=tf.ConfigProto(allow_soft_placement=True)) as session:
        estimator = adm.ManifoldEstimator(session)
        logits_in = tf.placeholder(tf.float32, [None, 1008])
        softmax = tf.nn.softmax(logits_in)  # what ADM's softmax graph does after its matrix product
        for name, ref, sample, logits, with_fid in offline_sets(rng):
            probs = session.run(softmax, {logits_in: logits})
            evaluator = adm.Evaluator.__new__(adm.Evaluator)  # only its methods on arrays: no graph
            evaluator.sess, evaluator.manifold_estimator, evaluator.softmax_batch_size = session, estimator, 512
            evaluator.softmax, evaluator.softmax_input = tf.identity(logits_in), logits_in
            radii = [estimator.manifold_radii(x) for x in (ref, sample)]
            pr = estimator.evaluate_pr(ref, radii[0], sample, radii[1])
            theirs = dict(inception_score=evaluator.compute_inception_score(probs), precision=float(pr[0][0]),
                          recall=float(pr[1][0]))
            ref_t, sample_t = torch.from_numpy(ref), torch.from_numpy(sample)
            ours = dict(inception_score=evaluate.inception_score(torch.from_numpy(probs)))
            for key, dims in (("fid", 2048), ("sfid", 2023)) if with_fid else ():
                # ADM's statistics (Evaluator.compute_statistics) and ours (Moments, in batches of 64 rows)
                adm_stats = [adm.FIDStatistics(x[:, :dims].mean(0), np.cov(x[:, :dims], rowvar=False))
                             for x in (sample, ref)]
                theirs[key] = adm_stats[0].frechet_distance(adm_stats[1])
                our_stats = []
                for x in (sample, ref):
                    moments = evaluate.Moments()
                    for part in torch.from_numpy(x[:, :dims]).split(64):
                        moments.add(part)
                    our_stats += moments.result()
                ours[key] = evaluate.frechet_distance(*our_stats)
            ours["precision"], ours["recall"] = evaluate.precision_recall(ref_t, sample_t)
            float32 = evaluate.precision_recall(ref_t, sample_t, distances=evaluate.Distances.FLOAT32)
            radii_ours = [evaluate.knn_radii(x) for x in (ref_t, sample_t)]
            same_radii = sum(int((r.numpy() == theirs_r[:, 0]).sum()) for r, theirs_r in zip(radii_ours, radii))
            print(f"\n{name}: radii equal to ADM's bit for bit: {same_radii} of {len(ref) + len(sample)}")
            print(f"{'figure':<16} {'ADM (TensorFlow)':>18} {'evaluate.py':>18} {'relative':>10} {'float32 dist.':>14}")
            for label, key in FIGURES if with_fid else FIGURES[:1] + FIGURES[3:]:
                a, b = theirs[key], ours[key]
                relative = f"{(b - a) / a:.1e}" if a else "-"
                pr_index = ("precision", "recall").index(key) if key in ("precision", "recall") else None
                extra = "" if pr_index is None else f"{float32[pr_index]:>14.6f}"
                print(f"{label:<16} {a:>18.6f} {b:>18.6f} {relative:>10} {extra}", flush=True)


def run_ours(ref_path, sample_path, weights, batch_size, device):
    net, _ = evaluate.load_inception(weights, device)
    ref = evaluate.summarize(evaluate.inspect_batch(ref_path), net, batch_size, device)
    sample = evaluate.summarize(evaluate.inspect_batch(sample_path), net, batch_size, device)
    figures = evaluate.score(ref, sample, device)
    stats = dict(ref=(ref.stats[0], ref.spatial_stats[0]), sample=(sample.stats[0], sample.spatial_stats[0]))
    return figures, sample.pool.numpy(), stats


def main(args):
    if args.offline:
        return run_offline(load_adm(args.adm, None))
    adm = load_adm(args.adm, args.graph)
    print("running ADM's evaluator (TensorFlow)...", file=sys.stderr)
    adm_figures, adm_pool, adm_stats = run_adm(adm, args.ref_batch, args.sample_batch)
    print("running evaluate.py (PyTorch)...", file=sys.stderr)
    torch.backends.cudnn.allow_tf32 = False  # as evaluate.py's main runs
    weights = args.inception or evaluate.fetch_inception()
    figures, pool, stats = run_ours(args.ref_batch, args.sample_batch, weights, args.batch_size,
                                    torch.device(args.device))

    print(f"{'figure':<16} {'ADM (TensorFlow)':>18} {'evaluate.py':>18} {'difference':>12} {'relative':>10}")
    for name, key in FIGURES:
        theirs, ours = adm_figures[key], figures[key]
        relative = f"{(ours - theirs) / theirs:.3%}" if theirs else "-"
        print(f"{name:<16} {theirs:>18.6f} {ours:>18.6f} {ours - theirs:>12.6f} {relative:>10}")
    diff = np.abs(pool - adm_pool)
    print(f"\nsamples' pool_3 features: max |difference| {diff.max():.3g}, mean {diff.mean():.3g} "
          f"(features' mean |value| {np.abs(adm_pool).mean():.3g})")
    for side in ("ref", "sample"):
        for i, what in enumerate(("mu (pool_3)", "mu_s (mixed_6/conv)")):
            gap = np.abs(np.asarray(stats[side][i], np.float64) - np.asarray(adm_stats[side][i], np.float64)).max()
            print(f"{side:>6} {what}: max |difference| {gap:.3g}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("ref_batch", nargs="?")
    parser.add_argument("sample_batch", nargs="?")
    parser.add_argument("--adm", required=True, metavar="evaluator.py",
                        help="openai/guided-diffusion's evaluations/evaluator.py")
    parser.add_argument("--graph", metavar="classify_image_graph_def.pb", help="ADM's Inception graph")
    parser.add_argument("--offline", action="store_true",
                        help="the metrics alone on built feature arrays: no graph, no batches")
    parser.add_argument("--inception", metavar="PATH",
                        help="evaluate.py's weights (default: as evaluate.py finds them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.offline and not (args.graph and args.ref_batch and args.sample_batch):
        parser.error("give --graph and the two batches, or --offline")
    for path in (args.adm, args.graph, args.ref_batch, args.sample_batch) if not args.offline else (args.adm,):
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file")
    return args


if __name__ == "__main__":
    main(parse_args())
