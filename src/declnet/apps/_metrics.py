"""Classification metrics shared by the experiments: top-k accuracy and mean average precision."""

from __future__ import annotations

import torch

__all__ = [
    "AUTHORS_MAP_CLASSES",
    "authors_map",
    "average_precision",
    "interpolated_average_precision",
    "mean_average_precision",
    "top1_accuracy",
    "topk_accuracy",
]

#: The number of classes, counted from class 0, over which the paper's code averages AP.
AUTHORS_MAP_CLASSES = 6


def _check_scores(scores: torch.Tensor, targets: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (N, K), got {tuple(scores.shape)}")
    if targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"targets must have shape (N,) = ({scores.shape[0]},), got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(
            f"targets must lie in [0, {scores.shape[1] - 1}], got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )


def topk_accuracy(
    scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, float]:
    """Fraction of samples whose true class is among the ``k`` highest scores.

    Ties are broken by ``torch.topk`` (in practice, by class index), as in the usual
    ImageNet evaluation.

    Args:
        scores: Class scores ``(N, K)`` (logits or probabilities).
        targets: True classes ``(N,)``, integers in ``[0, K)``.
        ks: The values of ``k``; a ``k`` above ``K`` counts as ``K`` (accuracy 1).

    Returns:
        ``{k: accuracy}`` with accuracies in ``[0, 1]``.

    Raises:
        ValueError: For mismatched shapes, non-integer or out-of-range targets, ``k < 1``, or
            no samples.

    Example:
        >>> scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
        >>> topk_accuracy(scores, torch.tensor([2, 0]), ks=(1, 2))
        {1: 0.5, 2: 1.0}
    """
    _check_scores(scores, targets)
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be at least 1, got {ks}")
    largest = min(max(ks), scores.shape[1])
    ranked = scores.topk(largest, dim=1).indices  # (N, largest)
    hits = ranked == targets.unsqueeze(1)  # (N, largest)
    return {k: float(hits[:, : min(k, largest)].any(dim=1).float().mean()) for k in ks}


def top1_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of samples whose highest score is the true class.

    Args:
        scores: Class scores ``(N, K)`` (logits or probabilities).
        targets: True classes ``(N,)``, integers in ``[0, K)``.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: As :func:`topk_accuracy`.
    """
    return topk_accuracy(scores, targets, ks=(1,))[1]


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Average precision of one ranking: the area under its precision-recall steps.

    ``AP = Σ_t (R_t − R_{t−1}) P_t`` over the distinct score thresholds ``t`` in decreasing
    order, where ``P_t`` and ``R_t`` are precision and recall of the samples scoring at least
    ``t``. Without ties this is the mean, over the positives, of the precision at each
    positive's rank; tied samples enter together (as in scikit-learn's
    ``average_precision_score``).

    Args:
        scores: Scores ``(N,)``; higher means more likely positive.
        positives: Boolean ``(N,)``, which samples are positive.

    Returns:
        AP in ``[0, 1]``.

    Raises:
        ValueError: For mismatched shapes or no positive sample.

    Example:
        >>> average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True]))
        0.8333333333333333
    """
    if scores.dim() != 1 or positives.shape != scores.shape:
        raise ValueError(
            f"scores and positives must both have shape (N,), got {tuple(scores.shape)} and "
            f"{tuple(positives.shape)}"
        )
    positives = positives.bool()
    total = int(positives.sum())
    if total == 0:
        raise ValueError("average precision is undefined without a positive sample")
    order = torch.argsort(scores, descending=True)
    sorted_scores = scores[order].double()
    true_pos = positives[order].double().cumsum(0)
    # Keep the last index of each run of equal scores: one point per distinct threshold.
    last = torch.ones_like(sorted_scores, dtype=torch.bool)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_pos = true_pos[last]
    counts = torch.arange(1, scores.numel() + 1, dtype=torch.float64)[last]
    precision = true_pos / counts
    recall = true_pos / total
    recall_steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_steps * precision).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes of the average precision of ranking all samples by that class's score.

    For class ``c`` the samples are ranked by ``scores[:, c]`` and those with target ``c`` are
    the positives (one-vs-rest). Classes without a positive sample are left out of the mean.
    Pass probabilities (softmax of the logits): the per-class rankings compare scores across
    samples, so unlike accuracy the result depends on the calibration of the scores, which
    is what the paper's mAP column measures.

    Args:
        scores: Class scores ``(N, K)``.
        targets: True classes ``(N,)``, integers in ``[0, K)``.

    Returns:
        mAP in ``[0, 1]``.

    Raises:
        ValueError: For mismatched shapes, bad targets, or no samples.

    Example:
        >>> scores = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
        >>> mean_average_precision(scores, torch.tensor([0, 1, 1]))
        1.0
    """
    _check_scores(scores, targets)
    if scores.shape[0] == 0:
        raise ValueError("mean_average_precision needs at least one sample")
    present = torch.unique(targets).tolist()
    per_class = [average_precision(scores[:, c], targets == c) for c in present]
    return sum(per_class) / len(per_class)


def interpolated_average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """VOC-style interpolated average precision of one ranking.

    The precision at each rank is replaced by the highest precision at any rank at or below it
    (the monotone envelope of the precision-recall curve), and the area under that envelope is
    summed over the steps of recall, as in the PASCAL VOC evaluation code from 2010 on. Samples
    are ranked one at a time (ties in the order ``torch.argsort`` leaves them). The result is
    never below :func:`average_precision` without ties.

    Args:
        scores: Scores ``(N,)``; higher means more likely positive.
        positives: Boolean ``(N,)``, which samples are positive.

    Returns:
        AP in ``[0, 1]``.

    Raises:
        ValueError: For mismatched shapes or no positive sample.

    Example:
        >>> s = torch.tensor([0.9, 0.8, 0.7])
        >>> interpolated_average_precision(s, torch.tensor([False, True, True]))
        0.6666666666666666
    """
    if scores.dim() != 1 or positives.shape != scores.shape:
        raise ValueError(
            f"scores and positives must both have shape (N,), got {tuple(scores.shape)} and "
            f"{tuple(positives.shape)}"
        )
    positives = positives.bool()
    total = int(positives.sum())
    if total == 0:
        raise ValueError("average precision is undefined without a positive sample")
    order = torch.argsort(scores, descending=True, stable=True)
    hits = positives[order].double()
    true_pos = hits.cumsum(0)
    precision = true_pos / torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    envelope = precision.flip(0).cummax(0).values.flip(0)
    # Recall grows by 1/total at each positive: sum the envelope there.
    return float((envelope * hits).sum() / total)


def authors_map(
    scores: torch.Tensor, targets: torch.Tensor, classes: int = AUTHORS_MAP_CLASSES
) -> float:
    """The mAP of the paper's published numbers: interpolated AP over the first classes only.

    The authors' evaluation code averages :func:`interpolated_average_precision` over classes
    ``0 .. classes - 1`` rather than over every class, which is what Tables 3, 4 and 6 report.
    It is kept for comparison with those tables; :func:`mean_average_precision` is the
    standard all-class mAP. Classes among the first ones without a positive sample are left
    out of the mean.

    Args:
        scores: Class probabilities ``(N, K)``.
        targets: True classes ``(N,)``, integers in ``[0, K)``.
        classes: How many classes, from class 0, enter the mean (6 in the authors' code).

    Returns:
        mAP in ``[0, 1]``.

    Raises:
        ValueError: For mismatched shapes, bad targets, no samples, ``classes < 1``, or no
            positive sample among the first ``classes`` classes.
    """
    _check_scores(scores, targets)
    if scores.shape[0] == 0:
        raise ValueError("authors_map needs at least one sample")
    if classes < 1:
        raise ValueError(f"classes must be at least 1, got {classes}")
    present = [c for c in range(min(classes, scores.shape[1])) if bool((targets == c).any())]
    if not present:
        raise ValueError(f"no sample belongs to one of the first {classes} classes")
    per_class = [interpolated_average_precision(scores[:, c], targets == c) for c in present]
    return sum(per_class) / len(per_class)
