"""
Parity with ADM's TensorFlow evaluator: run openai/guided-diffusion's evaluations/evaluator.py and
evaluate.py on the same two batches, and print each figure side by side with the difference.

    pip install tensorflow requests                 # what ADM's evaluator needs, beside this project's
    git clone https://github.com/openai/guided-diffusion
    wget https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb
    python bench/adm_parity.py --adm guided-diffusion/evaluations/evaluator.py --graph classify_image_graph_def.pb \\
        VIRTUAL_imagenet256_labeled.npz samples/<run name>.npz

The target: FID within 0.5% of ADM's on 50,000 DiT samples. ADM's figures come from its own
classes called in the order of its main() (its code unchanged, its graph read from --graph instead
of a download); ours from evaluate.py's functions, with the weights evaluate.py uses
(--inception to give a file). Besides the five figures it compares the samples' pool_3 features
image by image and the statistics of both batches, which tells where a difference starts. ADM's
evaluator was written for numpy < 1.24; where numpy no longer has `np.bool` this script sets it to
the builtin bool (what it was an alias of) for ADM's code. This script needs TensorFlow and the
graph, so neither the tests nor bench/run.py run it.
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


def run_ours(ref_path, sample_path, weights, batch_size, device):
    net = evaluate.load_inception(weights, device)
    ref = evaluate.summarize(evaluate.inspect_batch(ref_path), net, batch_size, device)
    sample = evaluate.summarize(evaluate.inspect_batch(sample_path), net, batch_size, device)
    figures = evaluate.score(ref, sample, device)
    stats = dict(ref=(ref.stats[0], ref.spatial_stats[0]), sample=(sample.stats[0], sample.spatial_stats[0]))
    return figures, sample.pool.numpy(), stats


def main(args):
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
    parser.add_argument("ref_batch")
    parser.add_argument("sample_batch")
    parser.add_argument("--adm", required=True, metavar="evaluator.py",
                        help="openai/guided-diffusion's evaluations/evaluator.py")
    parser.add_argument("--graph", required=True, metavar="classify_image_graph_def.pb", help="ADM's Inception graph")
    parser.add_argument("--inception", metavar="PATH",
                        help="evaluate.py's weights (default: as evaluate.py finds them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for path in (args.adm, args.graph, args.ref_batch, args.sample_batch):
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file")
    return args


if __name__ == "__main__":
    main(parse_args())
