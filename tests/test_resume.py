"""Preemption: exact mid-epoch resume across real processes, SIGKILL during a save, the EC2 spot notice."""
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from helpers import MetadataStandIn, assert_same_tree, final_state, last_step, overlay, start, without_timing

from resnet50_recipe.data.synthetic import generate
from resnet50_recipe.errors import EXIT_PREEMPTED
from resnet50_recipe.store.checkpoints import find_latest, read_manifest
from resnet50_recipe.trainer.runlog import read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "shapes", classes=4, per_class=48, val_per_class=8, size=32)


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(data, tmp_path):
    reference = start(tmp_path / "reference", overlay(data))
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    targets = sorted(random.sample(range(3, 60), 3))  # of 72 steps: the last stop lands well before the end
    out = tmp_path / "interrupted"
    logs = []
    for target in targets:
        floor = last_step(out)  # what the previous segment logged; wait for this one's own progress
        process = start(out, overlay(data))
        while (last_step(out) <= floor or last_step(out) < target) and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == EXIT_PREEMPTED, process.stdout.read()
        logs.append(process.stdout.read())
    final = start(out, overlay(data))
    assert final.wait(timeout=300) == 0, final.stdout.read()
    logs.append(final.stdout.read())
    resumed = "\n".join(logs)
    assert resumed.count("resuming from") == len(targets), resumed
    assert any(f"batch {b} of 24" in resumed for b in range(1, 24)), resumed  # at least one mid-epoch resume

    a, b = final_state(tmp_path / "reference"), final_state(out)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "loop", "rng", "best", "global_step"):
        assert_same_tree(a[key], b[key], f"{key} (targets {targets})")
    assert without_timing(a["metrics"]) == without_timing(b["metrics"]), targets
    assert without_timing(read_metrics(tmp_path / "reference" / "metrics.jsonl")) == \
        without_timing(read_metrics(out / "metrics.jsonl")), targets


SLOW_SECOND_SAVE = """
import sys, time, io, pathlib
import torch
import resnet50_recipe.store.checkpoints as checkpoint
real_save, calls = torch.save, []
def slow_save(state, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint: write half of it, then hang until killed
        buffer = io.BytesIO()
        real_save(state, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        pathlib.Path(sys.argv[1]).write_text("writing")
        time.sleep(600)
    return real_save(state, f, *args, **kwargs)
checkpoint.torch.save = slow_save
from resnet50_recipe.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_a_save_resumes_from_the_previous_good_checkpoint(data, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    args = overlay(data, **{"checkpoint.every_steps": 5, "train.epochs": 1})
    process = subprocess.Popen([sys.executable, "-c", SLOW_SECOND_SAVE, str(marker), "train", "smoke", "--output",
                                str(out)] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.stdout.read() if process.poll() is not None else "no slow save happened"
    partial = list((out / "checkpoints").glob(".ckpt-*.tmp-*"))
    assert partial, "the interrupted write should leave its temp file"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert read_manifest(out / "checkpoints")["step"] == 5  # the manifest still names the good one

    again = start(out, args)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert f"removing {partial[0]}: a partial checkpoint from an interrupted write" in output
    assert "resuming from" in output and "ckpt-000000005.pt" in output
    assert final_state(out)["global_step"] == 24


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(data, tmp_path, caplog):
    out = tmp_path / "run"
    process = start(out, overlay(data, **{"checkpoint.every_steps": 5, "train.epochs": 1}))
    assert process.wait(timeout=300) == 0, process.stdout.read()
    folder = out / "checkpoints"
    manifest = read_manifest(folder)
    newest = folder / manifest["file"]
    newest.write_bytes(newest.read_bytes()[:1000])
    path, state = find_latest(folder)
    assert path != newest and state["global_step"] == manifest["checkpoints"][-2]["step"]
    assert f"skipping checkpoint {newest} (truncated" in caplog.text


def test_spot_notice_checkpoints_and_exits_75_within_seconds(data, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetadataStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "run"
        # No scheduled checkpoints: the first one must come from the rebalance recommendation.
        args = overlay(data, **{"checkpoint.spot_notice": "on", "checkpoint.spot_poll_s": 0.2, "train.epochs": 50,
                                "checkpoint.every_epochs": 100,
                                "checkpoint.imds_endpoint": f"http://127.0.0.1:{server.server_port}"})
        process = start(out, args)
        while last_step(out) < 3 and process.poll() is None:
            time.sleep(0.05)
        MetadataStandIn.rebalance = {"noticeTime": "2026-11-26T12:00:00Z"}
        deadline = time.time() + 30
        while not (out / "checkpoints" / "latest.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "a rebalance recommendation checkpoints; it does not stop the run"
        rebalance_step = read_manifest(out / "checkpoints")["step"]
        MetadataStandIn.notice = {"action": "terminate", "time": "2099-01-01T00:00:00Z"}
        noticed = time.time()
        output = process.communicate(timeout=60)[0]
        took = time.time() - noticed
    finally:
        server.shutdown()
    assert process.returncode == EXIT_PREEMPTED, output
    assert took < 5, f"took {took:.1f} s to checkpoint and exit"
    assert "EC2 spot interruption notice (terminate at 2099-01-01T00:00:00Z)" in output
    assert "stopped (EC2 spot interruption notice" in output
    state = final_state(out)
    assert state["global_step"] > rebalance_step
    assert state["global_step"] >= last_step(out)  # nothing logged is lost: the checkpoint is at the stop step
    assert "/latest/meta-data/spot/instance-action" in MetadataStandIn.requests


def test_resume_refuses_a_changed_recipe_with_a_diff(data, tmp_path):
    out = tmp_path / "run"
    assert start(out, overlay(data, **{"train.epochs": 1})).wait(timeout=300) == 0
    changed = start(out, overlay(data, **{"train.epochs": 1, "train.batch_size": 4, "optim.lr": 0.5}))
    output = changed.communicate(timeout=120)[0]
    assert changed.returncode == 2
    assert "optim.lr: None -> 0.5" in output and "augment.train_size" not in output  # only what changed
    assert "--allow-recipe-change" in output
    allowed = start(out, overlay(data, **{"train.epochs": 2, "data.workers": 0}) + ["--allow-recipe-change"])
    assert allowed.wait(timeout=300) == 0
    assert final_state(out)["epoch"] == 2


SIGNALS = """
import os, signal, sys, time
from resnet50_recipe.trainer.stop import StopControl, install_signal_handlers
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    control = StopControl()
    install_signal_handlers(control)
    os.kill(os.getpid(), sig)
    time.sleep(0.2)
    print(sig.name, control.stop.is_set(), control.reason, flush=True)
os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while a stop is pending
time.sleep(5)
sys.exit(3)
"""


def test_signals_ask_for_a_stop_and_a_second_sigint_exits_at_once():
    done = subprocess.run([sys.executable, "-c", SIGNALS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stdout.splitlines() == ["SIGTERM True SIGTERM received", "SIGUSR1 True SIGUSR1 received",
                                        "SIGINT True SIGINT received"]
