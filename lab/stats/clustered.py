"""Comparisons when test images come in groups (frames of a video, crops of a scene, images of a patient).

A group bootstrap that resamples whole groups for any metric built from additive per-image sums, and the clustered
McNemar test with its design effect (variance under clustering over the variance assuming independent images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import sparse, stats

from lab.stats._checks import check_choice, check_count, paired_bool

CLUSTERED_MCNEMAR_METHODS = ("durkalski", "obuchowski")
# Bound one chunk of resamples (count matrix and totals) to about 4M doubles (32 MiB) whatever the sizes.
_MAX_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, slots=True)
class ClusteredMcNemarResult:
    statistic: float
    pvalue: float
    b: int  # A right, B wrong (all groups)
    c: int  # A wrong, B right
    n: int
    n_groups: int
    design_effect: float  # clustered / naive variance of c - b; nan when the naive variance is 0
    method: str


def group_codes(groups: object, n: int) -> tuple[np.ndarray, int]:
    """Integer codes 0..G-1 for a length-n array of group labels (any sortable dtype), and G.

    Raises
    ------
    ValueError
        If ``groups`` is not 1-D of length ``n``.
    """
    array = np.asarray(groups)
    if array.ndim != 1 or array.size != n:
        raise ValueError(f"groups must be 1-D with one label per image ({n}); got shape {array.shape}")
    _, codes = np.unique(array, return_inverse=True)
    codes = codes.ravel()
    return codes, int(codes.max()) + 1


def cluster_bootstrap(
    unit_sums: np.ndarray | sparse.spmatrix,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_resamples: int = 10_000,
    seed: int = 0,
    multiplicity: np.ndarray | None = None,
) -> np.ndarray:
    """Bootstrap distribution of ``statistic(totals)`` when units are resampled with replacement.

    Each unit (a group of images) carries a row of additive sums (counts of images, of correct answers,
    per-class true positives...). A resample draws units with replacement; its totals are the sums of the
    drawn rows, ``W @ unit_sums`` with W the draw counts, so every metric that is a function of such totals
    (accuracy, balanced accuracy, macro-F1, top-5 accuracy, a difference of two of them) is bootstrapped
    without looping over resamples, in chunks of bounded memory.

    Parameters
    ----------
    unit_sums : numpy.ndarray or scipy.sparse matrix, shape (U, m)
        Per-unit sums; sparse keeps K-class metrics cheap (each image touches a handful of columns).
    statistic : callable
        Maps totals of shape (R, m) to R values (vectorised over resamples).
    n_resamples : int
        Number of resamples.
    seed : int
        Seed of ``numpy.random.default_rng``.
    multiplicity : numpy.ndarray of int, shape (U,), optional
        None: each row is one group and a resample draws U groups, each with probability 1/U (the cluster
        bootstrap). Given: row u stands for ``multiplicity[u]`` identical independent images, and a resample
        draws ``sum(multiplicity)`` images (the ordinary bootstrap with identical images collapsed:
        Multinomial(n, multiplicity / n) counts have exactly the law of index resampling).

    Returns
    -------
    numpy.ndarray, shape (n_resamples,)
        One value of the statistic per resample.

    Raises
    ------
    ValueError
        On a non-2-D ``unit_sums``, a bad ``multiplicity`` or ``n_resamples < 1``.

    References
    ----------
    Davison, A. C., Hinkley, D. V. (1997). Bootstrap Methods and their Application, sec. 3.8 (multi-stage
    sampling: resample the clusters). Field, C. A., Welsh, A. H. (2007). Bootstrapping clustered data.
    J. R. Stat. Soc. B 69(3), 369-390.
    """
    n_resamples = check_count("n_resamples", n_resamples, 1)
    sums = sparse.csr_matrix(unit_sums, dtype=np.float64)
    if sums.ndim != 2 or sums.shape[0] == 0:
        raise ValueError(f"unit_sums must be 2-D with at least one row; got shape {sums.shape}")
    units, columns = sums.shape
    if multiplicity is None:
        draws, probabilities = units, np.full(units, 1.0 / units)
    else:
        multiplicity = np.asarray(multiplicity)
        if multiplicity.shape != (units,) or np.any(multiplicity < 1):
            raise ValueError(f"multiplicity must hold {units} counts >= 1; got shape {multiplicity.shape}")
        draws = int(multiplicity.sum())
        probabilities = multiplicity / draws
    transposed = sums.T.tocsr()  # (m, U): sparse @ dense is the fast direction in scipy
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(units, columns))
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        counts = rng.multinomial(draws, probabilities, size=size).astype(np.float64)
        out[start : start + size] = statistic(np.asarray(transposed @ counts.T).T)
    return out


def clustered_mcnemar_counts(
    b: np.ndarray, c: np.ndarray, sizes: np.ndarray, method: str = "durkalski"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered McNemar statistic, p-value and design effect from per-group counts, vectorised.

    Parameters
    ----------
    b, c, sizes : numpy.ndarray, shape (..., G)
        Per group: images A got right and B wrong, images A got wrong and B right, and all images. The last
        axis runs over the G >= 2 groups; leading axes (say, simulated experiments) are kept.
    method : {"durkalski", "obuchowski"}
        See :func:`clustered_mcnemar`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(statistic, pvalue, design_effect)``, each of the leading shape.

    Raises
    ------
    ValueError
        On an unknown method, fewer than 2 groups, mismatched shapes, or ``b + c > sizes`` in a group.
    """
    check_choice("method", method, CLUSTERED_MCNEMAR_METHODS)
    b, c, sizes = (np.asarray(x, dtype=np.float64) for x in (b, c, sizes))
    if not b.shape == c.shape == sizes.shape or b.ndim == 0 or b.shape[-1] < 2:
        raise ValueError(
            f"b, c and sizes must share a shape (..., G) with G >= 2; got {b.shape}, {c.shape}, {sizes.shape}"
        )
    if np.any(b < 0) or np.any(c < 0) or np.any(b + c > sizes):
        raise ValueError("each group needs 0 <= b, 0 <= c and b + c <= size")
    groups = b.shape[-1]
    d = c - b  # per-group excess of images only B got right
    total, n = d.sum(axis=-1), sizes.sum(axis=-1)
    delta = total / n
    # Cluster-level (ratio-estimator) variance of the total, and the naive one treating images as independent.
    clustered = groups / (groups - 1) * ((d - sizes * delta[..., None]) ** 2).sum(axis=-1)
    discordant = (b + c).sum(axis=-1)
    naive = n / (n - 1) * (discordant - n * delta**2) if np.all(n > 1) else np.full(total.shape, np.nan)
    variance = (d**2).sum(axis=-1) if method == "durkalski" else clustered
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = np.where(variance > 0, total**2 / variance, 0.0)
        design_effect = np.where(naive > 0, clustered / naive, np.nan)
    return statistic, stats.chi2.sf(statistic, 1), design_effect


def clustered_mcnemar(
    correct_a: np.ndarray, correct_b: np.ndarray, groups: object, method: str = "durkalski"
) -> ClusteredMcNemarResult:
    """McNemar's test of equal accuracy when the images come in correlated groups.

    With ``d_k = c_k - b_k`` per group k (B-only minus A-only correct images), ``"durkalski"`` uses
    ``(sum d_k)**2 / sum d_k**2`` and ``"obuchowski"`` ``(sum d_k)**2 / (G/(G-1) sum (d_k - n_k * delta)**2)``
    with ``delta = sum d_k / n``; both are referred to chi-square on 1 degree of freedom. With one image per
    group Durkalski's statistic is McNemar's uncorrected ``(c - b)**2 / (b + c)``. Durkalski's variance is
    taken under the null and keeps the size close to nominal with few groups; Obuchowski's is the
    ratio-estimator variance, which can be liberal with few groups. The design effect is the clustered
    variance of ``c - b`` over the naive one (the images' own variance, ``n/(n-1) * (b + c - n * delta**2)``):
    about 1 for independent images, up to the group size for exact duplicates.

    Parameters
    ----------
    correct_a, correct_b : numpy.ndarray of bool, shape (n,)
        Per-image correctness of A and B on the same images.
    groups : array_like, shape (n,)
        Group label of each image (any sortable values); at least two groups.
    method : {"durkalski", "obuchowski"}
        Variance of the statistic.

    Returns
    -------
    ClusteredMcNemarResult
        ``statistic``, ``pvalue``, ``b``, ``c``, ``n``, ``n_groups``, ``design_effect`` and ``method``.

    Raises
    ------
    ValueError
        On inputs that are not equal-length boolean arrays, a groups array of another length, a single
        group, or an unknown method.

    References
    ----------
    Durkalski, V. L., Palesch, Y. Y., Lipsitz, S. R., Rust, P. F. (2003). Analysis of clustered
    matched-pair data. Stat. Med. 22(15), 2417-2428.
    Obuchowski, N. A. (1998). On the comparison of correlated proportions for clustered data. Stat. Med.
    17(13), 1495-1507.
    """
    check_choice("method", method, CLUSTERED_MCNEMAR_METHODS)
    a, b_right = paired_bool(correct_a, correct_b)
    codes, n_groups = group_codes(groups, a.size)
    if n_groups < 2:
        raise ValueError(f"groups must name at least 2 groups; got {n_groups}")
    b = np.bincount(codes, weights=a & ~b_right, minlength=n_groups)
    c = np.bincount(codes, weights=~a & b_right, minlength=n_groups)
    sizes = np.bincount(codes, minlength=n_groups)
    statistic, pvalue, design_effect = clustered_mcnemar_counts(b, c, sizes, method)
    return ClusteredMcNemarResult(
        float(statistic), float(pvalue), int(b.sum()), int(c.sum()), a.size, n_groups, float(design_effect), method
    )
