"""Mapper, sparsification and losses against hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lexvla.config import MapperConfig
from lexvla.losses import ContrastiveLoss, FlopsLoss, LexVLALoss, OveruseLoss, RampUp
from lexvla.models.mapper import LexicalMapper
from lexvla.outputs import LexicalOutput
from lexvla.sparsification import Sparsification


def test_sparsify_threshold_and_topk_exact():
    v = torch.tensor([[0.5, 0.1, 0.3, 0.0, 0.3], [0.2, 0.2, 0.2, 0.9, 0.01]])
    t = Sparsification(threshold=0.25)(v)
    assert torch.equal(t, torch.tensor([[0.5, 0, 0.3, 0, 0.3], [0, 0, 0, 0.9, 0]]))
    k = Sparsification(None, topk=2)(v)
    assert ((k != 0).sum(-1) == 2).all()
    assert k[0, 0] == 0.5 and k[1, 3] == 0.9
    both = Sparsification(threshold=0.25, topk=1)(v)
    assert torch.equal(both, torch.tensor([[0.5, 0, 0, 0, 0], [0, 0, 0, 0.9, 0]]))
    assert torch.equal(Sparsification.none()(v), v)
    assert torch.equal(Sparsification()(v), Sparsification(threshold=1 / math.sqrt(5))(v))  # default 1/sqrt(V)
    with pytest.raises(ValueError):
        Sparsification(None, topk=0)


def test_sparsification_is_the_same_on_tensors_and_csr_matrices():
    import scipy.sparse as sp

    g = torch.Generator().manual_seed(0)
    v = torch.rand(6, 40, generator=g) ** 4
    for s in (Sparsification(), Sparsification(0.05, topk=5), Sparsification(None, topk=3)):
        dense = s(v)
        csr = s(sp.csr_matrix(v.numpy()))
        np.testing.assert_allclose(csr.toarray(), dense.numpy(), rtol=0, atol=0)


def test_lexical_output_sparsify_patches_and_scipy():
    v = torch.tensor([[0.8, 0.6, 0.0]])
    p = torch.tensor([[[0.1, 0.99, 0.1], [0.6, 0.8, 0.0]]])
    out = LexicalOutput(v, p, (1, 2)).sparsify(threshold=0.5)
    assert torch.equal(out.patch_vectors, torch.tensor([[[0, 0.99, 0], [0.6, 0.8, 0]]]))
    csr = out.to_scipy()
    assert csr.nnz == 2 and out.active_words().tolist() == [2]


def test_mapper_elu_is_monotonic_normalised_and_keeps_ranking():
    torch.manual_seed(0)
    scores = 15 + 2.5 * torch.randn(4, 1000)  # like SmolLM2's head scores: large positive offset
    m = LexicalMapper(MapperConfig())
    vec = m.text(scores)
    torch.testing.assert_close(vec.norm(dim=-1), torch.ones(4))
    assert (vec > 0).all()
    # Ranking of the LLM's prediction kept (top 100; far below the margin exp() underflows into ties).
    assert torch.equal(vec.topk(100).indices, scores.topk(100).indices)
    # Shift invariance: the LLM's softmax is unchanged by a constant, and so is the lexical vector.
    torch.testing.assert_close(m.text(scores + 7.0), vec)


def test_centering_makes_offset_scores_sparse_and_distinct():
    """Without centering elu(x)+1 == x+1 for all-positive scores: dense and nearly identical vectors."""
    torch.manual_seed(0)
    base = 15 + 2.5 * torch.randn(1000)
    a, b = base + 0.3 * torch.randn(1000), base + 0.3 * torch.randn(1000)
    a[:5] += 10
    b[5:10] += 10  # the two texts predict different top words
    scores = torch.stack([a, b])
    thr = 1 / math.sqrt(1000)
    raw = LexicalMapper(MapperConfig(centering="none", margin=0.0)).text(scores)
    cen = LexicalMapper(MapperConfig()).text(scores)
    assert float(raw[0] @ raw[1]) > 0.98
    assert (raw > thr).sum(-1).min() > 300
    assert float(cen[0] @ cen[1]) < 0.9
    assert (cen > thr).sum(-1).max() < 150


def test_mapper_image_max_over_patches():
    scores = torch.tensor([[[3.0, 0.0, -1.0], [0.0, 2.0, -1.0]]])
    m = LexicalMapper(MapperConfig(centering="none", margin=0.0))
    vec, patches = m.image(scores, return_patches=True)
    act = F.elu(scores) + 1
    expected = F.normalize(act.amax(1), dim=-1)
    torch.testing.assert_close(vec, expected)
    torch.testing.assert_close(patches, F.normalize(act, dim=-1))
    logm = LexicalMapper(MapperConfig(activation="log1p_relu", centering="none", margin=0.0))
    v2, _ = logm.image(scores)
    assert v2[0, 2] == 0  # exact zeros with log1p(relu)


def test_contrastive_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2 * img @ txt.T = [[2, 1.2], [0, 1.6]]
    row = [-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))), -math.log(math.exp(1.6) / (1 + math.exp(1.6)))]
    col = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))]
    expected = 0.5 * (sum(row) / 2 + sum(col) / 2)
    assert math.isclose(float(ContrastiveLoss()(img, txt, scale)), expected, rel_tol=1e-6)


def test_overuse_and_flops_hand_computed():
    s = torch.tensor([[0.0, 1.0, 3.0], [2.0, 1.0, 1.0]])
    a = [1.0, 1.0, 2.0]  # column means
    overuse = sum(x / sum(a) * x**2 for x in a)  # (1 + 1 + 8) / 4 = 2.5
    assert math.isclose(float(OveruseLoss()(s)), overuse) and math.isclose(overuse, 2.5)
    assert math.isclose(float(FlopsLoss()(s)), 1 + 1 + 4)


def test_overuse_penalises_shared_words_more_than_specific_ones():
    shared = torch.zeros(4, 8)
    shared[:, 0] = 1.0
    specific = torch.eye(4, 8)
    assert OveruseLoss()(shared) > OveruseLoss()(specific)


def test_ramp_up_and_total_loss_terms():
    r = RampUp(1e-3, steps=10)
    assert r(0) == 0 and math.isclose(r(5), 2.5e-4) and r(10) == 1e-3 and r(100) == 1e-3
    img = F.normalize(torch.rand(3, 6), dim=-1)
    txt = F.normalize(torch.rand(3, 6), dim=-1)
    loss = LexVLALoss("flops", image_weight=0.5, text_weight=0.25, ramp_steps=0)(img, txt, torch.tensor(10.0))
    expected = ContrastiveLoss()(img, txt, torch.tensor(10.0)) + 0.5 * FlopsLoss()(img) + 0.25 * FlopsLoss()(txt)
    torch.testing.assert_close(loss.loss, expected)
    assert set(loss.terms) == {"contrastive", "flops_image", "flops_text"}
    with pytest.raises(ValueError):
        LexVLALoss("l1")


def test_mapper_max_words_caps_both_sides_with_straight_through_gradients():
    m = LexicalMapper(MapperConfig(max_words=3, centering="none", margin=0.0))  # no centering: no coupling
    scores = torch.randn(2, 50, requires_grad=True)
    v = m.text(scores)
    assert ((v > 0).sum(-1) == 3).all()
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))
    # straight-through: a word outside the top 3 still gets a gradient (else a training start with
    # disjoint image / caption top-k sets could never move)
    (v * torch.arange(50.0)).sum().backward()
    assert ((scores.grad != 0).sum(-1) > 3).all()
    img, patches = m.image(torch.randn(2, 4, 50), return_patches=True)
    assert ((img > 0).sum(-1) == 3).all() and ((patches > 0).sum(-1) == 3).all()
    with pytest.raises(ValueError, match="max_words"):
        MapperConfig(max_words=0)
