"""Objectives and metric functions against hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.reddit import trailing_padding_mask
from flasc.tasks import objectives


def test_multilabel_scores_by_hand():
    target = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0]])
    # label 0: TP 2 -> P 1, R 1, F1 1; label 1: TP 1, FN 1 -> P 1, R 1/2, F1 2/3;
    # label 2: FP 1, FN 1 -> 0, 0, 0.  Pooled: TP 3, FP 1, FN 2.
    s = objectives.multilabel_scores(pred, target)
    assert s["micro_precision"] == pytest.approx(3 / 4)
    assert s["micro_recall"] == pytest.approx(3 / 5)
    assert s["micro_f1"] == pytest.approx(2 / 3)
    assert s["macro_precision"] == pytest.approx(2 / 3)
    assert s["macro_recall"] == pytest.approx(1 / 2)
    assert s["macro_f1"] == pytest.approx(5 / 9)


def test_multilabel_label_without_positives_or_predictions_scores_zero_in_macro():
    target = np.array([[1, 0], [1, 0]])
    pred = np.array([[1, 0], [1, 0]])
    s = objectives.multilabel_scores(pred, target)
    assert s["micro_f1"] == 1.0 and s["macro_f1"] == pytest.approx(0.5)


def _lm_example():
    """Vocabulary 3, one row 0 1 2 <pad>: position 0 predicts 1 with p = 3/5 (right), position 1
    predicts 2 with p = 1/3 but argmax is token 0 (wrong); position 2's target is padding."""
    ids = torch.tensor([[0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = math.log(3)
    logits[0, 2, 0] = 50.0  # would be a confident miss of the padding target: must not count
    return ids, mask, logits


def test_next_token_counts_exclude_padding():
    ids, mask, logits = _lm_example()
    loss_sum, correct, count = objectives.next_token_counts(logits, {"input_ids": ids, "attention_mask": mask})
    assert count == 2 and correct == 1
    assert loss_sum.item() == pytest.approx(-math.log(3 / 5) + math.log(3))  # = ln 5


def test_next_token_tally_gives_token_accuracy_and_perplexity():
    ids, mask, logits = _lm_example()
    tally = objectives.NextToken().tally()
    batch = {"input_ids": ids, "attention_mask": mask}
    tally.add(logits, batch)
    tally.add(logits, batch)
    out = tally.result()
    assert out["accuracy"] == 0.5
    assert out["loss"] == pytest.approx(math.log(5) / 2)
    assert out["perplexity"] == pytest.approx(math.sqrt(5))
    assert objectives.NextToken().hits(logits, batch) == (1, 2)


def test_trailing_padding_mask_keeps_pad_tokens_inside_a_text():
    x = torch.tensor([[5, 0, 7, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    assert trailing_padding_mask(x, 0).tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_single_label_tally_matches_reference_functions():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    obj = objectives.SingleLabel(3)
    tally = obj.tally()
    tally.add(logits, {"labels": labels})
    out = tally.result()
    assert out["accuracy"] == 0.5
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    # per class F1: class 0 (P 1/2, R 1) 2/3, class 1 (P 1, R 1/2) 2/3, class 2 (P 0) 0
    assert out["macro_f1"] == pytest.approx(4 / 9)
    assert obj.hits(logits, {"labels": labels}) == (2, 4)


def test_multilabel_loss_hits_and_tally():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.5]])
    target = torch.tensor([[1, 0, 0], [0, 1, 1]])
    obj = objectives.MultiLabel(3)
    batch = {"labels": target}
    expected = (
        sum(
            -math.log(torch.sigmoid(torch.tensor(z if t else -z)).item())
            for row_z, row_t in zip(logits.tolist(), target.tolist())
            for z, t in zip(row_z, row_t)
        )
        / 6
    )
    # the mean over examples x labels, as transformers' multi_label_classification loss (and the
    # FLASC code) computes it: torch's BCEWithLogitsLoss with its default reduction
    assert obj.loss(logits, batch).item() == pytest.approx(expected, rel=1e-6)
    assert obj.loss(logits, batch).item() == pytest.approx(
        torch.nn.BCEWithLogitsLoss()(logits, target.float()).item(), rel=1e-6
    )
    assert obj.hits(logits, batch) == (4, 6)  # decisions: 1 0 1 vs 1 0 0; 0 1 0 vs 0 1 1
    tally = obj.tally()
    tally.add(logits, batch)
    assert tally.result()["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # TP 2, FP 1, FN 1
    assert tally.result()["loss"] == pytest.approx(expected, rel=1e-6)  # scored as trained


def test_fisher_terms_are_the_exact_expectation_over_labels():
    z = torch.tensor([0.3, -1.2, 2.0])
    single = objectives.SingleLabel(3).fisher_terms(z)
    assert len(single) == 3
    assert sum(p for _, p in single).item() == pytest.approx(1.0)
    assert [lp.item() for lp, _ in single] == pytest.approx(F.log_softmax(z, -1).tolist())
    multi = objectives.MultiLabel(3).fisher_terms(z)
    assert len(multi) == 6  # both values of each label
    for j in range(3):
        (on, p_on), (off, p_off) = multi[2 * j], multi[2 * j + 1]
        assert p_on.item() == pytest.approx(torch.sigmoid(z[j]).item())
        assert (p_on + p_off).item() == pytest.approx(1.0)
        assert on.item() == pytest.approx(math.log(torch.sigmoid(z[j]).item()))
        assert off.item() == pytest.approx(math.log(1 - torch.sigmoid(z[j]).item()))
    assert objectives.NextToken().fisher_terms(z) is None
