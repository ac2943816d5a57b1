"""Issue 10's text-side fixes on tiny fixtures: prior subtraction (``text.prior``), the function-word
filter, and the overuse penalty's gradient (it pushes hardest on the words every vector uses)."""

import pytest
import torch

import lexvla
from lexvla.losses import OveruseLoss
from lexvla.vocab import FUNCTION_WORDS, VocabularyFilter, build_vocabulary

CAPTIONS = ["a red circle", "a blue square", "two green triangles on a white background"]


@pytest.fixture()
def lora_model():
    m = lexvla.create_model("lexvla-tiny", **{"text.lora.last_layers": 1, "text.prior": ""})
    with torch.no_grad():  # LoRA B starts at zero: perturb it so LoRA changes the prior too
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return m


def test_prior_is_subtracted_before_the_mapper(lora_model):
    m = lora_model.eval()
    with torch.no_grad():
        h = m.text.hidden([*CAPTIONS, ""])
        want = (h[:3] - h[3:]) @ m.text.codebook.T
        got = m.text.scores(CAPTIONS)
        empty = m.text.scores([""])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the empty caption's own scores are zero: the prior has nothing left to say
    assert got.abs().max() > 0 and float(empty.abs().max()) == 0.0
    # a caption's vector does not depend on its batch
    with torch.no_grad():
        alone = m.encode_text(CAPTIONS[1:2]).vectors
        batch = m.encode_text(CAPTIONS).vectors
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=1e-5)


def test_prior_off_is_the_plain_score(lora_model):
    m = lora_model.eval()
    m.config.text.prior = None
    with torch.no_grad():
        torch.testing.assert_close(m.text.scores(CAPTIONS), m.text.hidden(CAPTIONS) @ m.text.codebook.T)


def test_prior_gets_gradient_in_the_split_pass(lora_model):
    """Training: the prior is the *current* LoRA's, computed with its graph in the same split pass."""
    m = lora_model.train()
    s = m.text.scores(CAPTIONS)
    assert "" in m.text._prefix  # the prior's lower layers are cached like a caption's
    s.pow(2).sum().backward()
    grads = [p.grad for n, p in m.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    with torch.no_grad():  # same numbers as the full (unsplit) inference pass
        m.eval()
        torch.testing.assert_close(s.detach(), m.text.scores(CAPTIONS), atol=1e-4, rtol=1e-4)


def test_prior_must_be_a_string():
    from lexvla.config import TextConfig

    with pytest.raises(ValueError, match="text.prior"):
        TextConfig(prior=3)


def test_function_word_filter_on_a_tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "Ġthe", "Ġit", "Ġsomething", "Ġdog", "Ġred", "Ġup", "Ġface", "Ġin", "Ġfour", "ing"]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)},
                                                                              unk_token="<unk>")),
                                  unk_token="<unk>")
    plain = build_vocabulary(tok, VocabularyFilter(dictionary="none"))
    stop = build_vocabulary(tok, VocabularyFilter(dictionary="none", function_words=True))
    assert plain.words == ["the", "it", "something", "dog", "red", "up", "face", "in", "four"]
    # closed-class words go; content words, directions and numbers stay
    assert stop.words == ["dog", "red", "up", "face", "four"]
    assert stop.token_ids == [4, 5, 6, 7, 9]
    assert {"the", "it", "something", "in"} <= FUNCTION_WORDS and not {"up", "face", "four"} & FUNCTION_WORDS


def test_overuse_gradient_is_largest_on_the_shared_word():
    """Word 0 fires in every vector, the others once each: the penalty's gradient on word 0 is the largest,
    so a weight that bites lowers the shared word first."""
    v = torch.zeros(4, 5)
    v[:, 0] = 1.0
    v[torch.arange(4), torch.arange(1, 5)] = 1.0
    v = torch.nn.functional.normalize(v, dim=-1).requires_grad_(True)
    loss = OveruseLoss()(v)
    loss.backward()
    g = v.grad.sum(0)
    assert float(g[0]) > 0 and float(g[0]) > 3 * float(g[1:].max())
    # the value: a = mean over rows; sum(a^3) / sum(a)
    a = v.detach().mean(0)
    torch.testing.assert_close(loss.detach(), (a ** 3).sum() / a.sum())


def test_running_prior_mean_trains_saves_and_loads(tmp_path):
    """text.prior_mean: a training step sets the running mean (first batch: its mean; then momentum 0.1),
    inference subtracts it, and it travels with the trained weights."""
    from lexvla.models.text import PRIOR_MOMENTUM

    m = lexvla.create_model("lexvla-tiny", **{"text.prior_mean": True})
    assert float(m.text.prior_state.abs().sum()) == 0.0  # nothing seen yet: no prior
    m.train()
    with torch.no_grad():
        first = m.text.hidden(CAPTIONS).mean(0)
    m.text.scores(CAPTIONS)
    torch.testing.assert_close(m.text.prior_state, first)
    with torch.no_grad():
        second = m.text.hidden(CAPTIONS[:2]).mean(0)
    m.text.scores(CAPTIONS[:2])
    torch.testing.assert_close(m.text.prior_state, first + PRIOR_MOMENTUM * (second - first))
    m.eval()
    with torch.no_grad():  # inference: the running mean, not the batch's
        want = (m.text.hidden(CAPTIONS[:1]) - m.text.prior_state) @ m.text.codebook.T
        torch.testing.assert_close(m.text.scores(CAPTIONS[:1]), want)
        before = m.encode_text(CAPTIONS).vectors
    m.save_pretrained(tmp_path / "m")
    back = lexvla.load(tmp_path / "m")
    torch.testing.assert_close(back.text.prior_state, m.text.prior_state)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_text(CAPTIONS).vectors, before)


def test_prior_and_prior_mean_exclude_each_other():
    from lexvla.config import TextConfig

    with pytest.raises(ValueError, match="exclude each other"):
        TextConfig(prior="", prior_mean=True)
