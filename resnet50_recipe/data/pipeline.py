"""Datasets, sampler, transforms and loaders.

Randomness here is a pure function of (seed, epoch, index, repeat) -- see docs/DESIGN.md:
- the sampler's order for an epoch depends only on (seed, epoch), and it can start at any sample offset;
- each sample's augmentation draws from RNGs seeded by (seed, epoch, index, repeat) inside `__getitem__`, so
  the worker count, the process count, prefetching and a resume point cannot change its pixels.
Batches leave the loader as uint8 NCHW tensors; normalisation happens on the device (a quarter of the bytes).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import random
import signal
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as F

from resnet50_recipe.data.synthetic import generate
from resnet50_recipe.errors import MissingInput, UserError
from resnet50_recipe.recipe import AugmentConfig, DataConfig, RecipeError

__all__ = ["IMAGE_EXTENSIONS", "mix_seed", "seeded", "find_classes", "scan_images", "class_names", "Sample",
           "ImageFolderDataset", "UnreadableImage", "unreadable", "collate", "EpochSampler", "DraftResizedCrop",
           "train_transform", "train_size_at", "eval_transform", "usable_cores", "default_workers", "make_loader",
           "leave_stops_to_the_parent", "close_loader", "resolve_data_dir", "cache_dir"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def mix_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from a tuple of ints (seed, epoch, index): neighbours give unrelated streams."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch's CPU generator for a block, then put their previous states back.

    Restoring keeps a worker-less loader from disturbing the training process's own RNG streams (dropout,
    drop-path), so results do not depend on `data.workers`.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.default_generator.set_state(torch_state)


# ---------------------------------------------------------------------------------------------------------
# Folders


def find_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise MissingInput(f"{split_dir}: folder not found; expected an ImageFolder with one sub-folder per "
                           "class (DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise MissingInput(f"{split_dir}: no class folders; expected {split_dir}/<class>/*.jpg")
    return classes


def scan_images(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(classes):
        files = sorted(e.path for e in os.scandir(split_dir / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise MissingInput(f"{split_dir / name}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(f, label) for f in files]
    return samples


def class_names(root: Path) -> list[str]:
    """Class names shared by train/ and val/; a difference is an error that lists what differs."""
    train, val = find_classes(root / "train"), find_classes(root / "val")
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise UserError(f"{root}: train/ and val/ have different classes: only in train: {only_train[:10]}, "
                        f"only in val: {only_val[:10]}" + ("" if only_train or only_val else " (order differs)"))
    return train


@dataclass
class Sample:
    image: torch.Tensor  # uint8 CHW
    target: int
    bad: str | None  # path of an unreadable image that this sample replaces, if any


class ImageFolderDataset(torch.utils.data.Dataset):
    """`root/<class>/<image>` read with PIL; keys are (epoch, index) or (epoch, index, repeat), so augmentation
    is seeded per sample, and each copy of an image under repeated augmentation gets its own draw.

    An unreadable image either raises (naming the file) or, with `bad_images: skip`, is replaced by the
    next readable image and reported through `Sample.bad`, so the run can count what it skipped.
    """

    def __init__(self, root: Path, classes: list[str], transform, seed: int, bad_images: str = "error"):
        self.root, self.classes, self.transform = root, classes, transform
        self.samples = scan_images(root, classes)
        self.seed, self.bad_images = seed, bad_images

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def undecoded(self) -> bool:
        """A transform that starts with DraftResizedCrop decodes the image itself, at the size the crop needs.
        A property, not a flag set once: progressive resizing replaces the transform between epochs."""
        return isinstance(getattr(self.transform, "transforms", [None])[0], DraftResizedCrop)

    def _load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            img = Image.open(path)
            if self.undecoded:
                return img
            with img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise unreadable(path, e) from e

    def fingerprint(self) -> dict:
        """The image count and a sha256 of the sorted file list (paths relative to the split folder): what a
        checkpoint records, so that a resume on a changed train set is noticed (trainer/run.py's check_resumable)."""
        if getattr(self, "_fingerprint", None) is None:
            names = sorted(os.path.relpath(path, self.root).replace(os.sep, "/") for path, _ in self.samples)
            digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
            self._fingerprint = {"images": len(names), "sha256": digest}
        return self._fingerprint

    def __getitem__(self, key: tuple[int, ...]) -> Sample:
        epoch, index, repeat = (*key, 0)[:3]
        # Repeat 0 keeps the three-part seed, so runs without repeated augmentation (and their checkpoints) see
        # the pixels they always did; every further copy of the image draws its own augmentation.
        seed = mix_seed(self.seed, epoch, index, repeat) if repeat else mix_seed(self.seed, epoch, index)
        bad = None
        for attempt in range(len(self.samples)):
            source = (index + attempt) % len(self.samples)
            try:
                # Decoding draws no random numbers, so it may sit inside the seeded block with the transform.
                with seeded(seed):
                    image = self.transform(self._load(source))
                break
            except UnreadableImage:
                if self.bad_images != "skip":
                    raise
                bad = bad or self.samples[index][0]
        return Sample(image, self.samples[source][1], bad)


class UnreadableImage(UserError):
    """An image the loader cannot decode: bad input, reported in one line.

    Raised in a loader worker, it reaches the main process re-made by torch from a message that carries the
    worker's traceback ("Caught UnreadableImage in DataLoader worker process 0. Original Traceback ...");
    only its last line, which is this message, is kept.
    """

    def __init__(self, message: str):
        if message.startswith("Caught UnreadableImage"):
            lines = [line for line in message.splitlines() if line.strip()]
            message = lines[-1].split("UnreadableImage: ", 1)[-1]
        super().__init__(message)


def unreadable(path, error: Exception) -> UnreadableImage:
    return UnreadableImage(f"{path}: unreadable image ({error}); fix or remove it (resnet50-recipe data verify "
                           "--fix), or set data.bad_images: skip to skip and count such files")


def collate(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = torch.stack([s.image for s in samples])
    targets = torch.tensor([s.target for s in samples], dtype=torch.int64)
    return images, targets, [s.bad for s in samples if s.bad]


# ---------------------------------------------------------------------------------------------------------
# Sampler


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index, repeat) keys; the order is a pure function of (seed, epoch).

    - `aug_repeats > 1` repeats each index inside the permutation before sharding, as timm's RepeatAugSampler
      does, so the copies land on different ranks; the epoch length stays `len(dataset)`. `repeat` numbers the
      copies (0 to aug_repeats - 1); it is part of the sample's seed, so each copy is augmented differently.
      It follows from the position in the global order, so it does not depend on the process count.
    - A rank takes every `world_size`-th key of the global order, starting at `rank`.
    - `set_epoch(epoch, start)` starts at global sample offset `start`: by index, with no decoding of the
      skipped samples. The offset counts samples of the global order, so it survives a change of world size.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 aug_repeats: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.aug_repeats = rank, world_size, aug_repeats
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        if self.aug_repeats > 1:
            order = order.repeat_interleave(self.aug_repeats)[: self.size]
        return order

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = self.global_order()
        positions = range(self.start + self.rank, len(order), self.world_size)
        for position, index in zip(positions, order[positions.start::self.world_size].tolist()):
            yield self.epoch, index, position % self.aug_repeats

    def __len__(self) -> int:
        remaining = self.size - self.start
        return max(0, (remaining - self.rank + self.world_size - 1) // self.world_size)


# ---------------------------------------------------------------------------------------------------------
# Transforms and loaders


class DraftResizedCrop:
    """timm's RandomResizedCropAndInterpolation, applied to a JPEG before it is decoded.

    The crop is drawn by timm's own `get_params` from the full image size, with the same random calls in the
    same order, so a seed gives the same crop as timm's transform. When the crop is at least twice the output
    size on both sides, PIL's draft mode has libjpeg decode at 1/2, 1/4 or 1/8 scale (in the DCT, so most of
    the decoding work is skipped): the largest reduction that still leaves the crop at least the output's
    pixels. The crop box is scaled to the reduced image and resampled with the same filter.
    """

    def __init__(self, crop: RandomResizedCropAndInterpolation):
        self.crop = crop

    def __call__(self, img: Image.Image):
        c = self.crop
        i, j, h, w = c.get_params(img, c.scale, c.ratio)
        interpolation = random.choice(c.interpolation) if isinstance(c.interpolation, (tuple, list)) \
            else c.interpolation
        out_h, out_w = c.size
        reduce = next((s for s in (8, 4, 2) if w >= s * out_w and h >= s * out_h), 1)
        try:
            if reduce > 1 and img.format == "JPEG" and img.tile:  # tile: not decoded yet
                width = img.width
                drafted = img.draft("RGB", (width // reduce, img.height // reduce))
                reduce = round(width / drafted[1][2]) if drafted else 1  # draft's box is the full image, scaled
            else:
                reduce = 1  # not a JPEG, or already decoded: no reduced decoding
            rgb = img.convert("RGB")
        except (OSError, ValueError) as e:
            img.close()
            raise unreadable(getattr(img, "filename", "image"), e) from e
        if reduce == 1:
            return F.resized_crop(rgb, i, j, h, w, list(c.size), interpolation)
        box = (j / reduce, i / reduce, (j + w) / reduce, (i + h) / reduce)
        return rgb.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)

    def __repr__(self) -> str:
        return f"DraftResizedCrop({self.crop!r})"


def train_transform(aug: AugmentConfig, size: int | None = None):
    """timm's ImageNet train transform, ending in a uint8 tensor (normalised later, on the device); with
    `augment.draft_decode`, its first step is DraftResizedCrop, which decodes the JPEG itself."""
    transform = create_transform(
        size or aug.train_size, is_training=True, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
        auto_augment=aug.auto_augment, color_jitter=aug.color_jitter, interpolation=aug.interpolation,
        mean=aug.mean, use_prefetcher=True)
    if aug.draft_decode and isinstance(transform.transforms[0], RandomResizedCropAndInterpolation):
        transform.transforms[0] = DraftResizedCrop(transform.transforms[0])
    return transform


def train_size_at(aug: AugmentConfig, epoch: int) -> int:
    """The training resolution for `epoch` (0-based): `augment.train_size`, or with `augment.progressive`
    FFCV's ramp: min_size up to start_epoch, train_size from end_epoch, linear in between and rounded to a
    multiple of `multiple` pixels, so that only a few distinct sizes occur (each one is a cuDNN autotune and,
    with train.compile, one compiled graph). The batch size stays the same at every size, as in FFCV."""
    p = aug.progressive
    if p is None or epoch >= p.end_epoch:
        return aug.train_size
    if epoch <= p.start_epoch:
        return p.min_size
    size = p.min_size + (aug.train_size - p.min_size) * (epoch - p.start_epoch) / (p.end_epoch - p.start_epoch)
    return min(aug.train_size, max(p.min_size, int(round(size / p.multiple)) * p.multiple))


def eval_transform(aug: AugmentConfig, size: int | None = None, crop_pct: float | None = None):
    """Resize to size / crop_pct, center-crop to size: timm's eval transform, uint8 out."""
    interpolation = "bicubic" if aug.interpolation == "random" else aug.interpolation
    return create_transform(size or aug.eval_size, is_training=False, interpolation=interpolation,
                            crop_pct=crop_pct or aug.crop_pct, use_prefetcher=True)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per core but one, which the training process keeps for itself, capped at 16."""
    return max(1, min(16, usable_cores() - 1))


def make_loader(dataset, sampler, batch_size: int, workers: int | None, drop_last: bool, pin_memory: bool,
                seed: int, stops_to_parent: bool = False) -> torch.utils.data.DataLoader:
    """A loader of uint8 batches. `stops_to_parent` (the trainer's loaders): the worker processes ignore SIGTERM,
    SIGINT and SIGUSR1, which the parent turns into a stop with a checkpoint, and the parent ends them itself
    (`close_loader`)."""
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)  # keeps the DataLoader from drawing on the global RNG
    kind = ParentStopsLoader if stops_to_parent and workers > 0 else torch.utils.data.DataLoader
    with warnings.catch_warnings():
        # torch warns when pin_memory is set without an accelerator; pinning is then simply skipped.
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        loader = kind(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=pin_memory and torch.cuda.is_available(), drop_last=drop_last,
            persistent_workers=workers > 0, generator=generator,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=leave_stops_to_the_parent if stops_to_parent and workers > 0 else None)
    if stops_to_parent and workers > 0:
        if not _PARENT_OWNED:
            # Registered after torch's own exit hooks, so it runs before them: while torch can still end workers
            # in order, and before multiprocessing's, whose SIGTERM these workers ignore (it would then wait).
            atexit.register(_close_parent_owned)
        _PARENT_OWNED.add(loader)
    return loader


_PARENT_OWNED: weakref.WeakSet = weakref.WeakSet()  # loaders whose workers ignore the stop signals


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class ParentStopsLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers start with the stop signals blocked, until `leave_stops_to_the_parent` has them
    ignored: a group-wide SIGTERM that lands while a worker is still starting (before its `worker_init_fn`) would
    otherwise kill it by the default action. A blocked signal stays pending in the worker and is dropped once
    ignored; in the parent it is delivered, to the trainer's handler, as soon as the workers are started. The
    mask is inherited through fork and exec: the fork and spawn start methods (and forkserver, whose server the
    first loader starts)."""

    def __iter__(self):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()  # starts the workers, the first time (they are persistent)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def leave_stops_to_the_parent(worker_id: int) -> None:
    """A loader worker's `worker_init_fn`: ignore SIGTERM, SIGINT and SIGUSR1.

    Slurm's scancel, `timeout`, `docker stop` under `tini -g`, systemd's KillMode=control-group, `kill -TERM -PGID`
    and torchrun (which signals each rank's process group) deliver a stop to the workers as well as the trainer.
    torch's worker would die of it, and the trainer's next batch would fail ("DataLoader worker (pid N) is killed
    by signal: Terminated") before its checkpoint. The trainer handles the signal and ends the workers itself; a
    worker whose parent is gone (SIGKILL) still exits on its own, by torch's watchdog. Seeding is untouched: each
    sample's randomness comes from (seed, epoch, index), not from the worker."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by ParentStopsLoader until now


def close_loader(loader: torch.utils.data.DataLoader | None) -> None:
    """End a loader's worker processes now, in torch's orderly way, then kill any that did not end in torch's
    wait (SIGKILL: these workers ignore the SIGTERM torch would send)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    loader._iterator = None
    shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator: workers to end
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _close_parent_owned() -> None:
    for loader in list(_PARENT_OWNED):
        close_loader(loader)


def resolve_data_dir(data: DataConfig) -> Path:
    """The dataset folder: `data.path`, generated first when `data.synthetic` is set."""
    if data.synthetic is not None:
        s = data.synthetic
        path = Path(data.path) if data.path else cache_dir() / (
            f"synthetic-c{s.classes}-n{s.per_class}-v{s.val_per_class}-s{s.size}-seed{s.seed}")
        return generate(path, classes=s.classes, per_class=s.per_class, val_per_class=s.val_per_class,
                        size=s.size, seed=s.seed)
    if not data.path:
        raise RecipeError("data.path is not set: pass --data DIR (a folder holding train/<class>/*.jpg and "
                          "val/<class>/*.jpg) or --set data.path=DIR")
    path = Path(data.path).expanduser()
    if not path.is_dir():
        raise MissingInput(f"data.path {str(path)!r}: folder not found; expected DIR/train/<class>/*.jpg "
                           "and DIR/val/<class>/*.jpg")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resnet50_recipe"
