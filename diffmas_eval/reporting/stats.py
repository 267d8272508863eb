"""Paired statistics on shared documents: accuracy difference, a paired bootstrap interval and a p-value.

Binary scores (0/1 per document) get the exact McNemar test, i.e. a two-sided binomial test on the discordant pairs
(`scipy.stats.binomtest`); other scores get a paired sign-flip permutation test (`scipy.stats.permutation_test`).
The interval is a percentile paired bootstrap of the per-document differences (`scipy.stats.bootstrap`) with a fixed
seed, so a report is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_SEED = 20251121
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedComparison:
    """Method A vs method B on the same n documents (scores in [0, 1])."""

    n: int
    mean_a: float
    mean_b: float
    difference: float  # mean_a - mean_b
    ci_low: float
    ci_high: float
    p_value: float
    test: str  # "McNemar exact" or "paired permutation"
    a_only: int | None  # discordant: A right, B wrong (binary scores only)
    b_only: int | None  # discordant: B right, A wrong


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(a_only, discordant, 0.5, alternative="two-sided").pvalue)


def paired_compare(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> PairedComparison:
    """Compare per-document scores `scores_a[i]` vs `scores_b[i]` (same documents, same order).

    Args:
        scores_a, scores_b: shape [n], n >= 1, values in [0, 1].
        confidence: level of the bootstrap interval.
        n_resamples: bootstrap / permutation resamples.
        seed: fixes the resampling.

    Returns:
        The difference of means with its paired interval and p-value.
    """
    a = np.asarray(scores_a, dtype=float)
    b = np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired scores need two equal-length non-empty vectors, got shapes {a.shape} and {b.shape}")
    diff = a - b
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    if binary:
        a_only = int(np.sum((a == 1) & (b == 0)))
        b_only = int(np.sum((a == 0) & (b == 1)))
        p_value, test = mcnemar_exact(a_only, b_only), "McNemar exact"
    else:
        a_only = b_only = None
        if np.all(diff == 0):
            p_value = 1.0
        else:
            result = stats.permutation_test(
                (a, b),
                lambda x, y, axis: np.mean(x - y, axis=axis),
                permutation_type="samples",
                n_resamples=n_resamples,
                rng=np.random.default_rng(seed),
                vectorized=True,
            )
            p_value = float(result.pvalue)
        test = "paired permutation"
    if a.size < 2 or np.all(diff == diff[0]):
        low = high = float(diff[0]) if a.size >= 2 else float("nan")
    else:
        interval = stats.bootstrap(
            (diff,),
            np.mean,
            confidence_level=confidence,
            n_resamples=n_resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return PairedComparison(
        n=int(a.size),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        difference=float(diff.mean()),
        ci_low=low,
        ci_high=high,
        p_value=p_value,
        test=test,
        a_only=a_only,
        b_only=b_only,
    )
