"""A zoo name with a saved trained default loads those weights (what `lexvla demo` leaves behind)."""

import torch

import lexvla
from lexvla.models import zoo


def test_trained_default_is_used_until_the_zoo_entry_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path))
    untrained = lexvla.create_model("lexvla-tiny")
    assert zoo.find_trained("lexvla-tiny") is None
    with torch.no_grad():
        untrained.visual_codebook.add_(0.5)
    zoo.save_trained(untrained, "lexvla-tiny")
    assert lexvla.create_model("lexvla-tiny").fingerprint() == untrained.fingerprint()
    fresh = lexvla.create_model("lexvla-tiny", trained=False)
    assert fresh.fingerprint() != untrained.fingerprint()
    assert lexvla.create_model("lexvla-tiny", **{"init_temperature": 0.05}).fingerprint() != untrained.fingerprint()
    original = zoo.get_config
    monkeypatch.setattr(zoo, "get_config", lambda name: original(name).replace(**{"adapter.width": 16}))
    assert zoo.find_trained("lexvla-tiny") is None  # trained from another entry: not used
