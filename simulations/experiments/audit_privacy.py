"""`fedmeta audit-privacy`: what a curious server recovers from one site's reply, with and without defences.

The attack is gradient inversion (Geiping et al. 2020, "Inverting Gradients"): the attacker knows θ,
the algorithm, the inner step size and the loss, and optimises dummy support and query images (and,
when labels are unknown, dummy label maps) until the reply they would produce points the way the
site's reply does (1 − cosine similarity, plus a total-variation prior). A k-shot meta-gradient is
the worst case the literature describes: one reply is the gradient of a handful of slices.

Defences, as the attacker meets them:

- ``none``: the site's raw reply (what the server sees today without DP or secure aggregation);
- ``dp``: the reply under local DP at the run config's defaults (clipped to C, noise σ·C/√q with q the
  round's quorum of its sites: what a server sees of one reply when the sites add the noise);
- ``secagg``: the mean of every training site's reply in the round (all that secure aggregation
  reveals), inverted as if it were the target site's.

Each reconstruction is scored against the true support slices (matched one to one by correlation):
PSNR after a least-squares intensity fit, SSIM (MONAI's), Pearson correlation — and the mean of the
same scores for 8 other slices of the same site, the "looks like a brain" floor a reconstruction
must beat to reveal anything about *this* patient. A PNG of truth against reconstruction per attack.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

from fedmeta.common.protocol import FOMAML, MAML
from fedmeta.common.read_limits import ReadLimits

ATTACKED = (FOMAML, MAML)  # the replies the attack models: first and second order
DEFENCES = ("none", "dp", "secagg")
TV_WEIGHT = 1e-2  # the total-variation prior on the dummy images (Geiping et al. 2020; 1e-2 on this mean-TV scale
# recovered the most of 1e-4 / 1e-2 / 1e-1 on the smoke federation, seed 0, FOMAML k = 1: r 0.37 / 0.73 / 0.70)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit-privacy",
        help="gradient-inversion attack on a site's reply, with and without DP and secure aggregation",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--out", type=Path, default=Path("runs/audit-privacy"), help="results.json, report.md, PNGs")
    parser.add_argument("--iterations", type=int, default=600, help="attack optimiser steps per reconstruction")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5], help="support slices per episode (k-shot)")
    parser.add_argument("--algorithms", nargs="+", choices=ATTACKED, default=list(ATTACKED))
    parser.add_argument("--defences", nargs="+", choices=DEFENCES, default=list(DEFENCES))
    parser.add_argument("--labels", nargs="+", choices=("known", "unknown"), default=["known", "unknown"])
    parser.add_argument("--seed", type=int, default=0, help="seeds the episode and the attacker's start")
    parser.add_argument("--federation-dir", type=Path, help="where the smoke federation is cached (default ~/.cache/fedmeta)")
    parser.add_argument("--quick", action="store_true", help="60 iterations, k = 1, FOMAML only: a look in a minute")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier audit in --out (never a folder audit-privacy did not write)")
    parser.set_defaults(handler=handle)

    budget = subparsers.add_parser(
        "dp-budget",
        help="the dp-noise-multiplier that keeps a run within a privacy budget (epsilon at delta)",
        description="Site-level DP: the noise multiplier sigma for a target epsilon at delta, given the "
                    "training sites, the sites sampled per round and the rounds (dp-accounting's RDP accountant, "
                    "as the ServerApp accounts).",
    )
    budget.add_argument("--epsilon", type=float, nargs="+", required=True, help="target epsilon(s)")
    budget.add_argument("--delta", type=float, default=1e-5)
    budget.add_argument("--sites", type=int, required=True, help="training sites in the federation")
    budget.add_argument("--sites-per-round", type=int, default=0, help="sampled per round (0 = all)")
    budget.add_argument("--rounds", type=int, required=True)
    budget.add_argument("--dp", choices=("central", "local"), default="central",
                        help="the run's dp mode: local DP gets no amplification by sampling (the server, its "
                             "adversary, knows whom it sampled), as the ServerApp accounts it")
    budget.set_defaults(handler=handle_budget)


def handle_budget(args: argparse.Namespace) -> int:
    from fedmeta.common.privacy import noise_multiplier_for

    sampled = args.sites_per_round or args.sites
    population = sampled if args.dp == "local" else args.sites  # q = 1 against the server that samples
    try:
        for epsilon in args.epsilon:
            sigma = noise_multiplier_for(epsilon, args.delta, population, sampled, args.rounds)
            print(f"epsilon {epsilon:g} at delta {args.delta:g}, {sampled} of {args.sites} sites x {args.rounds} rounds "
                  f"(dp={args.dp}): --set dp-noise-multiplier={sigma:.3g}")
    except ValueError as err:
        print(f"fedmeta dp-budget: error: {err}", file=sys.stderr)
        return 1
    return 0


def handle(args: argparse.Namespace) -> int:
    try:
        if args.quick:
            args.iterations, args.k, args.algorithms = 60, [1], [FOMAML]
        audit(out=args.out, iterations=args.iterations, ks=args.k, algorithms=args.algorithms,
              defences=args.defences, labels=args.labels, seed=args.seed, federation_root=args.federation_dir,
              overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedmeta audit-privacy: error: {err}", file=sys.stderr)
        return 1
    return 0


def audit(*, out: Path, iterations: int = 600, ks=(1, 5), algorithms=ATTACKED, defences=DEFENCES,
          labels=("known", "unknown"), seed: int = 0, federation_root: Path | None = None,
          federation: Path | None = None, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Every attack asked for; writes results.json, report.md and one PNG per attack to ``out`` (new, empty, or an
    earlier audit's, replaced only with ``overwrite``: ``fedmeta.common.outputs``).

    ``federation``: a generated smoke federation to attack; default: the cached one under
    ``federation_root`` (``~/.cache/fedmeta``)."""
    import torch

    from fedmeta.common.config import RunConfig
    from fedmeta.common.data import SiteDataset
    from fedmeta.common.jsonio import write_json
    from fedmeta.common.synth import cached_federation, load_manifest
    from fedmeta.simulations.experiments.presets import load_preset

    if iterations < 1 or any(k < 1 for k in ks):
        raise ValueError(f"--iterations {iterations} and --k {list(ks)} must be >= 1.")
    from fedmeta.common.outputs import Outputs

    folder = Outputs(out, "audit-privacy")
    earlier = (Path(out) / "results.json").is_file() and (Path(out) / "report.md").is_file()  # before the journal
    folder.check_folder(overwrite=overwrite, recognised=earlier)
    overrides, driver = load_preset("smoke")
    config = RunConfig.from_run_config({**overrides, "inner-steps": 1, "q-query": 1, "seed": seed})
    if federation is None:
        root = (federation_root or Path.home() / ".cache" / "fedmeta").resolve()
        federation = Path(cached_federation(root, driver["federation"], int(driver["federation-seed"])))
    manifest = load_manifest(federation)
    sites = [SiteDataset.load(info.folder(), config.data_config(limits=ReadLimits.from_environment())) for info in manifest.train_sites]
    out = Path(out)
    folder.claim_folder(overwrite=overwrite, recognised=earlier)
    torch.manual_seed(seed)

    rows = []
    for algorithm, k, defence, label_mode in itertools.product(algorithms, ks, defences, labels):
        began = time.perf_counter()
        row = attack_once(config.replace(algorithm=algorithm, k_shot=k), sites, defence=defence,
                          labels_known=label_mode == "known", iterations=iterations, seed=seed,
                          png=out / f"{algorithm}-k{k}-{defence}-labels-{label_mode}.png")
        row.update(algorithm=algorithm, k=k, defence=defence, labels=label_mode,
                   seconds=time.perf_counter() - began)
        rows.append(row)
        if not quiet:
            print(f"{algorithm:7s} k={k} {defence:6s} labels {label_mode:7s}: PSNR {row['psnr']:5.1f} dB "
                  f"(same-site floor {row['baseline_psnr']:5.1f}), SSIM {row['ssim']:.2f}, r {row['correlation']:+.2f} "
                  f"({row['seconds']:.0f} s)", flush=True)
    results = {"federation": str(federation), "iterations": iterations, "seed": seed,
               "model": {"image_size": config.image_size, "base_channels": config.model_base_channels,
                         "levels": config.model_levels},
               "dp": {"clip_norm": config.dp_clip_norm, "noise_multiplier": config.dp_noise_multiplier,
                      "sites": len(sites)},
               "attacks": rows}
    write_json(out / "results.json", results)
    (out / "report.md").write_text(format_report(results) + "\n")
    if not quiet:
        print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results


def attack_once(config, sites, *, defence: str, labels_known: bool, iterations: int, seed: int, png: Path) -> dict:
    """One reconstruction of site 0's support slices from what the server sees under ``defence``."""
    import torch

    from fedmeta.common.data import sample_episodes, site_seed
    from fedmeta.common.losses import one_hot
    from fedmeta.common.model import initial_params, seeded_model
    from fedmeta.common.privacy import add_gaussian_noise, clip_update, local_noise_split, noise_generator

    model = seeded_model(config.model_config(), config.seed)
    theta = {k: v.detach() for k, v in initial_params(model).items()}
    episodes = [sample_episodes(site, 1, config.k_shot, config.q_query, seed=site_seed(seed, site.name))[0]
                for site in sites]
    n = config.num_classes

    def true_reply(episode):
        sx, sy, qx, qy = episode
        return {k: v.detach() for k, v in reply_of(model, theta, config, sx, one_hot(sy, n), qx, one_hot(qy, n)).items()}

    target = true_reply(episodes[0])
    if defence == "dp":
        clipped, _ = clip_update(target, config.dp_clip_norm)
        std = config.dp_noise_multiplier * config.dp_clip_norm / math.sqrt(local_noise_split(config, len(sites)))
        seen = add_gaussian_noise(clipped, std, noise_generator(seed))
    elif defence == "secagg":
        replies = [target] + [true_reply(e) for e in episodes[1:]]
        seen = {k: sum(r[k] for r in replies) / len(replies) for k in target}
    else:
        seen = target

    sx, sy, qx, qy = episodes[0]
    # The exact attack on a MAML reply differentiates its second-order path once more, through the UNet's
    # transposed convolutions, which PyTorch 2.13 cannot do ("output_padding is not supported for
    # non-transposed convolutions"): MAML replies are attacked with the FOMAML reply as the attacker's
    # model of the site, a weaker (mismatched) attack, so its scores are a lower bound on the leak.
    attacker = config.replace(algorithm=FOMAML) if config.algorithm_object.second_order else config
    generator = torch.Generator().manual_seed(seed + 1)
    dummy_s = (torch.randn(sx.shape, generator=generator) * 0.5).requires_grad_(True)
    dummy_q = (torch.randn(qx.shape, generator=generator) * 0.5).requires_grad_(True)
    variables = [dummy_s, dummy_q]
    if labels_known:
        target_s, target_q = one_hot(sy, n), one_hot(qy, n)
    else:
        logits_s = torch.zeros(sy.shape[0], n, *sy.shape[1:]).requires_grad_(True)
        logits_q = torch.zeros(qy.shape[0], n, *qy.shape[1:]).requires_grad_(True)
        variables += [logits_s, logits_q]
    optimiser = torch.optim.Adam(variables, lr=0.1)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, [int(iterations * f) for f in (0.375, 0.625, 0.875)], 0.1)
    seen_flat = torch.cat([seen[k].flatten() for k in sorted(seen)])
    for _ in range(iterations):
        optimiser.zero_grad()
        if not labels_known:
            target_s, target_q = logits_s.softmax(1), logits_q.softmax(1)
        guess = reply_of(model, theta, attacker, dummy_s, target_s, dummy_q, target_q, create_graph=True)
        guess_flat = torch.cat([guess[k].flatten() for k in sorted(guess)])
        loss = 1 - torch.nn.functional.cosine_similarity(guess_flat, seen_flat, dim=0)
        loss = loss + TV_WEIGHT * (_total_variation(dummy_s) + _total_variation(dummy_q))
        loss.backward()
        optimiser.step()
        schedule.step()

    truth = sx[:, 0].double().numpy()
    guess = dummy_s.detach()[:, 0].double().numpy()
    scores = _matched_scores(truth, guess)
    floors = [_matched_scores(truth, other[None].repeat(truth.shape[0], 0)) for other in _other_slices(sites[0], sx, seed)]
    floor = {key: float(sum(f[key] for f in floors) / len(floors)) for key in ("psnr", "ssim", "correlation")}
    _save_png(png, truth, scores["fitted"], f"{config.algorithm} k={config.k_shot} defence={defence} "
              f"labels {'known' if labels_known else 'unknown'}")
    return {"psnr": scores["psnr"], "ssim": scores["ssim"], "correlation": scores["correlation"],
            "baseline_psnr": floor["psnr"], "baseline_ssim": floor["ssim"], "baseline_correlation": floor["correlation"],
            "final_cosine_distance": float(loss.detach()), "png": png.name,
            "attacker_model": attacker.algorithm if attacker is config else f"{attacker.algorithm} (surrogate)"}


def reply_of(model, theta, config, sx, ty, qx, tq, *, create_graph: bool = False) -> dict:
    """The reply a site sends for one episode (FOMAML or MAML, one inner step), as a differentiable
    function of the images and (soft) targets: the attacker's model of the site."""
    import torch
    from torch.func import functional_call

    params = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    names = list(params)
    support_loss = _loss(functional_call(model, params, (sx,)), ty)
    inner = torch.autograd.grad(support_loss, [params[k] for k in names], create_graph=True)
    if not config.algorithm_object.second_order:
        # FOMAML drops the inner step's derivative with respect to θ, yet θ′ still depends on the
        # support images: the attacker keeps that path.
        adapted = {k: params[k].detach() - config.inner_lr * g for k, g in zip(names, inner)}
        query_loss = _loss(functional_call(model, adapted, (qx,)), tq)
        grads = torch.autograd.grad(query_loss, [adapted[k] for k in names], create_graph=create_graph)
    else:
        adapted = {k: params[k] - config.inner_lr * g for k, g in zip(names, inner)}
        query_loss = _loss(functional_call(model, adapted, (qx,)), tq)
        grads = torch.autograd.grad(query_loss, [params[k] for k in names], create_graph=create_graph)
    return dict(zip(names, grads))


def _loss(logits, target):
    """The site's Dice + cross-entropy (fedmeta.common.losses), with the cross-entropy written for soft
    targets so that unknown labels can be optimised; equal to the site's loss on one-hot targets."""
    import torch
    from monai.losses import DiceLoss

    dice = DiceLoss(softmax=True, to_onehot_y=False)(logits, target)
    ce = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return dice + ce


def _total_variation(x):
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _other_slices(site, support, seed: int, count: int = 8):
    """Up to ``count`` seeded slices of the same site outside the support set: what "a brain from this
    scanner" scores against the true slice, the floor a reconstruction must beat to say anything about it."""
    import numpy as np
    import torch

    pool = [(p, int(i)) for p in range(site.num_patients) for i in site.train_slices[p]]
    order = np.random.default_rng(seed + 2).permutation(len(pool))
    chosen = []
    for index in order:
        patient, position = pool[int(index)]
        candidate = site.images[patient][position, 0]
        if not any(torch.equal(candidate, s[0]) for s in support):
            chosen.append(candidate.double().numpy())
        if len(chosen) == count:
            break
    if not chosen:
        raise ValueError(f"site {site.name} has no slice outside the support set to compare with.")
    return chosen


def _matched_scores(truth, guess) -> dict:
    """Scores of each true slice against the reconstruction matched to it (by correlation, one to one)."""
    import numpy as np
    import torch
    from monai.metrics import SSIMMetric
    from scipy.optimize import linear_sum_assignment

    k = truth.shape[0]
    corr = np.array([[_pearson(truth[i], guess[j]) for j in range(k)] for i in range(k)])
    rows, cols = linear_sum_assignment(-np.abs(corr))
    psnrs, ssims, corrs, fitted = [], [], [], np.zeros_like(truth)
    for i, j in zip(rows, cols):
        design = np.stack([guess[j].ravel(), np.ones(guess[j].size)], 1)  # intensity fit a·x̂ + b
        coef, *_ = np.linalg.lstsq(design, truth[i].ravel(), rcond=None)
        fit = (design @ coef).reshape(truth[i].shape)
        fitted[i] = fit
        span = float(truth[i].max() - truth[i].min()) or 1.0
        mse = float(np.mean((fit - truth[i]) ** 2))
        psnrs.append(10 * math.log10(span**2 / mse) if mse > 0 else 99.0)
        metric = SSIMMetric(spatial_dims=2, data_range=span)
        ssims.append(float(metric(torch.from_numpy(fit)[None, None], torch.from_numpy(truth[i])[None, None]).mean()))
        corrs.append(float(corr[i, j]))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "correlation": float(np.mean(corrs)),
            "fitted": fitted}


def _pearson(a, b) -> float:
    import numpy as np

    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _save_png(path: Path, truth, fitted, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = truth.shape[0]
    figure, axes = plt.subplots(2, k, figsize=(2.2 * k, 4.6), squeeze=False)
    for i in range(k):
        for row, image, name in ((0, truth[i], "truth"), (1, fitted[i], "reconstruction")):
            axes[row][i].imshow(image.T, cmap="gray", origin="lower")
            axes[row][i].set_axis_off()
            axes[row][i].set_title(name, fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def format_report(results: dict[str, Any]) -> str:
    dp = results["dp"]
    lines = [
        "# Gradient inversion against one site's reply (fedmeta audit-privacy)", "",
        f"Smoke federation, model {results['model']}, {results['iterations']} attack iterations, seed {results['seed']}. "
        f"DP: clip C = {dp['clip_norm']}, σ = {dp['noise_multiplier']}, noise σ·C/√{dp['sites']} on the reply; "
        f"secure aggregation: the mean of the {dp['sites']} sites' replies. Floor: a different slice of the same site.",
        "",
        "| reply | attacker's model | k | defence | labels | PSNR dB | floor PSNR | SSIM | floor SSIM | r | floor r |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["attacks"]:
        lines.append(f"| {r['algorithm']} | {r['attacker_model']} | {r['k']} | {r['defence']} | {r['labels']} | {r['psnr']:.1f} | "
                     f"{r['baseline_psnr']:.1f} | {r['ssim']:.2f} | {r['baseline_ssim']:.2f} | "
                     f"{r['correlation']:+.2f} | {r['baseline_correlation']:+.2f} |")
    return "\n".join(lines)


__all__ = ["audit", "attack_once", "format_report", "reply_of"]
