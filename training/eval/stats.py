"""Sampling error of the evaluation's accuracies: 95% intervals for a proportion and for the
difference of two.

* ``wilson`` — the Wilson score interval of k successes in n trials. Unlike the normal
  approximation it never leaves [0,1] and is not zero-width at 0/n or n/n (0 of 512 images
  robust still allows up to 0.74%).
* ``diff_paired`` — Newcombe's method 10 for paired proportions (Newcombe 1998, Stat. Med.
  17:2635): two figures measured on the *same* images (two rows of one report, best vs final
  iterate, a defense and a baseline on the same seeded subset when per-image results exist).
  Built from the two Wilson intervals and the correlation of the pairs.
* ``mcnemar_exact`` — the exact (binomial) McNemar test of two paired 0/1 results: used to say
  whether one attack breaks more images than another beyond what two runs of the same
  randomized attack already disagree on.
* ``diff_independent`` — Newcombe's hybrid score interval (method 10 of Newcombe 1998, Stat.
  Med. 17:873) for independent samples. For two rows on the same images whose per-image
  results are not at hand it is conservative (too wide) when the rows agree more than chance,
  which accuracies of one model under two attacks do.

Accuracies under the vote rule are 0/1 per image, so these apply to them as they stand. The
single-draw figure is a mean of fractions per image; its intervals are not computed here.
"""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (n = 0 gives the vacuous (0, 1))."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def diff_independent(k1: float, n1: int, k2: float, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """(p1 - p2, lower, upper): Newcombe's hybrid score interval, independent samples."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, max(-1.0, lo), min(1.0, hi)


def diff_paired(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float, float]:
    """(p1 - p2, lower, upper) for paired outcomes, Newcombe's method 10: ``a`` pairs where
    both are right, ``b`` only the first, ``c`` only the second, ``d`` neither."""
    n = a + b + c + d
    if n == 0:
        return 0.0, -1.0, 1.0
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    # The correlation of the pairs, with Newcombe's continuity correction of its numerator.
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    num = a * d - b * c
    num = max(num - n / 2, 0.0) if num > 0 else num
    phi = num / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return diff, max(-1.0, lo), min(1.0, hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (the binomial test of
    b against Binomial(b + c, 1/2)): whether two attacks on the same images differ beyond the
    churn of their own randomness. 1.0 when there is no discordant pair."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, j) for j in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def interval(correct: torch.Tensor) -> list[float]:
    """The Wilson 95% interval of a 0/1 per-image tensor, as [lower, upper] for JSON."""
    lo, hi = wilson(float((correct > 0.5).sum()), len(correct))
    return [round(lo, 6), round(hi, 6)]


def pair_counts(first: torch.Tensor, second: torch.Tensor) -> tuple[int, int, int, int]:
    """(both right, only ``first`` right, only ``second`` right, neither) of two 0/1 per-image
    results on the same images."""
    f, s = first > 0.5, second > 0.5
    a, b, c, d = (int(v.sum()) for v in (f & s, f & ~s, ~f & s, ~f & ~s))
    return a, b, c, d


def paired_difference(first: torch.Tensor, second: torch.Tensor) -> dict:
    """Accuracy of ``first`` minus that of ``second`` (0/1 per image, the same images), with
    Newcombe's paired 95% interval."""
    a, b, c, d = pair_counts(first, second)
    diff, lo, hi = diff_paired(a, b, c, d)
    return {
        "difference": round(diff, 6),
        "ci95": [round(lo, 6), round(hi, 6)],
        "method": "Newcombe paired (method 10), same images",
    }


def row_difference(r1: dict, r2: dict) -> dict:
    """Accuracy of report row ``r1`` minus ``r2`` (``accuracy`` and ``n_images`` keys) with
    Newcombe's independent-samples 95% interval: for rows whose per-image results are not at
    hand (other reports); on the same images it is conservative (too wide)."""
    n1, n2 = r1["n_images"], r2["n_images"]
    diff, lo, hi = diff_independent(round(r1["accuracy"] * n1), n1, round(r2["accuracy"] * n2), n2)
    return {
        "difference": round(diff, 6),
        "ci95": [round(lo, 6), round(hi, 6)],
        "method": "Newcombe hybrid score, independent samples",
    }
