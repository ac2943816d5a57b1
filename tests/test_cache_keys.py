"""One feature-cache key for every entry point: a cache that ``lexvla data cache`` built is the one the
trainer reads (it used to compute a different key for the same weights and silently rebuild)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import lexvla
from lexvla.cli import main
from lexvla.data.cache import backbone_fingerprint


def _manifest(folder):
    rows = []
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 30, 200 - 40 * i)).save(folder / f"{i}.png")
        rows.append({"image": str(folder / f"{i}.png"), "caption": f"picture number {i}"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_cache_built_by_the_data_command_is_hit_by_the_trainer(tmp_path, capsys, caplog):
    from accelerate import Accelerator

    from lexvla.train.config import DataSection
    from lexvla.train.data import TrainStream

    manifest, root = _manifest(tmp_path), tmp_path / "features"
    assert main(["data", "cache", "--manifest", str(manifest), "--model", "lexvla-tiny", "--out", str(root)]) == 0
    assert "computed 4" in capsys.readouterr().out
    (built,) = root.iterdir()
    index_before = (built / "index.json").stat().st_mtime_ns

    model = lexvla.create_model("lexvla-tiny")  # another build of the same zoo entry, as `lexvla train` makes
    section = DataSection(source="manifest", options={"manifest": str(manifest)}, batch_size=2,
                          feature_cache=str(root))
    with caplog.at_level("INFO", logger="lexvla.data.cache"):
        stream = TrainStream(section, model, Accelerator(cpu=True), seed=0)
    assert [p.name for p in root.iterdir()] == [built.name], "the trainer computed its own cache"
    assert stream.dataset.store.folder == built and (built / "index.json").stat().st_mtime_ns == index_before
    assert any("cache hit" in r.message for r in caplog.records)
    # ...and its rows are this model's backbone features (float16 storage)
    rec = stream.source.pair_records()[0]
    with torch.no_grad():
        want = model.image_features(model.preprocess([rec.image]))[0]
    got = torch.as_tensor(stream.dataset.store.stack([rec.image_id]))[0].float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)

def test_backbone_fingerprint_is_the_weights_not_where_they_came_from():
    a = lexvla.create_model("lexvla-tiny").backbone
    b = lexvla.models.backbones.create_backbone(a.cfg)
    assert backbone_fingerprint(a) == backbone_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1
    assert backbone_fingerprint(a) != backbone_fingerprint(b)
    other_grid = lexvla.models.backbones.create_backbone(type(a.cfg)(**{**vars(a.cfg), "grid": 2}))
    assert backbone_fingerprint(other_grid) != backbone_fingerprint(a)  # same weights, other output


def test_cal_features_use_the_same_backbone_identity(tmp_path):
    from lexvla.cal.data import compute_features

    backbone = lexvla.create_model("lexvla-tiny").backbone
    img = tmp_path / "a.png"
    Image.new("RGB", (30, 30), (10, 200, 30)).save(img)
    compute_features(backbone, [str(img)], cache=tmp_path / "cal")
    (file,) = (tmp_path / "cal").iterdir()
    # the file name is a hash of a key holding backbone_fingerprint: a changed weight gives a new file
    with torch.no_grad():
        next(backbone.parameters()).view(-1)[0] += 1
    compute_features(backbone, [str(img)], cache=tmp_path / "cal")
    assert len(list((tmp_path / "cal").iterdir())) == 2


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
