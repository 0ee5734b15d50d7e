"""Training input pipeline images/s on one core: full JPEG decoding, reduced-size (draft) decoding, and data
pre-resized to a 256 px short side with `resnet50-recipe data resize`.

It writes ImageNet-sized JPEGs (500x375, quality 90, textured like photographs so they compress to a
photograph's file size) to a temporary folder, makes the resized copy with `images.resize`, then measures
the recipe's own pipeline (ImageFolderDataset + timm transform + DataLoader with 1 worker + uint8 collate,
through `bench_data.measure`, as `resnet50-recipe bench data` does) for each configuration in turn, round
after round, so that machine noise hits all alike. Reported: the median img/s of each and its ratio to full
decoding, per recipe (train size and augmentation differ). A recipe name with ":crop-only" runs that recipe
with RandAugment and colour jitter off: decode, random-resized crop, flip and collate, the part of the
pipeline that the decoding choice changes.

    python benchmarks/data_pipeline.py [--recipes imagenet-100ep,imagenet-100ep:crop-only --size 500x375]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from resnet50_recipe.data.bench import measure
from resnet50_recipe.data.images import resize
from resnet50_recipe.recipe import load_recipe

CROP_ONLY = ["augment.auto_augment=null", "augment.color_jitter=null"]
CONFIGS = (("full decode", False, "orig"), ("draft decode", True, "orig"),
           ("pre-resized (256), full decode", False, "small"), ("pre-resized (256), draft decode", True, "small"))


def photo_like(rng: np.random.Generator, size=(500, 375)) -> Image.Image:
    """Smooth colour fields plus texture at a few scales: entropy (and so decode work) near a photograph's."""
    w, h = size
    layers = [np.asarray(Image.fromarray(rng.integers(0, 255, (max(2, h // s), max(2, w // s), 3), dtype=np.uint8))
                         .resize(size, Image.BICUBIC), dtype=np.float32) for s in (94, 24, 6)]
    pixels = 0.5 * layers[0] + 0.3 * layers[1] + 0.2 * layers[2] + rng.normal(0, 9, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_dataset(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "train" / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo_like(rng, size).save(folder / f"img{i:05d}.JPEG", quality=90)
    return root


def mean_kb(root: Path) -> float:
    return statistics.mean(p.stat().st_size for p in root.rglob("*.JPEG")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes",
                        default="imagenet-100ep,imagenet-100ep:crop-only,imagenet-81,imagenet-81:crop-only")
    parser.add_argument("--size", default="500x375", help="generated JPEG size, WxH")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement, after 1 warm-up")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        roots = {"orig": write_dataset(Path(tmp) / "orig", args.images, args.classes, size)}
        roots["small"] = Path(tmp) / "small"
        resize(roots["orig"], roots["small"], short_side=256, quality=90, workers=1, quiet=True)
        with Image.open(next(roots["small"].rglob("*.JPEG"))) as img:
            small = "x".join(map(str, img.size))
        print(f"# {args.images} JPEGs {args.size} q90, mean {mean_kb(roots['orig']):.0f} KB; resized {small} q90, "
              f"mean {mean_kb(roots['small']):.0f} KB; {args.workers} loader worker, batch {args.batch}, "
              f"{args.batches} timed batches x {args.rounds} rounds")
        for name in args.recipes.split(","):
            recipe = load_recipe(name.split(":")[0], CROP_ONLY if name.endswith(":crop-only") else [])
            rates = {label: [] for label, _, _ in CONFIGS}
            for _ in range(args.rounds):
                for label, draft, data in CONFIGS:
                    r = measure(roots[data], recipe, args.workers, args.batches, draft, args.batch)
                    rates[label].append(r["img_s"])
            base = statistics.median(rates["full decode"])
            for label, _, _ in CONFIGS:
                median = statistics.median(rates[label])
                print(json.dumps({"recipe": name, "image": args.size, "train_size": recipe.augment.train_size,
                                  "auto_augment": recipe.augment.auto_augment, "config": label,
                                  "img_s_median": round(median, 1), "ratio": round(median / base, 2),
                                  "trials": [round(x) for x in rates[label]]}), flush=True)


if __name__ == "__main__":
    main()
