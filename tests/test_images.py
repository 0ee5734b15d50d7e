"""`data verify` and `data resize` on real image files with planted problems; `bench data` on a tiny folder."""
import json

from PIL import Image

from resnet50_recipe.cli import main
from resnet50_recipe.data.images import check_image
from resnet50_recipe.data.pipeline import ImageFolderDataset, class_names, train_transform
from resnet50_recipe.data.synthetic import generate
from resnet50_recipe.recipe import AugmentConfig


def plant_problems(root):
    disk, square = root / "train" / "disk", root / "train" / "square"
    good = disk / "disk_00000.jpg"
    Image.new("CMYK", (32, 32), (10, 200, 30, 0)).save(disk / "cmyk.jpg")
    with Image.open(good) as img:
        img.save(square / "png.JPEG", format="PNG")
    big = Image.effect_noise((256, 256), 40).convert("RGB")
    big.save(square / "truncated.jpg", quality=90)
    data = (square / "truncated.jpg").read_bytes()
    (square / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "val" / "disk" / "corrupt.jpg").write_bytes(b"\xff\xd8not a jpeg at all" * 10)
    return {"cmyk": disk / "cmyk.jpg", "not_jpeg": square / "png.JPEG", "truncated": square / "truncated.jpg",
            "corrupt": root / "val" / "disk" / "corrupt.jpg"}


def test_verify_finds_planted_problems_and_fix_reencodes_what_it_can(tmp_path, capsys):
    root = generate(tmp_path / "d", classes=2, per_class=4, val_per_class=2, size=32)
    planted = plant_problems(root)
    report = tmp_path / "report.json"
    assert main(["data", "verify", str(root), "--workers", "2", "--report", str(report), "--quiet"]) == 1
    result = json.loads(report.read_text())
    assert {p["path"]: p["kind"] for p in result["problems"]} == {str(v): k for k, v in planted.items()}
    assert result["splits"]["train"] == {"classes": 2, "images": 11, "per_class": {"disk": 5, "square": 6}}
    assert result["splits"]["val"]["images"] == 5
    assert "not_jpeg: " in capsys.readouterr().out

    assert main(["data", "verify", str(root), "--fix", "--workers", "1", "--quiet"]) == 1  # corrupt stays
    fixed = {p["kind"]: p["fixed"] for p in json.loads((root / "verify.json").read_text())["problems"]}
    assert fixed == {"cmyk": True, "not_jpeg": True, "truncated": True, "corrupt": False}
    for kind in ("cmyk", "not_jpeg", "truncated"):
        assert check_image(planted[kind]) is None
        with Image.open(planted[kind]) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
    planted["corrupt"].unlink()
    assert main(["data", "verify", str(root), "--quiet"]) == 0
    dataset = ImageFolderDataset(root / "train", class_names(root), train_transform(AugmentConfig(train_size=16)), 0)
    assert all(dataset[(0, i)].image.shape == (3, 16, 16) for i in range(len(dataset)))


def test_resize_writes_a_smaller_copy_and_resumes_after_a_failure(tmp_path, capsys):
    root = generate(tmp_path / "d", classes=2, per_class=3, val_per_class=1, size=32)
    big = root / "train" / "disk" / "big.jpg"
    Image.effect_noise((120, 90), 30).convert("RGB").save(big, quality=95)
    bad = root / "train" / "square" / "bad.jpg"
    bad.write_bytes(b"garbage")
    out = tmp_path / "small"
    assert main(["data", "resize", str(root), str(out), "--short-side", "24", "--workers", "2", "--quiet"]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert not (out / "train").exists()  # only the hidden partial split, never a train/ that looks complete
    done = out / ".train.partial" / "disk" / "big.jpg"
    inode = done.stat().st_ino
    bad.unlink()
    assert main(["data", "resize", str(root), str(out), "--short-side", "24", "--workers", "2", "--quiet"]) == 0
    assert (out / "train" / "disk" / "big.jpg").stat().st_ino == inode  # kept, not redone
    assert "skipped" in capsys.readouterr().out
    with Image.open(out / "train" / "disk" / "big.jpg") as img:
        assert img.size == (32, 24)
    small = root / "train" / "disk" / "disk_00001.jpg"  # 32 px: shrinks to 24
    with Image.open(out / "train" / small.parent.name / small.name) as img:
        assert img.size == (24, 24)
    assert class_names(out) == class_names(root)
    assert sorted(p.relative_to(out) for p in out.rglob("*.jpg")) == \
        sorted(p.relative_to(root) for p in root.rglob("*.jpg"))


def test_resize_copies_small_jpegs_byte_for_byte(tmp_path):
    root = generate(tmp_path / "d", classes=2, per_class=2, val_per_class=1, size=32)
    out = tmp_path / "same"
    assert main(["data", "resize", str(root), str(out), "--short-side", "64", "--workers", "1", "--quiet"]) == 0
    for path in root.rglob("*.jpg"):
        assert (out / path.relative_to(root)).read_bytes() == path.read_bytes()


def test_bench_data_reports_rates_and_the_t4_verdict(tiny_data, capsys):
    assert main(["bench", "data", str(tiny_data), "--workers", "0,1", "--recipe", "smoke", "--batches", "2",
                 "--batch-size", "4", "--set", "augment.train_size=32", "--decode", "both"]) == 0
    out = capsys.readouterr().out
    assert out.count(" per worker)\n") == 4 and "full decode, 32 px, 1 workers" in out and "draft decode" in out
    assert "a GPU taking 400 img/s" in out and "vCPUs" in out
    assert main(["bench", "data", str(tiny_data), "--workers", "two"]) == 2
