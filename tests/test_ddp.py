"""DDP on CPU: gloo, 2 processes through torchrun, against 1 process with the same global batch and against an
uninterrupted 2-process run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import GLOBAL_BATCH, args_for, assert_same_tree, free_port, output_of, worker_pids

from resnet50_recipe.data.synthetic import generate
from resnet50_recipe.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED
from resnet50_recipe.store.checkpoints import load_state, read_manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "shapes", classes=4, per_class=48, val_per_class=7, size=32)


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


@pytest.mark.parametrize("repeats", [1, 3], ids=["plain", "aug-repeats-3"])
def test_two_processes_match_one_with_the_same_global_batch(repeats, data, tmp_path):
    # With repeated augmentation too: each (epoch, index, repeat) key gives the same pixels whichever rank has it.
    one = run(args_for(data, tmp_path / "one", 1, **{"data.aug_repeats": repeats}), 1)
    two = run(args_for(data, tmp_path / "two", 2, **{"data.aug_repeats": repeats}), 2)
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


def sigterm_rank_1_after(process, out, steps: int, timeout: float = 120) -> None:
    """Once the run has logged `steps` step records, SIGTERM rank 1 only: rank 0 hears of it by the agreement."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= steps:
            break
        time.sleep(0.02)
    ranks = worker_pids(process.pid)
    assert set(ranks) == {0, 1}, ranks
    subprocess.run(["kill", "-TERM", str(ranks[1])], check=True)


def test_sigterm_to_one_rank_stops_both_with_one_checkpoint_then_one_process_resumes(data, tmp_path):
    reference = run(args_for(data, tmp_path / "reference", 1), 1)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    out = tmp_path / "run"
    process = run(args_for(data, out, 2), 2)
    sigterm_rank_1_after(process, out, steps=13)
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
    assert "the checkpoint holds the RNG states of 2 process(es) and this run has 1" in output
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


PROBE = """
import json, os, sys
from timm.data import Mixup
import resnet50_recipe.trainer.run as engine

out, rank = sys.argv[1], os.environ["RANK"]


def record(kind, **data):
    with open(f"{out}/rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"kind": kind, **data}) + "\\n")


params_per_batch = Mixup._params_per_batch


def recorded_params(self):
    lam, use_cutmix = params_per_batch(self)
    record("mixup", lam=float(lam), cutmix=bool(use_cutmix))
    return lam, use_cutmix


evaluate = engine.evaluate


def recorded_evaluate(model, *args, **kwargs):
    record("eval", buffers={n: b.double().sum().item() for n, b in model.named_buffers() if "running_" in n})
    return evaluate(model, *args, **kwargs)


Mixup._params_per_batch, engine.evaluate = recorded_params, recorded_evaluate
from resnet50_recipe.cli import main
sys.exit(main(sys.argv[2:]))
"""


def probed(data, out, probe_dir, **extra):
    """2 processes through torchrun, running the trainer under a probe that records, per rank, every Mixup draw
    and the BN buffers every evaluation starts with. A BN model with drop-path, Mixup/CutMix, erasing and EMA."""
    script = probe_dir / "probe.py"
    script.write_text(PROBE)
    settings = {"model.name": "test_resnet", "model.drop_path": 0.1, "mixup.mixup_alpha": 0.2,
                "mixup.cutmix_alpha": 1.0, "augment.re_prob": 0.25, "checkpoint.every_steps": 5,
                "checkpoint.keep_last": 10, **extra}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(probe_dir), *args_for(data, out, 2, **settings)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def records(probe_dir, rank, kind):
    lines = (probe_dir / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def reference_2p(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference-2p")
    process = probed(data, root / "run", root)
    output = output_of(process, 600)
    assert process.returncode == 0, output
    return root


def test_ranks_draw_their_own_mixup_and_evaluate_with_the_mean_bn_statistics(reference_2p):
    lambdas = [[r["lam"] for r in records(reference_2p, rank, "mixup")] for rank in (0, 1)]
    assert len(lambdas[0]) == len(lambdas[1]) == 20
    assert all(a != b for a, b in zip(*lambdas))  # in every step, each rank mixes its batch its own way

    evals = [records(reference_2p, rank, "eval") for rank in (0, 1)]
    assert len(evals[0]) == len(evals[1]) == 4  # raw and EMA, after each of 2 epochs
    assert all(a["buffers"] == b["buffers"] and a["buffers"] for a, b in zip(*evals))  # one model on every shard

    mid_epoch = load_state(reference_2p / "run" / "checkpoints" / "ckpt-000000005.pt")
    for saved, own in ((mid_epoch["model"], [r[0] for r in mid_epoch["norm_buffers"]]),
                       (mid_epoch["ema"], [r[1] for r in mid_epoch["norm_buffers"]])):
        names = [n for n in own[0] if n.endswith("running_mean")]
        assert names and any(not torch.equal(own[0][n], own[1][n]) for n in names)  # the ranks' statistics drift
        for name in own[0]:
            assert torch.allclose(saved[name], (own[0][name] + own[1][name]) / 2, rtol=1e-6, atol=1e-7), name


def test_sigterm_mid_epoch_then_resume_on_two_processes_is_bitwise_the_uninterrupted_run(data, reference_2p,
                                                                                         tmp_path):
    out = tmp_path / "run"
    process = probed(data, out, tmp_path)
    # Step 14 logged: the signal lands in step 15, a mid-epoch save's step, on rank 1 only, so that the save (a
    # collective) must be joined by both ranks before the stop is agreed.
    sigterm_rank_1_after(process, out, steps=14, timeout=300)
    output = output_of(process, 120)
    assert json.loads((out / "summary.json").read_text())["exit_status"] == EXIT_PREEMPTED, output
    stopped = weights(out)
    assert 10 < stopped["global_step"] < 20 and stopped["step_in_epoch"] > 0, output  # mid-epoch 2
    assert len(stopped["rng"]) == 2 and not torch.equal(stopped["rng"][0]["torch"], stopped["rng"][1]["torch"])

    resumed = probed(data, out, tmp_path)
    output = output_of(resumed, 600)
    assert resumed.returncode == 0, output
    assert "resuming from" in output and "RNG states of" not in output
    a, b = weights(reference_2p / "run"), weights(out)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "loop", "rng", "norm_buffers", "best",
                "global_step"):
        assert_same_tree(a[key], b[key], key)


def test_a_sigterm_to_torchruns_process_group_stops_every_rank_with_a_checkpoint(data, tmp_path):
    """torchrun passes a SIGTERM on to each rank's process group, the rank's loader workers included."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "resnet50_recipe", *args_for(data, out, 2, **{"data.workers": 2})]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= 3:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)  # torchrun's group: torchrun itself, which signals every rank's group
    output = output_of(process, 120)
    assert "killed by signal" not in output, output
    assert json.loads((out / "summary.json").read_text())["exit_status"] == EXIT_PREEMPTED, output
    stopped = weights(out)
    assert stopped["step_in_epoch"] > 0 or stopped["epoch"] > 0, output


RECORD_EXITS = """
import os, sys
from pathlib import Path
if os.environ.get("LOCAL_RANK") is not None:  # torchrun's workers only
    real_exit = sys.exit
    def recording_exit(code=0):
        Path(os.environ["EXIT_DIR"], "rank" + os.environ["RANK"]).write_text(str(code))
        real_exit(code)
    sys.exit = recording_exit
"""


@pytest.mark.parametrize("remote, status", [("missing bucket", EXIT_BAD_INPUT), ("refused connection", EXIT_PREEMPTED)])
def test_a_set_up_error_on_rank_0_ends_every_rank_and_the_command_with_its_status(remote, status, data, s3_endpoint,
                                                                                   tmp_path):
    """Only rank 0 asks the remote at start (the preflight): a bucket that does not exist is bad input (2), an
    endpoint that refuses connections a store that may come back (75); every rank, and the command, say so."""
    site, exits = tmp_path / "site", tmp_path / "exits"
    site.mkdir()
    exits.mkdir()
    (site / "sitecustomize.py").write_text(RECORD_EXITS)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "EXIT_DIR": str(exits)}
    endpoint = s3_endpoint if remote == "missing bucket" else f"http://127.0.0.1:{free_port()}"
    settings = {"checkpoint.remote": "s3://no-such-bucket/runs/x", "checkpoint.endpoint_url": endpoint,
                "checkpoint.startup_retry_s": 2}
    done = subprocess.run([sys.executable, "-m", "resnet50_recipe", *args_for(data, tmp_path / "run", 2, **settings),
                           "--nproc-per-node", "2"], capture_output=True, text=True, timeout=300, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == status, output
    assert {p.name: p.read_text() for p in exits.glob("rank*")} == {"rank0": str(status), "rank1": str(status)}, output


def test_the_relaunch_gives_torchrun_the_grace_the_stop_needs(data, tmp_path, monkeypatch):
    """torchrun sends SIGKILL 30 s after it passes a SIGTERM on, unless told otherwise: in the middle of a stop's
    checkpoint, which may take checkpoint.stop_timeout_s. Read back by this torch's own torchrun parser."""
    from torch.distributed.run import get_args_parser

    from resnet50_recipe.cli.train import torchrun_command

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    argv = args_for(data, tmp_path / "run", 2) + ["--nproc-per-node", "2"]
    command = torchrun_command(argv, 2, stop_timeout_s=250.5)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    parsed = get_args_parser().parse_args(command[3:])
    assert parsed.shutdown_timeout == 261  # the stop's whole deadline, and 10 s for the exit
    assert int(parsed.nproc_per_node) == 2 and parsed.standalone and parsed.module
    assert parsed.training_script == "resnet50_recipe" and parsed.training_script_args == argv[:-2]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "42")  # one the user set is theirs
    assert get_args_parser().parse_args(torchrun_command(argv, 2, 250.5)[3:]).shutdown_timeout == 42


def test_every_torch_that_setup_cfg_allows_has_torchruns_shutdown_timeout():
    """--shutdown-timeout (and TORCH_ELASTIC_SHUTDOWN_TIMEOUT) came with torch 2.12 (pytorch/pytorch#172596);
    .ci/run's floor pass runs the test above on exactly the floor."""
    import configparser

    config = configparser.ConfigParser()
    config.read(Path(__file__).parents[1] / "setup.cfg")
    floors = dict(line.split(">=") for line in config["options"]["install_requires"].split() if ">=" in line)
    assert tuple(map(int, floors["torch"].split(".")[:2])) >= (2, 12)
    assert tuple(map(int, floors["torchvision"].split(".")[:2])) >= (0, 27)  # the torchvision of torch 2.12


FIT_SCRIPT = """
import sys, threading
from http.server import ThreadingHTTPServer
sys.path.insert(0, {tests!r})
from helpers import FakeCost, MetadataStandIn
from resnet50_recipe import load_recipe, train
from resnet50_recipe.trainer import run
run.InstanceCost = FakeCost  # the stand-in price; only rank 0 watches the metadata, so only rank 0 has a budget
server = ThreadingHTTPServer(("127.0.0.1", 0), MetadataStandIn)
threading.Thread(target=server.serve_forever, daemon=True).start()
overrides = sys.argv[2:] + [f"checkpoint.imds_endpoint=http://127.0.0.1:{{server.server_port}}"]
raise SystemExit(train(load_recipe("smoke", overrides), sys.argv[1], quiet=True)["exit_status"])
"""


def test_a_fit_budgets_shorter_plan_is_rank_0s_on_every_rank(data, tmp_path):
    """train.budget_mode: fit under DDP: rank 0 alone prices the run, and the plan it makes reaches rank 1 (a rank
    left on the recipe's 8 epochs would wait in a collective that rank 0 never joins, and the run would hang)."""
    script, out = tmp_path / "fit.py", tmp_path / "run"
    script.write_text(FIT_SCRIPT.format(tests=str(Path(__file__).parent)))
    settings = {"data.path": data, "data.synthetic": "null", "data.workers": 0, "train.device": "cpu",
                "train.epochs": 8, "train.steps_per_epoch": 4, "train.batch_size": 4, "augment.train_size": 32,
                "augment.eval_size": 32, "log.every_steps": 1, "train.budget_usd": 2.4, "train.budget_mode": "fit",
                "checkpoint.spot_notice": "on", "export.enabled": "false"}
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                "2", str(script), str(out), *[f"{k}={v}" for k, v in settings.items()]],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = output_of(process, timeout=120)
    assert process.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    # $0.50 an epoch at the stand-in price (4 step lines and an epoch line), as in test_aws.py's single process
    assert summary["replan"] == {"planned_epochs": 8, "epochs": 4, "after_epoch": 1}
    assert summary["global_step"] == 16 and summary["epochs"] == 4
