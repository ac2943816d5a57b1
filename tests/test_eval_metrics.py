"""Retrieval and segmentation metrics against straightforward reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lexvla.eval.encode import Sparsification
from lexvla.eval.metrics import (
    chunked_ranks,
    confusion_matrix,
    key_positives,
    ranks_from_scores,
    recall_from_ranks,
    segmentation_scores,
    sparsity_stats,
)


def reference_rank(scores: np.ndarray, positives: np.ndarray, ties: str) -> np.ndarray:
    """Sort each row; among equal scores put negatives first (pessimistic) or positives first."""
    ranks = []
    negatives_first = ties == "pessimistic"
    for s, p in zip(scores, positives):
        order = sorted(range(len(s)), key=lambda c, p=p, s=s: (-s[c], bool(p[c]) == negatives_first))
        ranks.append(next(i for i, c in enumerate(order) if p[c]) + 1)
    return np.array(ranks)


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", range(5))
def test_ranks_match_reference_with_ties_and_multiple_positives(ties, seed):
    rng = np.random.default_rng(seed)
    q, c = 40, 30
    scores = rng.integers(0, 4, size=(q, c)).astype(np.float32)  # few values -> many ties
    positives = rng.random((q, c)) < 0.15
    positives[np.arange(q), rng.integers(0, c, q)] = True  # every query has >= 1 positive
    got = ranks_from_scores(scores, positives, ties)
    np.testing.assert_array_equal(got, reference_rank(scores, positives, ties))


def test_hand_made_matrix():
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2], [0.1, 0.3, 0.8, 0.8]])
    positives = np.array([[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]], dtype=bool)
    # query 0: positive tied with one negative and behind 0.9; query 1: all tied; query 2: tie with a negative
    np.testing.assert_array_equal(ranks_from_scores(scores, positives, "pessimistic"), [3, 4, 2])
    np.testing.assert_array_equal(ranks_from_scores(scores, positives, "optimistic"), [2, 1, 1])
    r = recall_from_ranks([3, 4, 2], ks=(1, 2, 5))
    assert r.recall == {1: 0.0, 2: pytest.approx(1 / 3), 5: 1.0}
    assert r.mean_rank == 3.0 and r.median_rank == 3.0


def test_ranks_are_independent_of_candidate_order():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(20, 15)).astype(np.float32)
    pos = rng.random((20, 15)) < 0.2
    pos[:, 0] = True
    perm = rng.permutation(15)
    for ties in ("pessimistic", "optimistic"):
        np.testing.assert_array_equal(
            ranks_from_scores(scores, pos, ties), ranks_from_scores(scores[:, perm], pos[:, perm], ties)
        )


def test_empty_and_positive_less_inputs_fail_clearly():
    with pytest.raises(ValueError, match="empty"):
        ranks_from_scores(np.zeros((0, 3)), np.zeros((0, 3), bool))
    with pytest.raises(ValueError, match="no positive"):
        ranks_from_scores(np.zeros((2, 3)), np.array([[1, 0, 0], [0, 0, 0]], bool))
    with pytest.raises(ValueError, match="empty"):
        recall_from_ranks([])
    with pytest.raises(ValueError, match="ties"):
        ranks_from_scores(np.zeros((1, 1)), np.ones((1, 1), bool), "random")


def test_chunked_ranks_equal_full_matrix():
    torch.manual_seed(0)
    img = torch.rand(13, 50)
    txt = torch.rand(65, 50)
    img_keys = np.arange(13)
    txt_keys = np.repeat(np.arange(13), 5)
    full = ranks_from_scores(img @ txt.T, key_positives(img_keys, txt_keys))
    np.testing.assert_array_equal(chunked_ranks(img, txt, img_keys, txt_keys, chunk=4), full)
    full_t = ranks_from_scores(txt @ img.T, key_positives(txt_keys, img_keys))
    np.testing.assert_array_equal(chunked_ranks(txt, img, txt_keys, img_keys, chunk=7), full_t)


def reference_miou(preds, targets, k, ignore=255):
    p = np.concatenate([x.ravel() for x in preds])
    t = np.concatenate([x.ravel() for x in targets])
    keep = t != ignore
    p, t = p[keep], t[keep]
    ious = []
    for c in range(k):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else None)
    present = [i for i in ious if i is not None]
    return float(np.mean(present)), ious, float(np.mean(p == t))


@pytest.mark.parametrize("seed", range(4))
def test_miou_matches_reference_with_ignore_label(seed):
    rng = np.random.default_rng(seed)
    k = 6
    preds, targets = [], []
    conf = np.zeros((k, k), np.int64)
    for _ in range(3):
        t = rng.integers(0, k - 1, size=(17, 23))  # class k-1 never in the ground truth
        t[rng.random(t.shape) < 0.2] = 255
        p = rng.integers(0, k - 2, size=t.shape)  # classes k-2, k-1 never predicted
        preds.append(p)
        targets.append(t)
        conf += confusion_matrix(p, t, k)
    got = segmentation_scores(conf)
    miou, ious, acc = reference_miou(preds, targets, k)
    assert got.miou == pytest.approx(miou)
    assert got.pixel_accuracy == pytest.approx(acc)
    assert got.iou[-1] is None  # in neither ground truth nor prediction
    for a, b in zip(got.iou, ious):
        assert (a is None and b is None) or a == pytest.approx(b)


def test_confusion_rejects_unknown_labels():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros((2, 2)), np.array([[0, 7], [255, 1]]), 3)
    with pytest.raises(ValueError, match="no labelled pixels"):
        segmentation_scores(np.zeros((3, 3)))


def test_sparsification_and_stats():
    v = torch.tensor([[0.9, 0.3, 0.1, 0.0], [0.5, 0.5, 0.5, 0.5]])
    th = Sparsification.parse("threshold")  # 1/sqrt(4) = 0.5, strict ">"
    assert (th(v) != 0).sum(1).tolist() == [1, 0]
    assert (Sparsification.parse("topk:2")(v) != 0).sum(1).tolist() == [2, 2]
    assert torch.equal(Sparsification.parse("none")(v), v)
    assert th.describe(4) == {"spec": "threshold", "mode": "threshold", "threshold": 0.5, "topk": None,
                              "value": 0.5, "default_threshold": True}
    with pytest.raises(ValueError, match="sparsification"):
        Sparsification.parse("top:3")
    both = Sparsification.parse("threshold:0.2,topk:1")
    assert (both(v) != 0).sum(1).tolist() == [1, 1] and str(both) == "threshold:0.2,topk:1"
    for spec in ("threshold", "threshold:0.01", "topk:64", "threshold,topk:8", "none"):
        assert str(Sparsification.parse(spec)) == spec  # the spelling round-trips
    s = sparsity_stats(v)
    share = np.array([1.0, 1.0, 1.0, 0.5])
    assert s.flops == pytest.approx(float((share**2).sum()))
    assert s.mean_active == 3.5


def test_localisation_auc_and_patch_object_share():
    from lexvla.eval.patchdis import patch_object_share, separation_auc

    rng = np.random.default_rng(1)
    pos = rng.integers(0, 5, 30).astype(float)  # integer scores: many ties
    neg = rng.integers(0, 4, 40).astype(float)
    brute = np.mean([[1.0 if p > n else 0.5 if p == n else 0.0 for n in neg] for p in pos])
    assert separation_auc(pos, neg) == pytest.approx(brute)
    assert separation_auc(pos, np.array([])) is None
    label = np.zeros((4, 4), np.int64)
    label[:2, :2] = 3  # top-left patch all object
    label[2:, 2:] = 255  # bottom-right patch all ignored
    label[0, 2] = 1  # one of four pixels of the top-right patch
    share = patch_object_share(label, (2, 2), background=0)
    assert share[0] == 1.0 and share[1] == 0.25 and share[2] == 0.0 and np.isnan(share[3])


def test_overused_outside_caption_and_top_word_share():
    import torch

    from lexvla.eval.sparsity import overused_outside_caption, top_word_share

    words = ["the", "cat", "dog", "red"]
    v = torch.tensor([[0.5, 0.8, 0.0, 0.0], [0.5, 0.0, 0.8, 0.0], [0.5, 0.0, 0.0, 0.8], [0.0, 0.9, 0.0, 0.0]])
    caps = ["The cat", "a dog", "red!", "cat"]
    top = overused_outside_caption(v, caps, words)
    assert top[0].word == "the" and abs(top[0].active_share - 0.5) < 1e-6  # named in caption 0: not counted
    assert all(w.word != "cat" for w in top)  # active only where named
    share = top_word_share(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[1.0, 1.0, 1.0]]), k=1)
    assert abs(float(share[0]) - 0.5) < 1e-6
