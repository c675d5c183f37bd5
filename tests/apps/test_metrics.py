"""Top-k accuracy and mean average precision against hand-computed examples."""

from __future__ import annotations

import pytest
import torch

from declnet.apps._metrics import average_precision, mean_average_precision, topk_accuracy


def test_topk_accuracy_by_hand():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.15, 0.05],  # ranking 1, 2, 3, 0, 4; true 2 -> in top-2
            [0.9, 0.02, 0.03, 0.04, 0.01],  # true 0 -> top-1
            [0.3, 0.25, 0.2, 0.15, 0.1],  # true 4 -> last: only top-5
        ]
    )
    targets = torch.tensor([2, 0, 4])
    result = topk_accuracy(scores, targets, ks=(1, 2, 4, 5))
    assert result == pytest.approx({1: 1 / 3, 2: 2 / 3, 4: 2 / 3, 5: 1.0})


def test_topk_with_k_above_the_number_of_classes():
    scores = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    assert topk_accuracy(scores, torch.tensor([0, 0]), ks=(1, 5)) == {1: 0.5, 5: 1.0}


def test_topk_rejects_bad_input():
    scores = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\)"):
        topk_accuracy(scores, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\]"):
        topk_accuracy(scores, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="integer class indices"):
        topk_accuracy(scores, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="at least 1"):
        topk_accuracy(scores, torch.tensor([0, 1, 2]), ks=(0,))


def test_average_precision_by_hand():
    # Positives at ranks 1 and 3: precisions 1/1 and 2/3.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    positives = torch.tensor([True, False, True, False])
    assert average_precision(scores, positives) == pytest.approx((1 + 2 / 3) / 2)
    # Positives at ranks 2 and 4 (order of the input does not matter).
    scores = torch.tensor([0.1, 0.8, 0.9, 0.3])
    positives = torch.tensor([True, True, False, False])
    assert average_precision(scores, positives) == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_average_precision_with_ties_takes_tied_samples_together():
    # Threshold 0.5 takes two samples (1 positive): P = 1/2, R = 1/2;
    # threshold 0.1 takes all three (2 positives): P = 2/3, R = 1.
    scores = torch.tensor([0.5, 0.5, 0.1])
    positives = torch.tensor([True, False, True])
    assert average_precision(scores, positives) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_average_precision_needs_a_positive():
    with pytest.raises(ValueError, match="without a positive"):
        average_precision(torch.tensor([0.3, 0.2]), torch.tensor([False, False]))


def test_mean_average_precision_by_hand():
    scores = torch.tensor(
        [
            [0.7, 0.2, 0.1],
            [0.4, 0.5, 0.1],
            [0.5, 0.1, 0.4],
            [0.1, 0.6, 0.3],
        ]
    )
    targets = torch.tensor([0, 0, 2, 1])
    # Class 0 ranks samples 0, 2, 1, 3; positives 0 and 1 at ranks 1 and 3: (1 + 2/3) / 2.
    # Class 1 ranks 3, 1, 0, 2; positive 3 at rank 1: 1.
    # Class 2 ranks 2, 3, 0|1 (tie); positive 2 at rank 1: 1.
    expected = ((1 + 2 / 3) / 2 + 1 + 1) / 3
    assert mean_average_precision(scores, targets) == pytest.approx(expected)


def test_mean_average_precision_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    assert mean_average_precision(scores, torch.tensor([0, 1])) == 1.0


def test_mean_average_precision_matches_scikit_learn():
    from sklearn import metrics
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 5, generator=generator).softmax(1)
    scores[3, 2] = scores[7, 2]  # a tie
    targets = torch.randint(0, 5, (40,), generator=generator)
    expected = sum(
        metrics.average_precision_score((targets == c).numpy(), scores[:, c].numpy())
        for c in range(5)
    ) / 5
    assert mean_average_precision(scores, targets) == pytest.approx(expected)
