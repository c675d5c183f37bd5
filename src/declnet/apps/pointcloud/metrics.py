"""Classification metrics: top-1 accuracy and mean average precision (mAP)."""

from __future__ import annotations

import torch

__all__ = ["average_precision", "mean_average_precision", "top1_accuracy"]


def _check(scores: torch.Tensor, labels: torch.Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (n, K), got {tuple(scores.shape)}")
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"labels must have shape ({scores.shape[0]},), got {tuple(labels.shape)}")


def top1_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of instances whose highest score is the true class.

    Args:
        scores: (n, K) class scores (logits or probabilities).
        labels: (n,) int64 true classes.

    Returns:
        Accuracy in [0, 1] (0 for an empty set).
    """
    _check(scores, labels)
    if len(labels) == 0:
        return 0.0
    return float((scores.argmax(dim=1) == labels).double().mean())


def average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """Average precision of a ranking: the area under the precision-recall step curve.

    AP = Σ_t (R_t − R_{t−1}) P_t over the distinct score thresholds t in decreasing order,
    where P_t and R_t are the precision and recall of "score ≥ t". Tied scores enter
    together, so the result does not depend on the order of ties (the same definition as
    scikit-learn's ``average_precision_score``).

    Args:
        scores: (n,) scores, higher meaning more likely relevant.
        relevant: (n,) bool, which instances are relevant.

    Returns:
        AP in [0, 1].

    Raises:
        ValueError: If nothing is relevant (AP is undefined).
    """
    relevant = relevant.to(torch.bool)
    num_relevant = int(relevant.sum())
    if num_relevant == 0:
        raise ValueError("average precision is undefined without relevant instances")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s = scores.double()[order]
    r = relevant[order].double()
    true_pos = torch.cumsum(r, 0)
    ranks = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # Keep the last index of each run of tied scores: the thresholds.
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    precision = true_pos[last] / ranks[last]
    recall = true_pos[last] / num_relevant
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_step * precision).sum())


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the one-vs-rest average precision of the class scores.

    Classes without any instance in ``labels`` are left out of the mean (their AP is
    undefined).

    Args:
        scores: (n, K) class scores (logits or probabilities; only the ranking matters).
        labels: (n,) int64 true classes.

    Returns:
        mAP in [0, 1] (0 for an empty set).
    """
    _check(scores, labels)
    aps = [
        average_precision(scores[:, k], labels == k)
        for k in range(scores.shape[1])
        if bool((labels == k).any())
    ]
    return sum(aps) / len(aps) if aps else 0.0
