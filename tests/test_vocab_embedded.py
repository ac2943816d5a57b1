"""Vocabulary filter on the real SmolLM2 tokenizer, and the real embedded LLM's untrained predictions."""

import pytest
import torch

import lexvla
from lexvla.models.text import load_tokenizer
from lexvla.vocab import Vocabulary, VocabularyFilter, build_vocabulary


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_tokenizer("embedded:smollm2")


def test_vocabulary_filter_on_smollm2(smol_tokenizer):
    vocab = build_vocabulary(smol_tokenizer)
    assert 20000 < len(vocab) < 24000  # 49,152 tokens -> 22,600 words (docs/architecture.md)
    for word in ("red", "circle", "apple", "dog", "beach", "triangle"):
        assert word in vocab
    # Word-initial BPE fragments (seen as top words of collapsed vectors in a trial), continuations,
    # special tokens, numbers, one-letter tokens. Fragments that are also dictionary entries ("ing",
    # "st") stay: no word list can tell them apart (docs/architecture.md).
    for junk in ("strugg", "authent", "affili", "tion", "<|endoftext|>", "2024", "a"):
        assert junk not in vocab
    assert all(w.isalpha() and w.islower() and w.isascii() for w in vocab.words)
    assert len(set(vocab.words)) == len(vocab)
    tokens = smol_tokenizer.convert_ids_to_tokens(vocab.token_ids[:50])
    assert all(t.startswith("Ġ") for t in tokens)
    # Deterministic, and the letters-only variant is a superset.
    assert build_vocabulary(smol_tokenizer).words == vocab.words
    loose = build_vocabulary(smol_tokenizer, VocabularyFilter(dictionary="none"))
    assert set(vocab.words) < set(loose.words)


def test_vocabulary_round_trip(tmp_path, smol_tokenizer):
    vocab = build_vocabulary(smol_tokenizer)
    vocab.save(tmp_path / "v.json")
    again = Vocabulary.load(tmp_path / "v.json")
    assert again.words == vocab.words and again.fingerprint() == vocab.fingerprint()
    assert again.index("RED") == vocab.index("red")
    with pytest.raises(KeyError, match="not in the lexical vocabulary"):
        vocab.index("qwertyuiop")


@pytest.mark.slow
def test_embedded_llm_untrained_text_vector_names_the_caption():
    model = lexvla.create_model("lexvla-embedded").eval()
    with torch.no_grad():
        out = model.encode_text(["a photo of a red apple", "a blue circle", "a dog on the beach"])
    words = [[w for w, _ in ws] for ws in model.top_words(out, k=10)]
    assert {"apple", "red"} & set(words[0])
    assert {"blue", "circle"} & set(words[1])
    assert {"dog", "beach"} & set(words[2])
    # Sparse from the first step: the centering mapper leaves a minority of words above 1/sqrt(V),
    # and different captions are far from the cosine-0.99 collapse of plain elu+1.
    sparse = model.sparsify(out)
    assert (sparse.active_words() < 0.25 * len(model.vocab)).all()
    cos = model.similarity(out, out)
    assert cos[0, 1] < 0.95 and cos[1, 2] < 0.95
