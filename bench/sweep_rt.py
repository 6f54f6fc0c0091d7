"""Sweep the random transform's noise σ for one trained purifier: clean vs robust accuracy.

The purifier is pre-trained on σ ~ U[0, noise_max], so a single checkpoint serves every σ in
that range. For each σ this measures clean accuracy (one RT draw per image) on ``--clean-n``
images and PGD-EOT robust accuracy (whole pipeline, exact gradients) on ``--n`` images, and
prints a Markdown table; the deployed default is picked from it. The attack here is a reduced
budget for ranking σ values, not the reported robustness figure.

    python bench/sweep_rt.py --data ../shared/data/cifar10 \
        --classifier runs/classifier/final.safetensors --purifier runs/purifier/final.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from training.eval.command import EvalConfig, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--classifier", required=True)
    p.add_argument("--purifier", required=True)
    p.add_argument("--sigmas", default="0,0.03125,0.0625,0.09375,0.125", help="comma-separated σ values")
    p.add_argument("--n", type=int, default=128, help="attacked images per σ")
    p.add_argument("--clean-n", type=int, default=2000, help="images for clean accuracy per σ")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eot", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        cfg = EvalConfig(
            data=args.data,
            classifier=args.classifier,
            purifier=args.purifier,
            n=args.n,
            clean_n=args.clean_n,
            steps=args.steps,
            eot=args.eot,
            samples=8,
            noise_std=sigma,
            attacks=("pgd",),
            sanity=False,  # a ranking budget, not a reported figure (atop eval --preset leekim is)
        )
        res = run(cfg)
        rob = res["robust"][0]
        rows.append(
            {
                "sigma": sigma,
                "clean": res["clean_accuracy"],
                "robust_vote": rob["accuracy"],
                "robust_single": rob["accuracy_single_draw"],
                "wall_s": res["wall_s"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nPGD-EOT l-inf 8/255, {args.steps} steps, EOT {args.eot}, {args.n} images; clean on {args.clean_n}\n"
    )
    print("| σ (native pixel) | clean | robust (vote of 8) | robust (single draw) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['sigma']:.4f} | {r['clean']:.1%} | {r['robust_vote']:.1%} | {r['robust_single']:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
