"""CAL loss and weights against a straightforward reference written from the paper's semantics."""

from __future__ import annotations

import math

import pytest
import torch

from lexvla.cal import CALConfig, CALLoss, MultimodalInputs, cal_loss_from_logits, gaussian_blur

IGN = -100


def reference_cal(logits, logits_wo, labels, alpha=1.0, beta=5.0, mode="flattened", eps=1e-6):
    """Plain-Python CAL: shift, raw ground-truth logit difference, clamp, window-3 mean, weighted CE."""
    b, t, _ = logits.shape
    diff, ce, valid = [], [], []
    for i in range(b):
        for j in range(t - 1):
            y = int(labels[i, j + 1])
            ok = y != IGN
            yy = y if ok else 0  # the official code gathers token 0 at ignored positions
            diff.append(float(logits[i, j, yy] - logits_wo[i, j, yy]))
            ce.append(float(-torch.log_softmax(logits[i, j].double(), -1)[y]) if ok else 0.0)
            valid.append(ok)
    clamped = [min(max(d, alpha), beta) for d in diff]
    n = len(clamped)
    weights = []
    for k in range(n):
        if mode == "flattened":  # window over the flattened batch, padding not counted
            window = [clamped[m] for m in (k - 1, k, k + 1) if 0 <= m < n]
        elif mode == "per_sequence":  # window within the sequence, valid positions only
            row = k // (t - 1)
            window = [clamped[m] for m in (k - 1, k, k + 1)
                      if 0 <= m < n and m // (t - 1) == row and valid[m]]
        else:
            window = [clamped[k]]
        weights.append(sum(window) / len(window) if valid[k] else 0.0)
    norm = sum(w for w, v in zip(weights, valid, strict=True) if v) + eps
    loss = sum(c * w for c, w in zip(ce, weights, strict=True)) / norm
    plain = sum(ce) / sum(valid)
    return loss, torch.tensor(weights).view(b, t - 1), torch.tensor(diff).view(b, t - 1), plain


def random_case(seed=0, b=3, t=9, v=13):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    logits_wo = logits + torch.randn(b, t, v, generator=g) * 3  # differences spread over [-9, 9]
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :3] = IGN  # prompt / image positions
    labels[0, -2:] = IGN  # right padding
    labels[1, 4] = IGN  # a hole in the middle of a target
    return logits, logits_wo, labels


@pytest.mark.parametrize("mode", ["flattened", "per_sequence", "none"])
@pytest.mark.parametrize("clamp", [(1.0, 5.0), (0.5, 2.0)])
def test_loss_and_weights_match_reference(mode, clamp):
    for seed in range(3):
        logits, logits_wo, labels = random_case(seed)
        out = cal_loss_from_logits(logits, labels, logits_wo,
                                   CALConfig(alpha=clamp[0], beta=clamp[1], smoothing=mode))
        loss, weights, diff, plain = reference_cal(logits, logits_wo, labels, *clamp, mode=mode)
        valid = labels[:, 1:] != IGN
        assert torch.equal(out.valid, valid)
        assert torch.allclose(out.weights, weights, atol=1e-5)
        assert torch.allclose(out.logit_diff, diff * valid, atol=1e-5)
        assert math.isclose(float(out.loss), loss, rel_tol=1e-5)
        assert math.isclose(float(out.ce_loss), plain, rel_tol=1e-5)
        # weights of valid tokens lie in the clamp range; ignored positions weigh nothing
        assert bool((out.weights[valid] >= clamp[0] - 1e-6).all() and (out.weights[valid] <= clamp[1] + 1e-6).all())
        assert bool((out.weights[~valid] == 0).all())


def test_flattened_window_crosses_samples_but_per_sequence_does_not():
    logits, logits_wo, labels = random_case(1)
    labels[:] = 5  # every position valid, so the only difference is the sample boundary
    flat = cal_loss_from_logits(logits, labels, logits_wo, CALConfig(smoothing="flattened")).weights
    seq = cal_loss_from_logits(logits, labels, logits_wo, CALConfig(smoothing="per_sequence")).weights
    assert torch.allclose(flat[:, 1:-1], seq[:, 1:-1])  # interior windows agree
    assert not torch.allclose(flat[1:, 0], seq[1:, 0])  # first position sees the previous sample's last


def test_without_cal_is_plain_cross_entropy():
    logits, _, labels = random_case(2)
    out = cal_loss_from_logits(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)
    assert out.logit_diff is None


def test_weights_carry_no_gradient():
    logits, logits_wo, labels = random_case(3)
    logits = logits.clone().requires_grad_(True)
    logits_wo = logits_wo.clone().requires_grad_(True)
    out = cal_loss_from_logits(logits, labels, logits_wo)
    assert not out.weights.requires_grad and out.weights.grad_fn is None
    out.loss.backward()
    assert logits_wo.grad is None  # the "without image" logits never enter the graph
    # gradient equals that of the weighted CE with the weights as constants
    x = logits.detach().clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=IGN, reduction="none").view(labels.shape[0], -1)
    w = out.weights
    ((ce * w).sum() / (w[out.valid].sum() + 1e-6)).backward()
    assert torch.allclose(logits.grad, x.grad, atol=1e-6)


class RecordingLM:
    """A real (tiny, linear) logits function that records the grad mode and inputs of each call."""

    def __init__(self, d=8, v=11):
        torch.manual_seed(0)
        self.head = torch.nn.Linear(d, v)
        self.calls = []

    def __call__(self, inputs_embeds, attention_mask, position_ids, logits_to_keep=0):
        self.calls.append({"grad": torch.is_grad_enabled(), "mask": attention_mask.clone(),
                           "embeds": inputs_embeds.detach().clone(), "pos": position_ids.clone()})
        # attention stand-in: every position sees the masked mean of the sequence
        m = attention_mask.unsqueeze(-1).float()
        ctx = (inputs_embeds * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        out = self.head(inputs_embeds + ctx)
        return out[:, -logits_to_keep:] if logits_to_keep else out


def mm_inputs(b=2, t=10, d=8):
    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(b, t, d, generator=g, requires_grad=True)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    image = torch.zeros(b, t, dtype=torch.bool)
    image[:, 2:5] = True
    labels = torch.full((b, t), IGN)
    labels[:, 7:] = torch.randint(0, 11, (b, 3), generator=g)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return MultimodalInputs(embeds, mask, pos, labels, image)


@pytest.mark.parametrize("condition", ["remove", "mask_patches"])
def test_second_forward_is_gradient_free_with_same_positions(condition):
    lm, inputs = RecordingLM(), mm_inputs()
    out = CALLoss(CALConfig(condition=condition))(lm, inputs)
    assert [c["grad"] for c in lm.calls] == [True, False]
    with_img, without = lm.calls
    assert torch.equal(with_img["pos"], without["pos"]) and torch.equal(without["pos"], inputs.position_ids)
    if condition == "remove":
        assert torch.equal(without["mask"], inputs.attention_mask.masked_fill(inputs.image_mask, 0))
        assert torch.equal(without["embeds"], with_img["embeds"])
    else:
        assert torch.equal(without["mask"], inputs.attention_mask)
        assert bool((without["embeds"][inputs.image_mask] == 0).all())
        assert torch.equal(without["embeds"][~inputs.image_mask], with_img["embeds"][~inputs.image_mask])
    out.loss.backward()
    assert inputs.inputs_embeds.grad is not None


def test_cropped_logits_equal_full_sequence():
    lm, inputs = RecordingLM(), mm_inputs()
    cfg = CALConfig(smoothing="per_sequence")
    cropped = CALLoss(cfg)(lm, inputs, crop=True)
    full = CALLoss(cfg)(lm, inputs, crop=False)
    assert lm.calls[0]["embeds"].shape == lm.calls[2]["embeds"].shape
    assert torch.allclose(cropped.loss, full.loss, atol=1e-6)
    assert torch.allclose(cropped.weights, full.weights[:, -cropped.weights.shape[1]:])


def test_blur_condition_needs_blurred_embeddings():
    with pytest.raises(ValueError, match="blurred_embeds"):
        CALLoss(CALConfig(condition="blur"))(RecordingLM(), mm_inputs())


@pytest.mark.parametrize("kwargs", [{"alpha": 6.0}, {"smoothing": "mean"}, {"window": 2}, {"condition": "crop"}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        CALConfig(**kwargs)


def test_no_valid_label_is_an_error():
    logits = torch.randn(1, 4, 5)
    with pytest.raises(ValueError, match="no valid"):
        cal_loss_from_logits(logits, torch.full((1, 4), IGN), logits)


def test_gaussian_blur_keeps_constant_and_smooths_noise():
    flat = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, 2.0)
    assert blurred.shape == noise.shape
    assert blurred.std() < 0.5 * noise.std()
    assert torch.allclose(blurred.mean(), noise.mean(), atol=0.05)
