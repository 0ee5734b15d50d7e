"""Correct results whatever the machine a run resumes on: its CUDA devices, its precision, its train set, its
recipe; and the EMA's warmup at any update interval. (The multi-process layouts are in test_ddp.py.)"""
import logging
import random
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_overlay
from timm.utils import ModelEmaV3

from resnet50_recipe import load_recipe, train
from resnet50_recipe.cli import main
from resnet50_recipe.data.pipeline import class_names
from resnet50_recipe.recipe import EmaConfig, RecipeError
from resnet50_recipe.store.checkpoints import load_state, read_manifest
from resnet50_recipe.trainer.components import build_ema
from resnet50_recipe.trainer.run import Progress
from resnet50_recipe.trainer.runtime import Runtime
from resnet50_recipe.trainer.state import (
    cuda_states_to_apply,
    rank_rng_state,
    restore,
    rng_state,
    set_rng_state,
    snapshot,
)
from resnet50_recipe.trainer.step import build_trainer
from resnet50_recipe.trainer.stop import StopControl


def test_cuda_rng_states_go_to_the_devices_this_process_uses():
    four = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]  # a 4-GPU machine's checkpoint
    assert cuda_states_to_apply(four, [0]).keys() == {0}  # a 1-GPU machine: its one device, no index error
    assert torch.equal(cuda_states_to_apply(four, [0])[0], four[0])
    assert torch.equal(cuda_states_to_apply(four[2:3], [5])[5], four[2])  # rank 2 of the saver, on cuda:5
    assert cuda_states_to_apply([], [0]) == {}  # a CPU checkpoint: the device keeps its seed
    assert rng_state()["cuda"] == [] or len(rng_state()["cuda"]) == 1  # only the device in use is saved


@pytest.mark.gpu
def test_the_cuda_generator_of_the_device_in_use_round_trips():
    torch.cuda.init()
    state = rng_state()
    assert len(state["cuda"]) == 1  # this process's device only, however many the machine has
    drawn = torch.rand(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), drawn)


def test_each_rank_restores_its_own_rng_state_and_a_new_process_count_is_derived_and_said():
    saved = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        saved.append(rng_state())
    state, note = rank_rng_state(saved, 1, 2, seed=0, step=7)
    assert note is None and torch.equal(state["torch"], saved[1]["torch"])
    state, note = rank_rng_state(saved, 0, 1, seed=0, step=7)
    assert torch.equal(state["torch"], saved[0]["torch"]) and "RNG states of 2 process(es) and this run has 1" in note
    third, note = rank_rng_state(saved, 2, 3, seed=0, step=7)
    assert "ranks 2 and up start from streams seeded by (seed, step, rank)" in note
    assert torch.equal(third["torch"], rank_rng_state(saved, 2, 3, seed=0, step=7)[0]["torch"])  # deterministic
    fourth = rank_rng_state(saved, 3, 4, seed=0, step=7)[0]
    assert not torch.equal(third["torch"], fourth["torch"])  # and different on every rank
    draws = []
    for state in (third, third):
        set_rng_state(state)
        draws.append((torch.rand(3), random.random(), np.random.rand()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1:] == draws[1][1:]
    legacy = rank_rng_state(saved[0], 0, 1, seed=0, step=7)  # a checkpoint from before per-rank states
    assert legacy[1] is None and torch.equal(legacy[0]["torch"], saved[0]["torch"])


def test_ema_every_k_steps_follows_modelemav3_in_optimizer_steps():
    every, decay = 4, 0.99
    model = torch.nn.Linear(2, 2)
    strided = build_ema(EmaConfig(enabled=True, decay=decay, warmup=True, every=every), model)
    plain = ModelEmaV3(model, decay=decay, use_warmup=True)
    for step in (1, 2, 4, 8, 40, 400, 4000):
        assert strided.get_decay(step) == pytest.approx(plain.get_decay(step) ** every, rel=1e-12)
    # Weights that ramp up once every `every` steps: the EMA lags them by as many steps as a per-step ModelEmaV3.
    lags = []
    for ema in (plain, strided):
        with torch.no_grad():
            ema.module.weight.zero_()
        for step in range(1, 401):
            with torch.no_grad():
                model.weight.fill_((step - 1) // every + 1.0)
            if ema is plain or step % every == 0:
                ema.update(model, step=step)  # as the engine calls it: the optimizer step
        lags.append(model.weight[0, 0].item() - ema.module.weight[0, 0].item())
    assert lags[0] > 1 and lags[1] == pytest.approx(lags[0], rel=0.1), lags


def trainer(recipe, classes, amp_dtype):
    return build_trainer(recipe, Runtime(torch.device("cpu"), amp_dtype, 0, 1), len(classes), 2)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_gradscaler_state_is_restored_only_when_both_runs_use_one(tiny_data, caplog):
    recipe = load_recipe("smoke", tiny_overlay(tiny_data))
    classes = class_names(tiny_data)
    fp32 = trainer(recipe, classes, None)
    fp16 = trainer(recipe, classes, torch.float16)
    fp16.scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    fp16.scaler.update(1024.0)
    saved32 = snapshot(fp32, 0, 0, Progress(), classes)
    saved16 = snapshot(fp16, 0, 0, Progress(), classes)
    assert saved32["scaler"] == {} and saved16["scaler"]["scale"] == 1024.0

    with caplog.at_level(logging.WARNING):
        restored = trainer(recipe, classes, torch.float16)
        restore(restored, saved32)  # a CPU or bf16 checkpoint resumed on a T4
    assert restored.scaler.get_scale() == 65536.0  # fresh
    assert "GradScaler: the checkpoint was saved without one (bf16 or fp32) and this run uses one (fp16): it starts " \
           "fresh" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        restore(trainer(recipe, classes, None), saved16)
    assert "saved with one (fp16) and this run uses none (bf16 or fp32): its state is not used" in caplog.text
    both = trainer(recipe, classes, torch.float16)
    restore(both, saved16)
    assert both.scaler.get_scale() == 1024.0


def stop_after_first_step(monkeypatch, control):
    from resnet50_recipe.trainer.runlog import RunLog

    log = RunLog.log

    def log_then_stop(self, record):
        log(self, record)
        if record["kind"] == "step":
            control.request_stop("test")
    monkeypatch.setattr(RunLog, "log", log_then_stop)


def test_a_changed_train_set_is_refused_then_allowed_from_the_next_epochs_first_batch(tiny_data, tmp_path,
                                                                                      monkeypatch, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    overlay = tiny_overlay(data, **{"train.epochs": 2})
    control = StopControl()
    with monkeypatch.context() as m:
        stop_after_first_step(m, control)
        stopped = train(load_recipe("smoke", overlay), tmp_path / "run", quiet=True, control=control)
    assert stopped["stopped"] and stopped["global_step"] == 1
    folder = tmp_path / "run" / "checkpoints"
    state = load_state(folder / read_manifest(folder)["file"])
    assert state["train_set"]["images"] == 24 and state["step_in_epoch"] == 4

    next(iter(sorted((data / "train").rglob("*.jpg")))).unlink()  # as `data verify --fix` removes a bad file
    with pytest.raises(RecipeError, match=r"train set differs .* \(24 images then, 23 now\).*--allow-recipe-change "
                                          "to go on with this train set from the first batch of the next epoch"):
        train(load_recipe("smoke", overlay), tmp_path / "run", quiet=True)
    capsys.readouterr()
    summary = train(load_recipe("smoke", overlay), tmp_path / "run", allow_recipe_change=True)
    out = capsys.readouterr().out
    assert "the train set changed (24 images then, 23 now): epoch 1 ends here; training goes on from the first " \
           "batch of epoch 2" in out
    assert summary["exit_status"] == 0 and summary["global_step"] == 3  # 1 step of epoch 1, then all of epoch 2
    final = load_state(folder / read_manifest(folder)["file"])
    assert final["epoch"] == 2 and final["train_set"]["images"] == 23


def test_the_same_count_of_other_files_is_a_changed_train_set(tiny_data, tmp_path):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    overlay = tiny_overlay(data)
    assert train(load_recipe("smoke", overlay), tmp_path / "run", quiet=True)["exit_status"] == 0
    first = sorted((data / "train").rglob("*.jpg"))[0]
    first.rename(first.with_name("renamed.jpg"))
    with pytest.raises(RecipeError, match="the same 24 images in number, but other files"):
        train(load_recipe("smoke", overlay), tmp_path / "run", quiet=True)


def cli_train(out, overlay, *extra):
    args = ["train", "smoke", "--output", str(out), "--quiet"]
    for item in overlay:
        args += ["--set", item]
    return main(args + list(extra))


def test_allow_recipe_change_names_what_cannot_change_even_then(tiny_data, tmp_path, capsys):
    overlay = tiny_overlay(tiny_data)
    assert cli_train(tmp_path / "run", overlay) == 0
    capsys.readouterr()
    assert cli_train(tmp_path / "run", overlay + ["model.name=resnet10t", "train.epochs=2"],
                     "--allow-recipe-change") == 2
    err = capsys.readouterr().err
    assert "model.name: 'test_resnet' -> 'resnet10t': the model architecture cannot change on resume, even with " \
           "--allow-recipe-change" in err
    assert "Traceback" not in err and "state_dict" not in err

    fewer = shutil.copytree(tiny_data, tmp_path / "fewer")
    shutil.rmtree(fewer / "train" / sorted(p.name for p in (fewer / "train").iterdir())[-1])
    shutil.rmtree(fewer / "val" / sorted(p.name for p in (fewer / "val").iterdir())[-1])
    assert cli_train(tmp_path / "run", tiny_overlay(fewer, **{"train.epochs": 2}), "--allow-recipe-change") == 2
    err = capsys.readouterr().err
    assert "its 2 classes differ from the 3 the checkpoint" in err and "cannot change on resume, even with " \
           "--allow-recipe-change" in err
