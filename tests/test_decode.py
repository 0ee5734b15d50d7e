"""Reduced-size JPEG decoding (augment.draft_decode): same crops, same random draws, nearly the same pixels."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from resnet50_recipe.data.pipeline import DraftResizedCrop, ImageFolderDataset, seeded, train_transform
from resnet50_recipe.recipe import AugmentConfig, load_recipe


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """An 800x600 JPEG with smooth structure at several scales, so a wrong crop shows as a large difference."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((800, 600), Image.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((800, 600), Image.BICUBIC)
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    Image.blend(coarse, fine, 0.5).save(path, quality=90)
    return path


def run(transform, path, seed, decoded: bool):
    with seeded(seed):
        img = Image.open(path)
        out = transform(img.convert("RGB") if decoded else img)
        after = (random.random(), float(np.random.rand()), float(torch.rand(1)))  # what the next draws would be
    return out.float(), after


def test_draft_decoding_draws_the_same_crops_and_nearly_the_same_pixels(photo):
    aug = AugmentConfig(train_size=64, interpolation="random", color_jitter=0.4)
    full = train_transform(AugmentConfig(**{**aug.__dict__, "draft_decode": False}))
    draft = train_transform(aug)
    assert isinstance(draft.transforms[0], DraftResizedCrop)
    assert not isinstance(full.transforms[0], DraftResizedCrop)
    with Image.open(photo) as img:
        size = img.size
    reductions, same, other = [], [], []
    for seed in range(40):
        with seeded(seed):  # timm's own draw from the full size: the crop both paths must use
            _, _, h, w = RandomResizedCropAndInterpolation.get_params(Image.new("RGB", size), aug.scale, aug.ratio)
        reductions.append(next((s for s in (8, 4, 2) if min(w, h) >= 64 * s), 1))
        a, after_a = run(full, photo, seed, decoded=True)
        b, after_b = run(draft, photo, seed, decoded=False)
        assert after_a == after_b  # the same random calls, in the same order
        same.append((a - b).abs().mean().item())
        other.append((a - run(full, photo, seed + 1000, decoded=True)[0]).abs().mean().item())
        if reductions[-1] == 1:
            assert torch.equal(a, b)  # no reduction: bit-identical to timm's transform
    assert {2, 4} <= set(reductions)  # the test exercises reduced decoding
    reduced = [d for d, r in zip(same, reductions) if r > 1]
    assert np.mean(reduced) < 2.0 and max(reduced) < 4.0  # of 255: resampling noise
    assert np.mean(other) > 10 * np.mean(reduced)  # a different crop is far away


def test_draft_dataset_handles_non_jpeg_cmyk_and_grey_images(tmp_path, photo):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    with Image.open(photo) as img:
        img.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
        img.convert("L").save(folder / "grey.jpg", quality=90)
        img.save(folder / "png.png")
    transform = train_transform(AugmentConfig(train_size=32))
    dataset = ImageFolderDataset(tmp_path / "train", ["a"], transform, seed=0)
    plain = ImageFolderDataset(tmp_path / "train", ["a"], train_transform(AugmentConfig(train_size=32,
                                                                                        draft_decode=False)), seed=0)
    assert dataset.undecoded and not plain.undecoded
    diffs = []
    for index in range(3):
        for epoch in range(4):
            a, b = dataset[(epoch, index)].image, plain[(epoch, index)].image
            assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
            diffs.append((a.float() - b.float()).abs().mean().item())
    assert np.mean(diffs) < 3.0 and max(diffs) < 8.0  # of 255; a misplaced crop is 20 to 80


def test_shipped_recipes_decode_reduced_by_default():
    assert all(load_recipe(name).augment.draft_decode for name in ("smoke", "imagenet-100ep"))
