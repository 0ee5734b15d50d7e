"""`data imagenet` throughput: images/s to unpack an ImageNet archive into the ImageFolder, as is and resized to
a 256 px short side while unpacking (`--short-side 256`), and to verify the result (decode every image
written, which `data imagenet` does at the end), per worker count.

It writes ImageNet-sized JPEGs (500x375, quality 90, photograph-like, as benchmarks/data_pipeline.py makes
them) into a Hub-style `train_images_0.tar.gz` (ILSVRC/imagenet-1k's file names), then times the writer
`data imagenet` runs on it (sources.archive_items -> prepare.folder_jobs -> images.write_images) for each
configuration, round after round so that machine noise hits all alike; medians. With one worker everything
runs in one process, so that row is images/s per core; with more, the main process reads and gunzips the
archive while the workers decode, resize and write.

    python benchmarks/unpack_resize.py [--images 1000 --workers 1,2 --rounds 3]
"""
from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from data_pipeline import photo_like

from resnet50_recipe.data.images import verify, write_images
from resnet50_recipe.data.pipeline import usable_cores
from resnet50_recipe.data.prepare import folder_jobs
from resnet50_recipe.data.sources import archive_items, imagenet_wnids


def write_archive(path: Path, images: int, size: tuple[int, int], classes: int = 10) -> float:
    """Returns the mean JPEG size in KB."""
    rng, wnids, total = np.random.default_rng(0), imagenet_wnids()[:classes], 0
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:
        for i in range(images):
            buf = io.BytesIO()
            photo_like(rng, size).save(buf, format="JPEG", quality=90)
            info = tarfile.TarInfo(f"{wnids[i % classes]}_{i}_{wnids[i % classes]}.JPEG")
            info.size, total = buf.tell(), total + buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return total / images / 1024


def unpack(archive: Path, out: Path, short_side: int | None, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    results = write_images(folder_jobs(archive_items([archive]), out / "train", short_side, 90), workers, quiet=True)
    seconds = time.perf_counter() - start
    assert not [r for r in results if r.startswith("failed")], results
    return len(results) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    parser.add_argument("--workers", default=f"1,{usable_cores()}", help="worker counts to measure")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    workers = sorted({int(w) for w in args.workers.split(",")})
    configs = [(f"{'resize 256' if side else 'as is'}, {w} worker{'s' * (w > 1)}", side, w)
               for side in (None, 256) for w in workers]
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "hub" / "data" / "train_images_0.tar.gz"
        kb = write_archive(archive, args.images, size)
        print(f"{args.images} JPEGs of {size[0]}x{size[1]}, mean {kb:.0f} KB, in {archive.stat().st_size / 2**20:.0f} "
              f"MB of tar.gz; {usable_cores()} usable cores")
        rates = {}
        for _ in range(args.rounds):
            for name, side, w in configs:
                rates.setdefault(name, []).append(unpack(archive, Path(tmp) / "out", side, w))
                start = time.perf_counter()  # what `data imagenet` does next: decode every image written
                verify(Path(tmp) / "out", workers=w, quiet=True)
                rates.setdefault(f"verify after {name}", []).append(args.images / (time.perf_counter() - start))
        print("| configuration | img/s (median) | img/s per worker | minutes per 10,000 images | trials |")
        print("|---|---|---|---|---|")
        for name, trials in rates.items():
            w = int(name.rsplit(", ", 1)[1].split()[0])
            rate = statistics.median(trials)
            print(f"| {name} | {rate:.0f} | {rate / w:.0f} | {10_000 / rate / 60:.1f} | "
                  f"{', '.join(f'{t:.0f}' for t in trials)} |")


if __name__ == "__main__":
    main()
