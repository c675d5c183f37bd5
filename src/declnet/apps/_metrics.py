"""Classification metrics shared by the experiments: top-k accuracy and mean average precision."""

from __future__ import annotations

import torch

__all__ = ["average_precision", "mean_average_precision", "top1_accuracy", "topk_accuracy"]


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
