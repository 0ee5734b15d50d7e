import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from resnet50_recipe.cli import main
from resnet50_recipe.recipe import Recipe, RecipeError, load_recipe, parse_scalar, scaled_lr, shipped_recipes, to_yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(shipped_recipes())


def test_the_recipes_ship():
    assert {"smoke", "kaggle-sample", "imagenet-81", "imagenet-100ep"} <= set(SHIPPED)
    assert {f"imagenet-fast-{n}" for n in (16, 24, 32, 40, 56, 88)} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_round_trips(name, tmp_path):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe) and recipe.name == name
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(to_yaml(recipe))
    again = load_recipe(resolved)
    assert again == recipe


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_comments_every_key(name):
    """Every key line in a shipped recipe carries a comment: its unit and the reason for its value."""
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        assert "#" in line, f"{name}.yaml: uncommented key line: {line!r}"


def test_shipped_recipes_never_hard_code_a_dataset():
    for name in SHIPPED:
        assert load_recipe(name).data.path is None, name


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("extends: smoke\noptim:\n  weight_decy: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    message = str(e.value)
    assert str(path) in message and "optim.weight_decy" in message and "optim.weight_decay" in message


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match=r"unknown key 'optimizer'.*'optim'"):
        load_recipe(path)


def test_bad_type_names_key_value_and_what_is_valid(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: ten\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: train.epochs: wrong type: 'ten'; expected an integer >= 1"):
        load_recipe(path)


def test_int_is_not_a_bool_and_bool_is_not_an_int():
    with pytest.raises(RecipeError, match="train.amp"):
        load_recipe("smoke", ["train.amp=1"])
    with pytest.raises(RecipeError, match="train.epochs"):
        load_recipe("smoke", ["train.epochs=true"])


def test_bad_value_names_key_value_and_range():
    with pytest.raises(RecipeError, match=r"optim.momentum: out of range: 1.5; expected a number >= 0 and < 1"):
        load_recipe("smoke", ["optim.momentum=1.5"])
    with pytest.raises(RecipeError, match=r"loss.kind: invalid value 'focal'; expected one of 'ce', 'bce'"):
        load_recipe("smoke", ["loss.kind=focal"])


def test_timm_names_are_checked_with_suggestions():
    with pytest.raises(RecipeError, match=r"model.name: unknown timm model 'resnet5O'; did you mean 'resnet50'"):
        load_recipe("smoke", ["model.name=resnet5O"])
    with pytest.raises(RecipeError, match="optim.opt: unknown timm optimizer 'lamm'"):
        load_recipe("smoke", ["optim.opt=lamm"])
    with pytest.raises(RecipeError, match="augment.auto_augment"):
        load_recipe("smoke", ["augment.auto_augment=rand-q9"])


def test_set_overrides_apply_and_parse_as_yaml():
    recipe = load_recipe("smoke", ["train.epochs=3", "optim.weight_decay=1e-4", "augment.scale=[0.5, 1]",
                                   "data.synthetic.classes=4", "optim.lr=null", "name=mine"])
    assert recipe.train.epochs == 3
    assert recipe.optim.weight_decay == 1e-4
    assert recipe.augment.scale == (0.5, 1.0)
    assert recipe.data.synthetic.classes == 4 and recipe.data.synthetic.per_class == 300
    assert recipe.name == "mine"


def test_set_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"--set: unknown key 'train.epoch'; did you mean 'train.epochs'"):
        load_recipe("smoke", ["train.epoch=3"])
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe("smoke", ["train.epochs"])


def test_extends_overlays_relative_files_and_detects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: smoke\ntrain:\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  batch_size: 32\n")
    recipe = load_recipe(tmp_path / "child.yaml")
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.model.name) == (7, 32, "test_resnet")
    assert recipe.name == "child"
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_yaml_exponent_floats_parse():
    assert parse_scalar("1e-4") == 1e-4 and parse_scalar("5.0e-3") == 5e-3 and parse_scalar("3") == 3


def test_lr_scales_with_global_batch_as_timm_does():
    sgd = load_recipe("smoke").optim
    assert scaled_lr(sgd, 256) == pytest.approx(0.8) and scaled_lr(sgd, 64) == pytest.approx(0.2)
    lamb = load_recipe("imagenet-81").optim
    assert scaled_lr(lamb, 2048) == pytest.approx(5e-3)
    assert scaled_lr(lamb, 512) == pytest.approx(2.5e-3)  # sqrt rule
    assert scaled_lr(load_recipe("smoke", ["optim.lr=0.05"]).optim, 4096) == 0.05


def test_cli_shortcuts_are_sets_in_disguise(capsys, tmp_path):
    assert main(["train", "smoke", "--data", str(tmp_path), "--epochs", "3", "--batch-size", "32", "--lr", "0.5",
                 "--workers", "0", "--no-amp", "--print-recipe"]) == 0
    resolved = load_recipe(parse_scalar(capsys.readouterr().out))
    assert resolved.data.path == str(tmp_path)
    assert (resolved.train.epochs, resolved.train.batch_size, resolved.optim.lr) == (3, 32, 0.5)
    assert resolved.data.workers == 0 and resolved.train.amp is False


def test_cli_fails_before_work_with_nonzero_exit(capsys):
    assert main(["train", "smoke", "--set", "train.epochs=0"]) == 2
    assert "train.epochs: out of range: 0" in capsys.readouterr().err
    assert main(["train", "no-such-recipe"]) == 2


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--set", "model.nam=x"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'model.name'" in out.stderr


def test_wheel_ships_recipes_and_resolves_them_without_the_repository(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("resnet50_recipe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in SHIPPED:
        assert f"resnet50_recipe/recipes/{recipe}.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from resnet50_recipe.recipe import resolve_recipe_path, load_recipe; "
            "print(resolve_recipe_path('imagenet-81')); print(load_recipe('imagenet-81').train.epochs)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    path, epochs = out.stdout.split()
    assert path.startswith(str(site)) and epochs == "600"
