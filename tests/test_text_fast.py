"""The text encoder's inference fast path (merged LoRA, cached prompt prefix) gives the plain encode's vectors."""

from __future__ import annotations

import pytest
import torch

import lexvla
from lexvla.models.text_fast import FastTextEncoder

# Plain captions reuse the whole cached prefix; a leading quote, bracket or dash merges with the
# prefix's last token (`Ġ"`) and reuses only part of it; one caption is longer than the tiny model's
# max_length (cut as the plain path cuts it).
TEXTS = ["a red circle", "a blue square on a white table", '"quoted" words', "(a) bracket", "-dash", "x",
         "a very long caption " * 12, "a red circle", ""]  # "": the prior itself (scores exactly 0)


PRIORS = {"no-prior": {}, "prior": {"text.prior": ""}, "prior-mean": {"text.prior_mean": True}}


@pytest.fixture(scope="module", params=list(PRIORS))
def trained_tiny(request):
    """lexvla-tiny with non-zero LoRA weights (B starts at zero, which would make merging a no-op),
    without and with each prior subtraction (``text.prior``: the empty caption's state;
    ``text.prior_mean``: a running mean of training captions' states, here a random one)."""
    model = lexvla.create_model("lexvla-tiny", **PRIORS[request.param]).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.text.llm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if request.param == "prior-mean":
            model.text.prior_state.copy_(torch.randn(model.text.prior_state.shape, generator=gen))
    return model


@pytest.mark.parametrize("merge,prefix", [(True, False), (False, True), (True, True)])
def test_fast_path_equals_the_plain_encode(trained_tiny, merge, prefix):
    text = trained_tiny.text
    fast = FastTextEncoder(text, merge_lora=merge, prefix_cache=prefix)
    assert fast.merged == (len(text._decoder().layers) if merge else 0)
    assert bool(fast.prefix_ids) == prefix
    with torch.inference_mode():
        plain = text.hidden(TEXTS)
        got = fast.hidden(TEXTS)
        one_by_one = torch.cat([fast.hidden([t]) for t in TEXTS])
        scores_plain, scores_fast = text.scores(TEXTS), fast.scores(TEXTS)
        vec_plain = trained_tiny.encode_text(TEXTS).vectors
        vec_fast = trained_tiny.mapper.text(scores_fast)
    scale = plain.abs().max().item()
    assert (got - plain).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert (one_by_one - got).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert (scores_fast - scores_plain).abs().max().item() <= 1e-5 * max(scores_plain.abs().max().item(), 1.0)
    assert (vec_fast - vec_plain).abs().max().item() <= 1e-5
    assert torch.equal(vec_fast.topk(10).indices, vec_plain.topk(10).indices)
    # the LoRA weights matter here (a fast path that dropped them would not pass)
    base = lexvla.create_model("lexvla-tiny").eval()
    with torch.inference_mode():
        assert (base.text.hidden(TEXTS) - plain).abs().max().item() > 1e-3


def test_the_guard_notices_a_text_side_it_does_not_reproduce(trained_tiny):
    fast = FastTextEncoder(trained_tiny.text)
    assert fast.agrees()
    fast.codebook = fast.codebook * 1.001  # a stand-in for a text-side change the fast path misses
    assert not fast.agrees()


def test_fast_path_is_a_snapshot_and_leaves_the_model_alone(trained_tiny):
    text = trained_tiny.text
    before = {k: v.clone() for k, v in text.llm.state_dict().items()}
    FastTextEncoder(text)
    after = text.llm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any("lora_" in k for k in after), "the model keeps its (unmerged) adapters for training"
