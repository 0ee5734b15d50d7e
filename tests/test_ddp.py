"""DDP on CPU: gloo, 2 processes through torchrun, against 1 process with the same global batch."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet50_recipe.checkpoint import load_state, read_manifest
from resnet50_recipe.spot import EXIT_PREEMPTED
from resnet50_recipe.synthetic import generate

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "shapes", classes=4, per_class=48, val_per_class=7, size=32)


def args_for(data, out, processes, **extra):
    """A norm-per-sample model (ConvNeXt's LayerNorm), so 2 x 4 images per step is the same math as 1 x 8."""
    settings = {"model.name": "test_convnext", "model.drop_path": 0.0, "data.path": data, "data.synthetic": "null",
                "data.workers": 0, "train.device": "cpu", "train.deterministic": "true", "train.epochs": 2,
                "train.steps_per_epoch": 10, "train.batch_size": GLOBAL_BATCH // processes,
                "augment.train_size": 32, "augment.eval_size": 32, "log.every_steps": 1,
                "checkpoint.every_epochs": 1, "checkpoint.spot_notice": "off", "train.stop_sync_every": 1,
                "export.enabled": "false"}
    settings.update(extra)
    command = ["train", "smoke", "--output", str(out)]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    return command


def run(command, processes):
    if processes > 1:
        command = command + ["--nproc-per-node", str(processes)]
    return subprocess.Popen([sys.executable, "-m", "resnet50_recipe", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def weights(out):
    folder = Path(out) / "checkpoints"
    return load_state(folder / read_manifest(folder)["file"])


def assert_close(a, b):
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4), key


def test_two_processes_match_one_with_the_same_global_batch(data, tmp_path):
    one = run(args_for(data, tmp_path / "one", 1), 1)
    two = run(args_for(data, tmp_path / "two", 2), 2)
    assert one.wait(timeout=300) == 0, one.stdout.read()
    assert two.wait(timeout=300) == 0, two.stdout.read()
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a["global_step"] == b["global_step"] == 20 and a["global_batch"] == b["global_batch"] == GLOBAL_BATCH
    assert_close(a, b)
    # Distributed evaluation counts every val sample once: 28 images over 2 ranks, no padding.
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    epochs = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    reference = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert abs(summary["top1"] - reference["top1"]) < 1e-9
    assert any(r["kind"] == "epoch" for r in epochs)


def worker_pids(root: int) -> dict[int, int]:
    """rank -> pid of the training workers below `root` (the CLI, then torchrun, then the workers)."""
    found, stack = {}, [root]
    while stack:
        pid = stack.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            stack.append(child)
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank and b"LOCAL_RANK=" in b"\0".join(env):
                found[int(rank[0][5:])] = child
    return found


def test_sigterm_to_one_rank_stops_both_with_one_checkpoint_then_one_process_resumes(data, tmp_path):
    reference = run(args_for(data, tmp_path / "reference", 1), 1)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    out = tmp_path / "run"
    process = run(args_for(data, out, 2), 2)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= 13:
            break
        time.sleep(0.02)
    ranks = worker_pids(process.pid)
    assert set(ranks) == {0, 1}, ranks
    subprocess.run(["kill", "-TERM", str(ranks[1])], check=True)  # only rank 1 hears of it
    output = process.communicate(timeout=120)[0]
    assert process.returncode == EXIT_PREEMPTED, output
    folder = out / "checkpoints"
    manifest = read_manifest(folder)
    stopped = load_state(folder / manifest["file"])
    assert 13 <= stopped["global_step"] < 20 and stopped["step_in_epoch"] > 0  # one mid-epoch stop checkpoint
    assert [e["step"] for e in manifest["checkpoints"]] == [10, stopped["global_step"]]

    resumed = run(args_for(data, out, 1), 1)  # 1 process x 8 images: the same global batch
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming from" in output
    final = weights(out)
    assert final["global_step"] == 20
    assert_close(weights(tmp_path / "reference"), final)


def test_a_different_global_batch_is_refused_on_resume(data, tmp_path):
    out = tmp_path / "run"
    first = run(args_for(data, out, 1, **{"train.epochs": 1}), 1)
    assert first.wait(timeout=300) == 0
    changed = subprocess.run([sys.executable, "-m", "resnet50_recipe",
                              *args_for(data, out, 1, **{"train.epochs": 1, "train.batch_size": 4})],
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2
    assert "the global batch was 8 images per step and is now 4" in changed.stderr


def test_sync_bn_on_cpu_processes_is_a_clear_error(data, tmp_path):
    done = subprocess.run([sys.executable, "-m", "resnet50_recipe",
                           *args_for(data, tmp_path / "run", 2, **{"train.sync_bn": "true"}), "--nproc-per-node", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "train.sync_bn: torch's SyncBatchNorm runs on CUDA devices only" in done.stdout + done.stderr
