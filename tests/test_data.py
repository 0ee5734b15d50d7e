import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet50_recipe.data.pipeline import (
    EpochSampler,
    ImageFolderDataset,
    class_names,
    eval_transform,
    make_loader,
    resolve_data_dir,
    train_transform,
)
from resnet50_recipe.data.synthetic import SHAPES, generate
from resnet50_recipe.recipe import AugmentConfig, DataConfig, RecipeError


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.jpg")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_synthetic_is_a_real_jpeg_image_folder_and_deterministic_by_seed(tmp_path):
    a = generate(tmp_path / "a", classes=4, per_class=5, val_per_class=2, size=32, seed=1)
    b = generate(tmp_path / "b", classes=4, per_class=5, val_per_class=2, size=32, seed=1)
    c = generate(tmp_path / "c", classes=4, per_class=5, val_per_class=2, size=32, seed=2)
    assert class_names(a) == sorted(SHAPES[:4])
    assert len(list((a / "train").rglob("*.jpg"))) == 20 and len(list((a / "val").rglob("*.jpg"))) == 8
    with Image.open(next((a / "train").rglob("*.jpg"))) as img:
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)


def test_synthetic_reuses_a_matching_folder_and_refuses_anything_else(tmp_path):
    out = generate(tmp_path / "d", classes=2, per_class=2, val_per_class=1, size=32)
    assert generate(out, classes=2, per_class=2, val_per_class=1, size=32) == out
    with pytest.raises(FileExistsError, match="not a synthetic dataset made with"):
        generate(out, classes=3, per_class=2, val_per_class=1, size=32)
    with pytest.raises(ValueError, match="between 2 and 10 classes"):
        generate(tmp_path / "e", classes=11)


def test_synthetic_classes_cannot_be_told_apart_by_mean_colour(tmp_path):
    root = generate(tmp_path / "colour", classes=10, per_class=40, val_per_class=20, size=32)
    classes = class_names(root)

    def mean_colours(split):
        feats, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((root / split / name).glob("*.jpg")):
                feats.append(np.asarray(Image.open(path), dtype=np.float32).mean(axis=(0, 1)))
                labels.append(label)
        return np.stack(feats), np.array(labels)

    train_x, train_y = mean_colours("train")
    val_x, val_y = mean_colours("val")
    centroids = np.stack([train_x[train_y == k].mean(0) for k in range(10)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == val_y).mean() < 0.25  # chance is 0.10; shapes, not colours, carry the class


def test_sampler_order_is_a_pure_function_of_seed_and_epoch():
    def order(seed, epoch, **kw):
        sampler = EpochSampler(100, seed, **kw)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    assert sorted(i for _, i, _ in order(0, 3)) == list(range(100))
    assert all(e == 3 and r == 0 for e, _, r in order(0, 3))
    assert [i for _, i, _ in order(0, 0, shuffle=False)] == list(range(100))


def test_sampler_resumes_at_a_sample_offset_and_shards_without_overlap():
    full = EpochSampler(101, seed=5)
    full.set_epoch(2)
    everything = list(full)
    tail = EpochSampler(101, seed=5)
    tail.set_epoch(2, start=37)
    assert list(tail) == everything[37:] and len(tail) == 64
    shards = []
    for rank in range(3):
        s = EpochSampler(101, seed=5, rank=rank, world_size=3)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    assert sorted(sum(shards, [])) == sorted(everything)
    assert shards[1] == everything[1::3]


def test_repeated_augmentation_repeats_indices_and_keeps_epoch_length():
    s = EpochSampler(90, seed=0, aug_repeats=3)
    s.set_epoch(0)
    keys = list(s)
    assert len(keys) == 90 and len({i for _, i, _ in keys}) == 30
    assert [k[1:] for k in keys[:3]] == [(keys[0][1], 0), (keys[0][1], 1), (keys[0][1], 2)]  # 3 numbered copies
    three = EpochSampler(90, seed=0, aug_repeats=3, rank=1, world_size=3)
    three.set_epoch(0)
    assert list(three)[:2] == [keys[1], keys[4]]  # the copies of one image land on different ranks
    tail = EpochSampler(90, seed=0, aug_repeats=3, rank=1, world_size=2)
    tail.set_epoch(0, start=7)
    assert list(tail) == keys[8::2]  # a resume point keeps each key's repeat number


def repeat_pixels(root, workers, world_size, aug_repeats=3):
    """key -> pixels, for every sample of epoch 0 loaded by `world_size` ranks, each with `workers` workers."""
    classes = class_names(root)
    aug = AugmentConfig(train_size=24, auto_augment="rand-m9-mstd0.5")
    dataset = ImageFolderDataset(root / "train", classes, train_transform(aug), seed=11)
    pixels = {}
    for rank in range(world_size):
        sampler = EpochSampler(len(dataset), seed=11, rank=rank, world_size=world_size, aug_repeats=aug_repeats)
        sampler.set_epoch(0)
        loader = make_loader(dataset, sampler, batch_size=4, workers=workers, drop_last=False, pin_memory=False,
                             seed=0)
        images = torch.cat([batch for batch, _, _ in loader])
        pixels.update(zip(sampler, images))
    return pixels


def test_repeated_copies_are_augmented_differently_and_each_key_is_reproducible(tiny_data):
    one = repeat_pixels(tiny_data, workers=0, world_size=1)
    assert len(one) == 24
    copies = {}
    for (_, index, repeat), image in one.items():
        copies.setdefault(index, {})[repeat] = image
    complete = [c for c in copies.values() if len(c) == 3]
    assert len(complete) == 8
    for c in complete:  # three different augmentations of one image, not one augmentation three times
        assert not torch.equal(c[0], c[1]) and not torch.equal(c[0], c[2]) and not torch.equal(c[1], c[2])
    for other in (repeat_pixels(tiny_data, workers=2, world_size=1), repeat_pixels(tiny_data, workers=0, world_size=2)):
        assert other.keys() == one.keys()
        assert all(torch.equal(other[key], one[key]) for key in one)


def batches(root, workers, start=0, epoch=0):
    classes = class_names(root)
    aug = AugmentConfig(train_size=24, auto_augment="rand-m9-mstd0.5", re_prob=0.0)
    dataset = ImageFolderDataset(root / "train", classes, train_transform(aug), seed=11)
    sampler = EpochSampler(len(dataset), seed=11)
    sampler.set_epoch(epoch, start)
    loader = make_loader(dataset, sampler, batch_size=4, workers=workers, drop_last=False, pin_memory=False, seed=0)
    return [(images, targets) for images, targets, _ in loader]


def test_augmentation_is_seeded_per_sample_not_by_worker_or_resume_point(tiny_data):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    in_process = batches(tiny_data, workers=0)
    assert torch.equal(torch.get_rng_state(), before)  # loading does not disturb the training process's RNG
    in_workers = batches(tiny_data, workers=2)
    assert len(in_process) == len(in_workers) == 6
    for (a, ta), (b, tb) in zip(in_process, in_workers):
        assert a.dtype == torch.uint8 and a.shape == (4, 3, 24, 24)
        assert torch.equal(a, b) and torch.equal(ta, tb)
    resumed = batches(tiny_data, workers=0, start=8)
    assert torch.equal(torch.cat([b for b, _ in resumed]), torch.cat([b for b, _ in in_process])[8:])
    next_epoch = batches(tiny_data, workers=0, epoch=1)
    assert not torch.equal(next_epoch[0][0], in_process[0][0])


def test_eval_transform_is_a_center_crop_at_crop_pct(tiny_data):
    aug = AugmentConfig(eval_size=28, crop_pct=0.875)
    dataset = ImageFolderDataset(tiny_data / "val", class_names(tiny_data), eval_transform(aug), seed=0)
    sample = dataset[(0, 0)]
    assert sample.image.shape == (3, 28, 28) and sample.image.dtype == torch.uint8
    assert torch.equal(sample.image, dataset[(5, 0)].image)  # no randomness at eval


def test_missing_and_empty_folders_get_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="data.path is not set: pass --data DIR"):
        resolve_data_dir(DataConfig())
    with pytest.raises(FileNotFoundError, match="data.path .*nowhere.*: folder not found"):
        resolve_data_dir(DataConfig(path=str(tmp_path / "nowhere")))
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train: no class folders"):
        class_names(tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val: folder not found"):
        class_names(tmp_path)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cat: class folder holds no images"):
        ImageFolderDataset(tmp_path / "train", ["cat"], train_transform(AugmentConfig()), seed=0)


def test_train_and_val_classes_must_match(tmp_path):
    for split, names in (("train", ["cat", "dog"]), ("val", ["cat", "emu"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"different classes: only in train: \['dog'\], only in val: \['emu'\]"):
        class_names(tmp_path)


def test_unreadable_image_fails_naming_the_file_or_is_skipped_and_reported(tmp_path):
    root = generate(tmp_path / "bad", classes=2, per_class=3, val_per_class=1, size=32)
    broken = root / "train" / "disk" / "disk_00002.jpg"  # the last disk: its stand-in is the first square
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG
    classes = class_names(root)
    transform = train_transform(AugmentConfig(train_size=16))
    strict = ImageFolderDataset(root / "train", classes, transform, seed=0)
    with pytest.raises(ValueError, match=r"disk_00002.jpg: unreadable image.*data.bad_images: skip"):
        strict[(0, 2)]
    lenient = ImageFolderDataset(root / "train", classes, transform, seed=0, bad_images="skip")
    sample = lenient[(0, 2)]
    assert sample.bad == str(broken) and sample.image.shape == (3, 16, 16)
    assert sample.target == classes.index("square")  # the label travels with the image that stands in
    assert lenient[(0, 0)].bad is None


def test_cli_writes_the_synthetic_dataset(tmp_path, capsys):
    from resnet50_recipe.cli import main

    out = tmp_path / "shapes"
    assert main(["data", "synthetic", str(out), "--classes", "3", "--per-class", "2", "--val-per-class", "1",
                 "--size", "32", "--seed", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert class_names(out) == sorted(SHAPES[:3]) and len(list(out.rglob("*.jpg"))) == 9
    assert main(["data", "synthetic", str(out), "--classes", "4"]) == 2  # never overwrites other data
    assert "already exists" in capsys.readouterr().err
