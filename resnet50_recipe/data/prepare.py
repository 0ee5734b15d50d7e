"""Dataset preparation: Imagenette from fast.ai's archives; ImageNet-1k from the official ILSVRC2012 archives
or any layout sources.py reads (Kaggle, the Hugging Face Hub), optionally resized as it is written.

Both write an ImageFolder, OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG, and never leave one that could
be taken for complete: a split is built in a hidden OUT/.<split>.partial folder and renamed to OUT/<split>
only when it is whole, so a rerun after an interruption picks up where the last one stopped.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from resnet50_recipe.data import sources
from resnet50_recipe.data.images import verify, write_images
from resnet50_recipe.data.pipeline import IMAGE_EXTENSIONS, usable_cores
from resnet50_recipe.data.sources import IMAGENET_ARCHIVES, LazyMember
from resnet50_recipe.errors import MissingInput, UserError
from resnet50_recipe.store.s3 import RemoteRefused, S3Store

__all__ = ["IMAGENETTE", "IMAGENET_COUNTS", "file_digest", "check_digest", "download", "prepare_imagenette",
           "count_images", "parse_devkit", "prepare_imagenet", "prepare_imagenet_from", "write_imagenet",
           "folder_jobs"]

log = logging.getLogger(__name__)


# MD5s as pinned by torchvision.datasets.Imagenette (fast.ai publishes no checksums of its own).
IMAGENETTE = {
    "160": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz", "e793b78cc4c9e9a4ccc0c1155377a412"),
    "320": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz", "3df6f0d01a2c9592104656642f5e78a3"),
    "full": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz", "fe2fc210e6bb7c5664d602c3cd71e612"),
}

IMAGENET_COUNTS = {"classes": 1000, "train": 1_281_167, "val": 50_000}

_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# Downloads and checksums


def file_digest(path: Path, algorithm: str = "md5", quiet: bool = True) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=quiet,
                                     desc=f"{algorithm} {path.name}") as bar:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def check_digest(path: Path, expected: tuple[str, str] | None, quiet: bool = True) -> None:
    """`expected` is (algorithm, hex digest); a mismatch is a UserError naming both digests."""
    if expected is None:
        return
    algorithm, want = expected
    got = file_digest(path, algorithm, quiet)
    if got != want.lower():
        raise UserError(f"{path}: {algorithm} {got} does not match the expected {want}; the file is damaged or "
                        "not the official one")


def download(url: str, dest: Path, expected: tuple[str, str] | None, retries: int = 5, quiet: bool = False) -> Path:
    """Fetch `url` to `dest` through `dest.part`, resuming with an HTTP Range request after a dropped transfer
    (in this call or an earlier one). The checksum is verified before `dest` appears; a mismatch deletes the
    download so the next try starts clean."""
    if dest.is_file():
        try:
            check_digest(dest, expected, quiet)
        except ValueError as e:
            raise UserError(f"{e}; delete it to download it again") from None
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if have and response.status != 206:  # the server ignored the range: start from the beginning
                    have = 0
                total = have + int(response.headers.get("Content-Length") or 0) or None
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, disable=quiet, desc=dest.name) as bar:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        f.write(block)
                        bar.update(len(block))
            got = part.stat().st_size
            if total is not None and got < total:  # http.client ends a cut-off body quietly
                raise ConnectionError(f"connection closed after {got} of {total} bytes")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to fetch: an earlier run got it all
                break
            raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if attempt == retries - 1:
                raise UserError(f"{url}: download failed after {retries} tries ({e}); rerun to resume from "
                                f"{part.stat().st_size if part.exists() else 0} bytes") from None
            log.warning("%s: transfer interrupted (%s); resuming", url, e)
            time.sleep(min(2 ** attempt - 1, 30))
    try:
        check_digest(part, expected, quiet)
    except ValueError:
        part.unlink()
        raise
    part.rename(dest)
    return dest


# ---------------------------------------------------------------------------------------------------------
# Imagenette


def prepare_imagenette(out: Path, size: str = "160", url: str | None = None, expected: tuple[str, str] | None = None,
                       verify: bool = True, archive_dir: Path | None = None, quiet: bool = False) -> dict:
    """Download (resumable, checksum verified) and extract an Imagenette archive into out/train and out/val.

    `expected` defaults to the pinned MD5 of `size`, which a mirror serving the same file also passes."""
    if size not in IMAGENETTE:
        raise UserError(f"imagenette size {size!r}: expected one of {', '.join(IMAGENETTE)}")
    out = Path(out)
    if _finished(out):
        return count_images(out)
    official_url, official_md5 = IMAGENETTE[size]
    url = url or official_url
    expected = (expected or ("md5", official_md5)) if verify else None
    archive = Path(archive_dir or out.parent) / Path(urllib.parse.urlparse(url).path).name
    download(url, archive, expected, quiet=quiet)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".extract.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with tarfile.open(archive, mode="r|*") as tar:  # one pass through the gzip stream
            for member in tqdm(tar, desc=f"extract {archive.name}", disable=quiet, unit="file"):
                tar.extract(member, scratch, **_safe())
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(scratch, ignore_errors=True)
        raise UserError(f"{archive}: cannot extract it ({e}); delete it to download it again") from None
    roots = [p for p in scratch.rglob("train") if p.is_dir() and (p.parent / "val").is_dir()]
    if len(roots) != 1:
        shutil.rmtree(scratch)
        raise UserError(f"{archive}: expected one folder holding train/ and val/ in the archive, found {len(roots)}")
    for split in ("val", "train"):  # train last: both exist only once both moved
        if not (out / split).exists():
            (roots[0].parent / split).rename(out / split)
    shutil.rmtree(scratch)
    return count_images(out)


def _safe() -> dict:
    # tarfile's "data" filter refuses absolute paths, links out of the tree and device files (Python >= 3.12
    # and the 3.10/3.11 security releases); older Pythons get the historical behaviour.
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _finished(out: Path) -> bool:
    if (out / "train").is_dir() and (out / "val").is_dir():
        log.info("%s already holds train/ and val/; nothing to do", out)
        return True
    return False


def count_images(root: Path) -> dict:
    """{split: {"classes": n, "images": n}} for root's train/ and val/."""

    counts = {}
    for split in ("train", "val"):
        classes = [d for d in sorted((root / split).iterdir()) if d.is_dir() and not d.name.startswith(".")] \
            if (root / split).is_dir() else []
        images = sum(1 for d in classes for f in d.iterdir() if f.name.lower().endswith(IMAGE_EXTENSIONS))
        counts[split] = {"classes": len(classes), "images": images}
    return counts


# ---------------------------------------------------------------------------------------------------------
# ImageNet-1k from ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz


def parse_devkit(devkit) -> tuple[dict[int, str], list[int]]:
    """(ILSVRC2012_ID -> wnid for the 1000 leaf synsets, val ground truth as IDs in val-image order).

    As torchvision's parse_devkit_archive: meta.mat's `synsets` also holds the WordNet ancestors, and the
    classes are the leaves (num_children == 0). The ground truth names ILSVRC2012_IDs, which follow the
    devkit's own order, not the sorted-wnid order that ImageFolder indices use."""
    import scipy.io

    with _open_tar(devkit) as tar:
        files = {}
        for member in tar:
            for name in ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"):
                if member.isfile() and member.name.endswith(name):
                    files[name] = tar.extractfile(member).read()
    missing = {"data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"} - set(files)
    if missing:
        raise UserError(f"{devkit}: not an ILSVRC2012 devkit: no {', '.join(sorted(missing))} inside")
    synsets = scipy.io.loadmat(io.BytesIO(files["data/meta.mat"]), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    truth = [int(line) for line in files["data/ILSVRC2012_validation_ground_truth.txt"].decode().split()]
    unknown = sorted(set(truth) - set(id_to_wnid))
    if unknown:
        raise UserError(f"{devkit}: the val ground truth names ILSVRC2012_IDs that are no leaf synset in "
                        f"meta.mat: {unknown[:10]}")
    return id_to_wnid, truth


class _Source:
    """A local file or an s3://bucket/key object, opened as a byte stream (S3 objects are never copied to
    disk: the tar is read as it arrives)."""

    def __init__(self, location: str, endpoint_url: str | None = None):
        self.location, self.endpoint_url = str(location), endpoint_url
        if not self.is_s3 and not Path(self.location).is_file():
            raise MissingInput(f"{self.location}: archive not found")

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    def open(self):
        if not self.is_s3:
            return open(self.location, "rb")
        from botocore.exceptions import BotoCoreError, ClientError


        parent, name = self.location.rsplit("/", 1)
        store = S3Store(parent, self.endpoint_url)
        try:
            return store.client.get_object(Bucket=store.bucket, Key=store.key(name))["Body"]
        except store.client.exceptions.NoSuchKey:
            raise MissingInput(f"{self.location}: no such object") from None
        except (ClientError, BotoCoreError) as e:
            raise RemoteRefused(f"{self.location}: cannot read it ({e})") from None

    def __str__(self) -> str:
        return self.location


def _open_tar(source: _Source | str | Path):
    source = source if isinstance(source, _Source) else _Source(str(source))
    if source.is_s3:  # stream mode: reads front to back, once
        return tarfile.open(fileobj=source.open(), mode="r|*")
    return tarfile.open(source.location, mode="r:*")  # seekable: skipping a finished class is a seek


def _md5_of(source: _Source, quiet: bool) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with source.open() as f, tqdm(unit="B", unit_scale=True, disable=quiet, desc=f"md5 {source}") as bar:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def prepare_imagenet(out: Path, train_tar: str, val_tar: str, devkit: str, verify_md5: bool = False,
                     partial: bool = False, endpoint_url: str | None = None, short_side: int | None = None,
                     quality: int = 90, workers: int | None = None, quiet: bool = False) -> dict:
    """Turn the three official archives (local paths or s3:// objects) into out/train and out/val.

    - train: the class tars inside the train tar are read as streams, each image written to its wnid folder;
    - val: images go to class folders by the devkit's ground truth;
    then as `write_imagenet` (resumable per file, resized with `short_side`, counts checked, verified).
    """
    out = Path(out)
    sources = {"train": _Source(train_tar, endpoint_url), "val": _Source(val_tar, endpoint_url),
               "devkit": _Source(devkit, endpoint_url)}
    if verify_md5:
        for kind, source in sources.items():
            name, want = IMAGENET_ARCHIVES[kind]
            got = _md5_of(source, quiet)
            if got != want:
                raise UserError(f"{source}: md5 {got} is not the official {name}'s {want}")
    if _finished(out):
        return count_images(out)
    id_to_wnid, truth = parse_devkit(sources["devkit"])
    streams = {"val": lambda: _val_items(sources["val"], id_to_wnid, truth),
               "train": lambda: _train_items(sources["train"])}
    return write_imagenet(out, streams, short_side, quality, workers, partial, quiet)


def prepare_imagenet_from(out: Path, source: str, partial: bool = False, short_side: int | None = None,
                          quality: int = 90, workers: int | None = None, archive_dir: Path | None = None,
                          verify_md5: bool = False, quiet: bool = False) -> dict:
    """ImageNet from a folder holding the official archives, Kaggle's tree, the Hub's archives or webdataset
    shards (sources.detect), or from `hf:owner/name`, downloaded first into archive_dir (default: OUT's parent
    / owner--name) and kept there."""

    out = Path(out)
    repo = sources.hub_repo(source)
    if repo is not None:
        if _finished(out):
            return count_images(out)
        folder = sources.hub_download(repo, Path(archive_dir or out.parent / repo.replace("/", "--")), quiet)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise MissingInput(f"--from {source}: no such folder")
    layout = sources.detect(folder)
    if layout == "ilsvrc":
        return prepare_imagenet(out, *(str(folder / IMAGENET_ARCHIVES[kind][0]) for kind in ("train", "val", "devkit")),
                                verify_md5=verify_md5, partial=partial, short_side=short_side, quality=quality,
                                workers=workers, quiet=quiet)
    if verify_md5:
        raise UserError(f"--verify-md5 checks the official ILSVRC2012 archives; {folder} holds the {layout} layout")
    if _finished(out):
        return count_images(out)
    log.info("%s: %s layout", folder, layout)
    streams = {split: (lambda split=split: sources.split_items(folder, layout, split)) for split in ("val", "train")}
    return write_imagenet(out, streams, short_side, quality, workers, partial, quiet)


def write_imagenet(out: Path, streams: dict, short_side: int | None, quality: int, workers: int | None,
                   partial: bool, quiet: bool) -> dict:
    """Write each split's stream of (wnid, file name, path | bytes | LazyMember) into out/<split>/<wnid>/, then
    check the counts and verify every image (report: out/verify.json).

    A split is built in a hidden out/.<split>.partial folder, each file written under a temporary name and
    renamed, so an interrupted run (a signal, a dropped archive) leaves nothing that could be taken for
    complete, and a rerun skips the files already there. `short_side` writes each image resized (images.
    write_image) instead of its bytes, on `workers` processes."""

    if short_side is not None and short_side < 16:
        raise UserError(f"--short-side {short_side}: expected at least 16 pixels")
    # Decoding and resizing want every core (the main process only reads the archive); a plain copy is
    # bound by the disk, and one process does it fastest (BENCHMARKS.md).
    writers = workers if workers is not None else (usable_cores() if short_side else 1)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("val", "train"):
        if (out / split).is_dir():
            continue
        jobs = folder_jobs(streams[split](), out / f".{split}.partial", short_side, quality)
        try:
            results = write_images(jobs, writers, IMAGENET_COUNTS[split], split, quiet)
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise UserError(f"{out}: an archive ended early or is damaged ({e}); what was written is kept, and a "
                            "rerun with the complete archives finishes the job") from None
        failed = [r[len("failed: "):] for r in results if r.startswith("failed: ")]
        if failed:
            raise UserError(f"{out}: {len(failed)} images could not be decoded for resizing, e.g. {failed[0]}; "
                            "the rest is kept, and a rerun without --short-side writes them as they are")
    counts = _check_counts(out, partial)
    report = verify(out, workers=workers or usable_cores(), quiet=quiet)
    if not report["problems"]:
        log.info("%s: every image decodes (report: %s)", out, out / "verify.json")
    else:
        log.warning("%s: %d images need attention (%s), listed in %s; `resnet50-recipe data verify %s --fix` "
                    "re-encodes the fixable ones", out, len(report["problems"]),
                    ", ".join(f"{n} {k}" for k, n in report["counts"].items() if n), out / "verify.json", out)
    return counts


def folder_jobs(items, folder: Path, short_side: int | None, quality: int):
    """images.write_image jobs writing (wnid, file name, data) items into folder/<wnid>/<file name>."""
    made = set()
    for wnid, name, data in items:
        if wnid not in made:
            (folder / wnid).mkdir(parents=True, exist_ok=True)
            made.add(wnid)
        dest = folder / wnid / name
        if dest.exists():  # done by an earlier run: write_image skips it, and its bytes are never read
            yield None, dest, short_side, quality
        else:
            yield (data.read() if isinstance(data, LazyMember) else data), dest, short_side, quality


def _check_counts(out: Path, partial: bool) -> dict:
    """Rename out/.<split>.partial to out/<split> once the counts are ImageNet-1k's (or `partial` accepts
    others) and train and val have the same classes."""
    folders = {split: out / split if (out / split).is_dir() else out / f".{split}.partial"
               for split in ("train", "val")}
    counts = {split: _count(folder) for split, folder in folders.items()}
    expected = {"train": (IMAGENET_COUNTS["classes"], IMAGENET_COUNTS["train"]),
                "val": (IMAGENET_COUNTS["classes"], IMAGENET_COUNTS["val"])}
    wrong = [f"{split}: {c['classes']} classes and {c['images']} images, expected {expected[split][0]} and "
             f"{expected[split][1]}" for split, c in counts.items()
             if (c["classes"], c["images"]) != expected[split]]
    classes = {split: {d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")}
               for split, folder in folders.items()}
    if classes["train"] != classes["val"]:
        only_train, only_val = sorted(classes["train"] - classes["val"]), sorted(classes["val"] - classes["train"])
        wrong.append(f"train and val have different classes (only in train: {only_train[:5]}, only in val: "
                     f"{only_val[:5]}), which training refuses")
    if wrong and not partial:
        raise UserError(f"{out}: the source gave the wrong counts ({'; '.join(wrong)}); the split folders stay "
                        "hidden as .train.partial and .val.partial. Pass --partial to accept a subset")
    for problem in wrong:
        log.warning("%s: %s (accepted: --partial)", out, problem)
    for split in ("val", "train"):
        if (out / f".{split}.partial").is_dir():
            (out / f".{split}.partial").rename(out / split)
    return counts


def _count(folder: Path) -> dict:
    classes = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")] if folder.is_dir() else []
    return {"classes": len(classes),
            "images": sum(1 for d in classes for f in d.iterdir() if not f.name.startswith("."))}


def _val_items(source: _Source, id_to_wnid: dict[int, str], truth: list[int]):
    with _open_tar(source) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name).name  # ILSVRC2012_val_00000001.JPEG: 1-based line of the ground truth
            try:
                number = int(Path(name).stem.rsplit("_", 1)[1])
                wnid = id_to_wnid[truth[number - 1]]
            except (IndexError, ValueError):
                raise UserError(f"{source}: {member.name} is not an ILSVRC2012_val_NNNNNNNN.JPEG named in the "
                                f"ground truth ({len(truth)} lines)") from None
            yield wnid, name, LazyMember(tar, member)


def _train_items(source: _Source):
    with _open_tar(source) as outer:
        for member in outer:
            if not (member.isfile() and member.name.endswith(".tar")):
                continue
            wnid = Path(member.name).name[:-len(".tar")]
            # seekable when the outer tar is a local file: passing over a finished class reads only headers
            mode = "r|" if source.is_s3 else "r:"
            with tarfile.open(fileobj=outer.extractfile(member), mode=mode) as inner:
                for image in inner:
                    if image.isfile():
                        yield wnid, Path(image.name).name, LazyMember(inner, image)
