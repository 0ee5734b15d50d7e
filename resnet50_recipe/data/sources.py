"""Where ImageNet-1k comes from, besides the three official archives: the layouts `data imagenet --from`
recognises, each read as a stream of (wnid, file name, data) per split, and the download from the Hugging Face
Hub. prepare.py writes the streams into an ImageFolder.

- Kaggle's ImageNet Object Localization Challenge: ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG, a flat
  ILSVRC/Data/CLS-LOC/val/ and LOC_val_solution.csv naming each val image's wnid (the first token of its
  PredictionString).
- ILSVRC/imagenet-1k on the Hub: data/train_images_{0..4}.tar.gz and data/val_images.tar.gz, the wnid the last
  `_` field of each file name (ILSVRC2012_val_00000001_n01751748.JPEG), as the repository's own loading script
  reads them.
- timm/imagenet-1k-wds: webdataset shards imagenet1k-train-NNNN.tar and imagenet1k-validation-NN.tar, each
  sample a .jpg with its class index in a .cls file (or a .json's "label"), in timm's ImageNetInfo order.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from resnet50_recipe.errors import MissingInput, UserError

__all__ = ["IMAGENET_ARCHIVES", "LazyMember", "KAGGLE_ROOT", "HUB_LAYOUTS", "LAYOUTS", "IMAGE_SUFFIXES",
           "imagenet_wnids", "detect", "split_items", "kaggle_items", "archive_items", "shard_items", "hub_download",
           "hub_repo"]

log = logging.getLogger(__name__)


# The official ILSVRC2012 archives: name and MD5, as in torchvision.datasets.imagenet.ARCHIVE_META.
IMAGENET_ARCHIVES = {
    "train": ("ILSVRC2012_img_train.tar", "1d675b47d978889d74fa0da5fadfb00e"),
    "val": ("ILSVRC2012_img_val.tar", "29b22e2961454d5413ddabcf34fc5622"),
    "devkit": ("ILSVRC2012_devkit_t12.tar.gz", "fa75699e90414af021442c21a62c3abf"),
}


class LazyMember:
    """An archive member's bytes, read only if asked for before the stream moves on, so a rerun passes over
    finished files without reading them out."""

    def __init__(self, tar: tarfile.TarFile, member: tarfile.TarInfo):
        self.tar, self.member = tar, member

    def read(self) -> bytes:
        return self.tar.extractfile(self.member).read()

KAGGLE_ROOT = Path("ILSVRC/Data/CLS-LOC")


# (train, val) file-name patterns of each Hub layout, matched against the base name of every file.
HUB_LAYOUTS = {
    "hub-archives": ("train_images_*.tar.gz", "val_images.tar.gz"),
    "webdataset": ("*-train-*.tar", "*-validation-*.tar"),
}

LAYOUTS = ("the three ILSVRC2012 archives, Kaggle's ILSVRC/Data/CLS-LOC with LOC_val_solution.csv, the Hub's "
           "train_images_*.tar.gz and val_images.tar.gz, or webdataset shards *-train-*.tar and *-validation-*.tar")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key: the path up to the base name's first dot


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted), from timm."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def detect(folder: Path) -> str:
    """Which layout `folder` holds: ilsvrc, kaggle, hub-archives or webdataset; a UserError naming what was
    expected otherwise."""
    official = [name for name, _ in IMAGENET_ARCHIVES.values()]
    missing = [name for name in official if not (folder / name).is_file()]
    if not missing:
        return "ilsvrc"
    if len(missing) < len(official):
        raise MissingInput(f"{folder / missing[0]}: archive not found, next to the other official archives")
    if (folder / KAGGLE_ROOT / "train").is_dir():
        return "kaggle"
    names = [p.name for p in _files(folder)]
    for layout, (train, val) in HUB_LAYOUTS.items():
        if fnmatch.filter(names, train) and fnmatch.filter(names, val):
            return layout
    raise UserError(f"{folder}: no ImageNet layout recognised; expected {LAYOUTS}")


def _files(folder: Path) -> list[Path]:
    # huggingface_hub keeps its partial downloads under .cache/ inside the folder: never take them as data
    return sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)


def split_items(folder: Path, layout: str, split: str) -> Iterator[tuple]:
    """(wnid, file name, a path, bytes or a LazyMember) for every image of `split` (train or val) in `folder`."""
    if layout == "kaggle":
        return kaggle_items(folder, split)
    pattern = HUB_LAYOUTS[layout][split == "val"]
    archives = [p for p in _files(folder) if fnmatch.fnmatch(p.name, pattern)]
    return (archive_items if layout == "hub-archives" else shard_items)(archives)


# ---------------------------------------------------------------------------------------------------------
# Kaggle


def kaggle_items(folder: Path, split: str) -> Iterator[tuple[str, str, Path]]:
    root = folder / KAGGLE_ROOT / split
    if split == "train":
        for class_dir in sorted(d for d in root.iterdir() if d.is_dir()):
            for image in sorted(class_dir.iterdir()):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    yield class_dir.name, image.name, image
        return
    solution = folder / "LOC_val_solution.csv"
    if not solution.is_file():
        raise MissingInput(f"{solution}: not found; Kaggle's val images get their classes from it")
    with open(solution, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise UserError(f"{solution}: expected the columns ImageId,PredictionString")
    for row in rows:
        image = root / f"{row['ImageId']}.JPEG"
        if not row["PredictionString"].split():
            raise UserError(f"{solution}: {row['ImageId']} has an empty PredictionString; expected a wnid first")
        if not image.is_file():
            raise MissingInput(f"{image}: named in {solution.name} but not there")
        yield row["PredictionString"].split()[0], image.name, image


# ---------------------------------------------------------------------------------------------------------
# ILSVRC/imagenet-1k's archives


def archive_items(archives: list[Path]) -> Iterator[tuple[str, str, LazyMember]]:
    """The wnid is the last `_` field of each name, dropped from the file name: n01440764_10026_n01440764.JPEG
    becomes n01440764_10026.JPEG, the official archives' name."""
    known = set(imagenet_wnids())
    for archive in archives:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                stem, suffix = Path(Path(member.name).name).stem, Path(member.name).suffix
                image, _, wnid = stem.rpartition("_")
                if wnid not in known:
                    raise UserError(f"{archive}: {member.name} does not end in _<wnid>{suffix} with an ImageNet-1k "
                                    "wnid, as ILSVRC/imagenet-1k's files do")
                yield wnid, image + suffix, LazyMember(tar, member)


# ---------------------------------------------------------------------------------------------------------
# Webdataset shards


def shard_items(shards: list[Path]) -> Iterator[tuple[str, str, bytes]]:
    """One item per sample: the files sharing a key (the name up to its first dot) are one sample, next to
    each other in the shard, as webdataset writes them."""
    wnids = imagenet_wnids()
    for shard in shards:
        with tarfile.open(shard, mode="r|*") as tar:
            key, sample = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY.match(member.name)
                if match is None:
                    continue  # no extension: not part of a sample
                this, ext = match.groups()
                if this != key and sample:
                    yield _sample(shard, key, sample, wnids)
                    sample = {}
                key = this
                sample[ext.lower()] = tar.extractfile(member).read()
            if sample:
                yield _sample(shard, key, sample, wnids)


def _sample(shard: Path, key: str, sample: dict[str, bytes], wnids: list[str]) -> tuple[str, str, bytes]:
    image = next((suffix[1:] for suffix in IMAGE_SUFFIXES if suffix[1:] in sample), None)
    if image is None:
        raise UserError(f"{shard}: sample {key} has no image (found {', '.join(sorted(sample))})")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    label = sample["cls"].decode().strip() if "cls" in sample else meta.get("label")
    try:
        wnid = wnids[int(label)]
    except (TypeError, ValueError, IndexError):
        raise UserError(f"{shard}: sample {key} has no class index 0-999 in a .cls or a .json's \"label\" "
                        f"(found {label!r})") from None
    name = Path(meta.get("filename") or f"{Path(key).name}.{image}").name
    return wnid, name, sample[image]


# ---------------------------------------------------------------------------------------------------------
# The Hugging Face Hub


def hub_download(repo: str, dest: Path, quiet: bool = False) -> Path:
    """Download the ImageNet files of Hub dataset `repo` into `dest` with huggingface_hub, which resumes
    partial files and takes the token from HF_TOKEN or `hf auth login`. Returns `dest`."""
    from huggingface_hub import constants, list_repo_files, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars

    url = f"{constants.ENDPOINT}/datasets/{repo}"
    if quiet:
        disable_progress_bars()
    try:
        names = [Path(f).name for f in list_repo_files(repo, repo_type="dataset")]
        patterns = next(([f"*{train}", f"*{val}"] for train, val in HUB_LAYOUTS.values()
                         if fnmatch.filter(names, train) and fnmatch.filter(names, val)), None)
        if patterns is None:
            raise UserError(f"hf:{repo}: no ImageNet layout this knows among its {len(names)} files "
                            f"({', '.join(names[:5])}...); expected {LAYOUTS}")
        snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, local_dir=dest)
    except GatedRepoError:
        raise UserError(f"hf:{repo}: the dataset is gated: accept its terms at {url}, then log in with "
                        "`hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        # the Hub also answers 401 for a gated or private repository when no token was sent
        raise UserError(f"hf:{repo}: not found, or gated or private and no valid token was sent ({url}); log "
                        "in with `hf auth login` or set HF_TOKEN, and accept a gated dataset's terms there") from None
    except HfHubHTTPError as e:
        raise UserError(f"hf:{repo}: the Hub answered {e.response.status_code} ({url}); rerun to resume") from None
    except LocalEntryNotFoundError:  # snapshot_download's word for a Hub it cannot reach
        raise UserError(f"hf:{repo}: cannot reach {constants.ENDPOINT}; rerun to resume the download") from None
    return dest


def hub_repo(source: str) -> str | None:
    """The repository id of an `hf:owner/name` source, else None."""
    if not source.startswith("hf:"):
        return None
    repo = source[len("hf:"):]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UserError(f"--from {source}: expected hf:owner/name, e.g. hf:ILSVRC/imagenet-1k")
    return repo
