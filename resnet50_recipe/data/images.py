"""Passes over every image of an ImageFolder, in parallel: verify (decode all, report problems, optionally
re-encode them) and resize (a smaller copy that decodes faster)."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from resnet50_recipe.data.pipeline import IMAGE_EXTENSIONS, default_workers
from resnet50_recipe.errors import MissingInput, UserError

__all__ = ["JPEG_EXTENSIONS", "FIXABLE", "list_images", "check_image", "fix_image", "verify", "write_image",
           "write_images", "resize"]

JPEG_EXTENSIONS = (".jpg", ".jpeg")

FIXABLE = ("cmyk", "not_jpeg", "truncated")


def list_images(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: [files]}} for root/train and root/val (hidden files and folders left out)."""
    splits = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            continue
        splits[split] = {
            d.name: sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
                           and f.name.lower().endswith(IMAGE_EXTENSIONS))
            for d in sorted((root / split).iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not splits:
        raise MissingInput(f"{root}: no train/ or val/ folder; expected DIR/train/<class>/*.jpg")
    return splits


def _parallel(fn, items: list, workers: int | None, desc: str, quiet: bool) -> list:
    workers = default_workers() if workers is None else workers
    bar = dict(total=len(items), desc=desc, unit="img", disable=quiet)
    if workers <= 1:
        return [fn(item) for item in tqdm(items, **bar)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=64), **bar))


# ---------------------------------------------------------------------------------------------------------
# Verify


def check_image(path: Path) -> dict | None:
    """None for a clean image, else {"path", "kind", "detail"}; kind is one of corrupt, truncated, cmyk,
    not_jpeg (e.g. the PNG saved as .JPEG that ImageNet's train set holds)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            img.load()  # LOAD_TRUNCATED_IMAGES is off: a short file raises here
    except UnidentifiedImageError as e:
        return {"path": str(path), "kind": "corrupt", "detail": str(e)}
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        kind = "truncated" if "truncated" in str(e) or "broken data stream" in str(e) else "corrupt"
        return {"path": str(path), "kind": kind, "detail": str(e)}
    if path.suffix.lower() in JPEG_EXTENSIONS and fmt != "JPEG":
        return {"path": str(path), "kind": "not_jpeg", "detail": f"{fmt} data in a {path.suffix} file"}
    if mode == "CMYK":
        return {"path": str(path), "kind": "cmyk", "detail": "CMYK colour, which some decoders get wrong"}
    return None


def fix_image(problem: dict) -> dict:
    """Re-encode a fixable image as an RGB JPEG (or the format its extension names) in place, through a
    temporary file. A truncated image keeps what decodes; the rest of it is grey."""
    path = Path(problem["path"])
    if problem["kind"] not in FIXABLE:
        return {**problem, "fixed": False}
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = problem["kind"] == "truncated"
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        _save_atomic(rgb, path, quality=95)
    except (OSError, ValueError) as e:
        return {**problem, "fixed": False, "detail": f"{problem['detail']}; re-encoding failed: {e}"}
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return {**problem, "fixed": check_image(path) is None}


def _save_atomic(img: Image.Image, dest: Path, quality: int) -> None:
    fmt = Image.registered_extensions().get(dest.suffix.lower(), "JPEG")
    tmp = dest.with_name(f".{dest.name}.tmp")
    img.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    os.replace(tmp, dest)


def verify(root: Path, fix: bool = False, workers: int | None = None, report: Path | None = None,
           quiet: bool = False) -> dict:
    """Decode every image under root/train and root/val; write and return a JSON report with the counts per
    split and class and the problems found (and, with `fix`, whether each was re-encoded)."""
    root = Path(root)
    splits = list_images(root)
    files = [f for classes in splits.values() for images in classes.values() for f in images]
    problems = [p for p in _parallel(check_image, files, workers, "verify", quiet) if p is not None]
    if fix and problems:
        problems = _parallel(fix_image, problems, workers, "fix", quiet)
    result = {
        "root": str(root),
        "splits": {split: {"classes": len(classes), "images": sum(map(len, classes.values())),
                           "per_class": {name: len(images) for name, images in classes.items()}}
                   for split, classes in splits.items()},
        "problems": problems,
        "counts": {kind: sum(p["kind"] == kind for p in problems) for kind in ("corrupt",) + FIXABLE},
    }
    if set(splits) == {"train", "val"} and set(splits["train"]) != set(splits["val"]):
        result["class_mismatch"] = {"only_train": sorted(set(splits["train"]) - set(splits["val"])),
                                    "only_val": sorted(set(splits["val"]) - set(splits["train"]))}
    empty = [f"{split}/{name}" for split, classes in splits.items() for name, images in classes.items() if not images]
    if empty:
        result["empty_classes"] = empty
    report = Path(report) if report else root / "verify.json"
    report.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------
# Resize


def write_image(job: tuple) -> str:
    """Write one image to `dest` atomically (a temporary name, then a rename), so an interrupted run never
    leaves a file that a rerun would take as done. `job` is (source, dest, short_side, quality): source is a
    path or the file's bytes (from an archive); short_side None writes the bytes unchanged (a hard link for a
    file on the same disk); otherwise the image is scaled down to that short side, and one already as small
    keeps its bytes."""
    src, dest, short_side, quality = job
    if dest.exists():
        return "skipped"
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        if short_side is None:
            return _copy(src, dest, tmp)
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            w, h = img.size
            if min(w, h) <= short_side and img.format == "JPEG":
                return _copy(src, dest, tmp)
            scale = short_side / min(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img.draft("RGB", size)  # JPEG: decode at the largest 1/2^k scale still >= size, then filter down
            rgb = img.convert("RGB")
        if scale < 1:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        _save_atomic(rgb, dest, quality)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"failed: {src if isinstance(src, Path) else dest.name}: {e}"
    return "resized"


def _copy(src: Path | bytes, dest: Path, tmp: Path) -> str:
    if isinstance(src, bytes):
        tmp.write_bytes(src)
    else:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # same file system: no second copy of the bytes
        except OSError:
            shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return "copied"


def _write_batch(jobs: list[tuple]) -> list[str]:
    return [write_image(job) for job in jobs]


def write_images(jobs: Iterable[tuple], workers: int | None = None, total: int | None = None, desc: str = "write",
                 quiet: bool = False, batch: int = 32) -> list[str]:
    """Run write_image over `jobs`, a stream that may hold each image's bytes, on `workers` processes: at most
    a few batches are in flight, so memory stays flat however long the stream; the bar shows images/s and an
    ETA against `total`. Returns the results in the jobs' order."""
    workers = default_workers() if workers is None else workers
    results: list[str] = []
    with tqdm(total=total, desc=desc, unit="img", disable=quiet, smoothing=0.05) as bar:
        if workers <= 1:
            for job in jobs:
                results.append(write_image(job))
                bar.update()
            return results
        pool = ProcessPoolExecutor(workers)
        pending: deque = deque()
        try:
            for chunk in _batches(jobs, batch):
                pending.append(pool.submit(_write_batch, chunk))
                while len(pending) > 2 * workers or (pending and pending[0].done()):
                    done = pending.popleft().result()
                    results += done
                    bar.update(len(done))
            while pending:
                done = pending.popleft().result()
                results += done
                bar.update(len(done))
        finally:
            # On an interrupt, batches not started are dropped (their files were never written) and the
            # workers finish only the one in hand, each file of which is complete or absent.
            pool.shutdown(wait=True, cancel_futures=True)
    return results


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def resize(root: Path, out: Path, short_side: int = 256, quality: int = 90, workers: int | None = None,
           quiet: bool = False) -> dict:
    """Write a copy of root's train/ and val/ to out with each image's short side at most `short_side`.

    Resumable: each split is built in out/.<split>.partial, files written under temporary names, files
    already there skipped; the split is renamed to out/<split> when complete."""
    root, out = Path(root), Path(out)
    if short_side < 16:
        raise UserError(f"--short-side {short_side}: expected at least 16 pixels")
    if root.resolve() == out.resolve():
        raise UserError(f"{out}: the resized copy must go to another folder than {root}")
    counts = {}
    for split, classes in list_images(root).items():
        if (out / split).is_dir():
            counts[split] = {"skipped": sum(map(len, classes.values()))}
            continue
        partial = out / f".{split}.partial"
        jobs = []
        for name, images in classes.items():
            (partial / name).mkdir(parents=True, exist_ok=True)
            jobs += [(f, partial / name / f.name, short_side, quality) for f in images]
        results = write_images(jobs, workers, len(jobs), f"resize {split}", quiet)
        failed = [r[len("failed: "):] for r in results if r.startswith("failed: ")]
        if failed:
            raise UserError(f"{root / split}: {len(failed)} images could not be read, e.g. {failed[0]}; run "
                            f"`resnet50-recipe data verify {root} --fix` or remove them, then rerun to finish")
        partial.rename(out / split)
        counts[split] = {k: results.count(k) for k in ("resized", "copied", "skipped")}
    return counts
