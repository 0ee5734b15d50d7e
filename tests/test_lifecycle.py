"""The run's lifecycle, phase by phase: the lock, the lineage rule, the writer's queue, signals at every point,
bounded drains, the DDP stop, the finish, and failing starts that leave everything as it was."""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    MetadataStandIn,
    args_for,
    assert_same_tree,
    final_state,
    free_port,
    last_step,
    overlay,
    remote_args,
    start,
    tiny_overlay,
    without_timing,
    worker_pids,
)

from resnet50_recipe import load_recipe, train
from resnet50_recipe.errors import EXIT_INCOMPLETE, EXIT_PREEMPTED, EXIT_PUBLISH_FAILED
from resnet50_recipe.store.checkpoints import (
    FORMAT,
    CheckpointError,
    Writer,
    checkpoint_name,
    commit,
    find_latest,
    load_state,
    new_lineage,
    read_manifest,
    save_atomic,
    start_lineage,
    verify_checkpoint,
)
from resnet50_recipe.store.s3 import S3Store
from resnet50_recipe.trainer.lock import RunLock, RunLocked
from resnet50_recipe.trainer.runlog import RunLog
from resnet50_recipe.trainer.stop import StopControl

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from resnet50_recipe.data.synthetic import generate
    return generate(tmp_path_factory.mktemp("data") / "shapes", classes=4, per_class=48, val_per_class=8, size=32)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_state(step: int, lineage: dict, epoch: int = 0) -> dict:
    return {"format": FORMAT, "global_step": step, "epoch": epoch, "lineage": lineage,
            "weights": torch.full((4,), float(step))}


def write_checkpoint(folder: Path, step: int, lineage: dict, keep_last: int = 5, best: dict | None = None) -> dict:
    entry = save_atomic(fake_state(step, lineage), folder / checkpoint_name(step))
    return commit(folder, entry, best, keep_last, lineage=lineage)


# ---------------------------------------------------------------------------------------------------------
# The lock


def test_a_second_holder_of_the_run_directory_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / ".lock").exists()  # nothing is left behind
    # A trainer killed with SIGKILL leaves its lock file; the kernel released the lock itself.
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))
    taken = RunLock(tmp_path / "run").acquire()
    assert "taking over the lock" in caplog.text and "pid 999999 on host gone" in caplog.text
    taken.release()


LOCK_THEN_FORK = """
import os, sys, time
from pathlib import Path
from resnet50_recipe.trainer.lock import RunLock
RunLock(Path(sys.argv[1])).acquire()
if os.fork() == 0:  # a child that outlives its parent, as loader workers do for a while after a SIGKILL
    time.sleep(60)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_THEN_FORK, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} "):
            RunLock(tmp_path / "run").acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        RunLock(tmp_path / "run").acquire().release()  # while the orphaned child still sleeps
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "run")], check=False)


def test_a_second_trainer_on_the_same_directory_fails_at_once(tiny_data, tmp_path):
    holder = RunLock(tmp_path / "run").acquire()  # as a running trainer holds it
    try:
        args = [sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--output", str(tmp_path / "run")]
        for item in tiny_overlay(tiny_data):
            args += ["--set", item]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finally:
        holder.release()
    assert done.returncode == 2, done.stderr
    assert f"another trainer is using this run directory (pid {os.getpid()}" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------
# The lineage rule, on the checkpoint folder alone


def test_a_new_lineage_sets_the_old_one_aside_and_auto_resume_follows_only_the_new_one(tmp_path):
    folder = tmp_path / "checkpoints"
    old = new_lineage()
    for step in (2, 4, 6):
        write_checkpoint(folder, step, old)
    new = new_lineage({"run_id": old["run_id"], "step": 2})
    start_lineage(folder, new)
    assert find_latest(folder) is None  # the new lineage has nothing yet: not the old step 6
    write_checkpoint(folder, 3, new, keep_last=1)
    write_checkpoint(folder, 4, new, keep_last=1)  # retention of the new lineage...
    path, state = find_latest(folder)
    assert state["global_step"] == 4 and state["lineage"]["run_id"] == new["run_id"]
    manifest = read_manifest(folder)
    assert [e["step"] for e in manifest["checkpoints"]] == [4] and manifest["run_id"] == new["run_id"]
    aside = manifest["lineages"][0]
    assert aside["run_id"] == old["run_id"] and [e["step"] for e in aside["checkpoints"]] == [2, 4, 6]
    for entry in aside["checkpoints"]:  # ...never touches the old lineage's files, which stay verified
        assert verify_checkpoint(folder / aside["folder"] / entry["file"], entry) is None
    # An explicit path into the set-aside lineage loads, checked against the manifest's hashes.
    assert load_state(folder / aside["folder"] / "ckpt-000000006.pt")["global_step"] == 6


def test_best_names_a_file_that_exists_after_a_superseded_snapshot(tmp_path, monkeypatch):
    """The writer is busy with one snapshot while a best epoch's and then a newer one queue up."""
    gate, real_save = threading.Event(), torch.save

    def slow_first_save(state, f, *args, **kwargs):
        if state["global_step"] == 1:
            gate.wait(30)
        return real_save(state, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", slow_first_save)
    lineage = new_lineage()
    writer = Writer(tmp_path, keep_last=1, lineage=lineage)
    writer.submit(fake_state(1, lineage))
    while not writer.waiting or writer.waiting[-1] != 1:
        time.sleep(0.01)  # the first write has started
    best = {"top1": 0.9, "epoch": 0, "weights": "raw", "file": checkpoint_name(2)}
    writer.submit({**fake_state(2, lineage), "best_checkpoint": best, "is_best": True})
    writer.submit({**fake_state(3, lineage), "best_checkpoint": best})  # would supersede the best one
    gate.set()
    assert writer.drain(30)
    manifest = read_manifest(tmp_path)
    assert manifest["step"] == 3 and manifest["best"]["file"] == "ckpt-000000002.pt"
    assert verify_checkpoint(tmp_path / "ckpt-000000002.pt",
                                  next(e for e in manifest["checkpoints"] if e["file"] == "ckpt-000000002.pt")) is None


def test_a_damaged_manifest_names_the_cause_and_the_safe_way_out(tiny_data, tmp_path):
    recipe = load_recipe("smoke", tiny_overlay(tiny_data))
    train(recipe, tmp_path / "run", quiet=True)
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text('{"file": "ckpt-0000')  # cut short
    before = files_of(tmp_path / "run")
    with pytest.raises(ValueError) as error:
        train(recipe, tmp_path / "run", quiet=True)
    message = str(error.value)
    assert "latest.json is damaged" in message and "--resume PATH" in message
    assert "ckpt-000000002.pt" in message and "--force" not in message
    assert files_of(tmp_path / "run") == before
    # The way out works: resuming from the named file, a new lineage in the same directory.
    summary = train(recipe, tmp_path / "run", quiet=True, resume=str(tmp_path / "run/checkpoints/ckpt-000000002.pt"))
    assert summary["global_step"] == 2 and summary["exit_status"] == 0


# ---------------------------------------------------------------------------------------------------------
# Lineage through whole runs: locally, and against a real S3 server (moto)


def test_no_resume_force_with_a_remote_then_a_fresh_machine_resumes_the_new_lineage(tiny_data, bucket, s3_endpoint,
                                                                                    tmp_path):
    remote = remote_args(bucket, s3_endpoint, "r")
    old = train(load_recipe("smoke", tiny_overlay(tiny_data, **remote, **{
        "train.epochs": 3, "checkpoint.every_epochs": 1, "train.steps_per_epoch": 2, "checkpoint.keep_last": 3})),
        tmp_path / "a", quiet=True)
    assert old["global_step"] == 6
    short = load_recipe("smoke", tiny_overlay(tiny_data, **remote, **{"train.steps_per_epoch": 1}))
    new = train(short, tmp_path / "a", quiet=True, resume="never", force=True)
    assert new["global_step"] == 1 and new["run_id"] != old["run_id"]
    store = S3Store(f"s3://{bucket}/runs/r", s3_endpoint)
    pointer, _ = store.manifest()
    assert pointer["run_id"] == new["run_id"] and [e["step"] for e in pointer["checkpoints"]] == [1]
    aside = pointer["lineages"][0]  # the old lineage: kept, moved aside, listed
    assert aside["run_id"] == old["run_id"] and [e["step"] for e in aside["checkpoints"]] == [2, 4, 6]
    names = set(store.list("checkpoints/"))
    assert {f"checkpoints/lineages/{old['run_id']}/ckpt-00000000{s}.pt" for s in (2, 4, 6)} <= names
    fresh = train(short, tmp_path / "fresh", quiet=True)  # a fresh machine, the same remote
    assert fresh["global_step"] == 1 and fresh["run_id"] == new["run_id"]
    assert load_state(tmp_path / "fresh/checkpoints/ckpt-000000001.pt")["lineage"]["run_id"] == new["run_id"]


def test_a_rollback_then_auto_resume_stays_on_the_new_lineage(tiny_data, tmp_path, monkeypatch, capsys):
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{"train.epochs": 3, "checkpoint.every_epochs": 1,
                                                             "checkpoint.keep_last": 3}))
    first = train(recipe, tmp_path / "run", quiet=True)
    assert first["global_step"] == 6
    control, log = StopControl(), RunLog.log

    def stop_after_one_step(self, record):
        log(self, record)
        if record["kind"] == "step":
            control.request_stop("test")
    monkeypatch.setattr(RunLog, "log", stop_after_one_step)
    rollback = train(recipe, tmp_path / "run", resume=str(tmp_path / "run/checkpoints/ckpt-000000002.pt"),
                     control=control)
    assert rollback["stopped"] and rollback["global_step"] == 3 and rollback["run_id"] != first["run_id"]
    assert f"new lineage {rollback['run_id']}, from step 2 of lineage {first['run_id']}" in capsys.readouterr().out
    monkeypatch.undo()
    resumed = train(recipe, tmp_path / "run")  # auto: the rollback's step 3, not the abandoned step 6
    assert f"resuming from {tmp_path / 'run/checkpoints/ckpt-000000003.pt'}" in capsys.readouterr().out
    assert resumed["global_step"] == 6 and resumed["run_id"] == rollback["run_id"]
    aside = read_manifest(tmp_path / "run/checkpoints")["lineages"]
    assert [r["run_id"] for r in aside] == [first["run_id"]]
    assert [e["step"] for e in aside[0]["checkpoints"]] == [2, 4, 6]


# ---------------------------------------------------------------------------------------------------------
# Signals at every point of a run


SLOW_SETUP = """
import sys, time, pathlib
import resnet50_recipe.trainer.run as lifecycle
real = lifecycle.ImageFolderDataset
class SlowScan(real):  # as a scan of 1.28 million files takes its time
    def __init__(self, *args, **kwargs):
        if not pathlib.Path(sys.argv[1]).exists():
            pathlib.Path(sys.argv[1]).write_text("scanning")
            time.sleep(3)
        super().__init__(*args, **kwargs)
lifecycle.ImageFolderDataset = SlowScan
from resnet50_recipe.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_set_up_exits_75_and_changes_nothing(tiny_data, tmp_path):
    train(load_recipe("smoke", tiny_overlay(tiny_data)), tmp_path / "run", quiet=True)
    before = files_of(tmp_path / "run")
    marker = tmp_path / "scanning"
    args = ["train", "smoke", "--output", str(tmp_path / "run")]
    for item in tiny_overlay(tiny_data, **{"train.epochs": 2}):
        args += ["--set", item]
    process = subprocess.Popen([sys.executable, "-c", SLOW_SETUP, str(marker), *args, "--allow-recipe-change"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not marker.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == EXIT_PREEMPTED, output
    assert "stopped during set-up (SIGTERM received)" in output
    assert files_of(tmp_path / "run") == before


SLOW_VAL = """
import sys, time, pathlib
import resnet50_recipe.data.pipeline as data
real = data.ImageFolderDataset.__getitem__
def slow(self, key):
    if self.root.name == "val" and pathlib.Path(sys.argv[1]).parent.joinpath("slow").exists():
        pathlib.Path(sys.argv[1]).write_text("evaluating")
        time.sleep(0.5)
    return real(self, key)
data.ImageFolderDataset.__getitem__ = slow
real_start = data.leave_stops_to_the_parent
def slow_start(worker_id):  # a loader worker's start-up, before it ignores the stop signals, made long
    if pathlib.Path(sys.argv[1]).parent.joinpath("slow-start").exists():
        pathlib.Path(sys.argv[1]).write_text("starting")
        time.sleep(1)
    real_start(worker_id)
data.leave_stops_to_the_parent = slow_start
from resnet50_recipe.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_a_slow_evaluation_exits_at_once_and_the_resumed_run_is_identical(data, tmp_path):
    args = overlay(data, **{"train.epochs": 2, "data.workers": 0})
    reference = start(tmp_path / "reference", args)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    marker, out = tmp_path / "evaluating", tmp_path / "interrupted"
    (tmp_path / "slow").touch()  # 32 val images at 0.5 s each: a 16 s evaluation, twice (raw and EMA)
    command = [sys.executable, "-c", SLOW_VAL, str(marker), "train", "smoke", "--output", str(out)] + args
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not marker.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    signalled = time.time()
    output = process.communicate(timeout=120)[0]
    took = time.time() - signalled
    assert process.returncode == EXIT_PREEMPTED, output
    assert took < 12, f"the stop took {took:.1f} s"  # a val batch or two, not the 32 s of the whole evaluation
    assert "the resumed run evaluates epoch 1 first" in output
    stopped = final_state(out)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (1, 0) and stopped["pending_eval"]["epoch"] == 0

    (tmp_path / "slow").unlink()
    resumed = start(out, args)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "evaluating epoch 1 first: a stop interrupted its evaluation" in output
    a, b = final_state(tmp_path / "reference"), final_state(out)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "loop", "rng", "best", "global_step"):
        assert_same_tree(a[key], b[key], key)
    assert without_timing(a["metrics"]) == without_timing(b["metrics"])


SIGNAL_SEQUENCE = """
import os, signal, sys, time
from resnet50_recipe.trainer.stop import StopControl, install_signal_handlers
control = StopControl()
install_signal_handlers(control)
control.request_stop("EC2 spot interruption notice", time.time() + 120)  # the watcher's way of asking
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a stop is already under way, so nothing more
time.sleep(0.3)
print("still running", control.reason, flush=True)
os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: out now
time.sleep(5)
sys.exit(3)
"""


def test_only_a_second_sigint_exits_at_once_whatever_asked_for_the_stop_first():
    done = subprocess.run([sys.executable, "-c", SIGNAL_SEQUENCE], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["still running EC2 spot interruption notice"], done.stderr
    assert done.returncode == 130
    assert "press Ctrl-C again to exit at once" in done.stderr


@pytest.mark.parametrize("during", ["training", "evaluation", "worker start-up"])
def test_a_sigterm_to_the_whole_process_group_is_a_stop_with_a_checkpoint(during, data, tmp_path):
    """Slurm's scancel, `timeout`, `docker stop` under `tini -g`, KillMode=control-group and `kill -TERM -PGID`
    signal the loader workers too: the workers leave the stop to the trainer, which stops them itself. That holds
    from a worker's first instruction: a signal that lands while a worker is still starting waits for it."""
    args = overlay(data, **{"train.epochs": 2, "data.workers": 2, "log.every_steps": 1})
    marker, out = tmp_path / "evaluating", tmp_path / "run"
    if during == "evaluation":
        (tmp_path / "slow").touch()  # SLOW_VAL: 0.5 s per val image, in the loader workers
    if during == "worker start-up":
        (tmp_path / "slow-start").touch()  # SLOW_VAL: each train loader worker starts for 1 s
    command = [sys.executable, "-c", SLOW_VAL, str(marker), "train", "smoke", "--output", str(out)] + args
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        while process.poll() is None and not (last_step(out) >= 3 if during == "training" else marker.exists()):
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGTERM)  # the trainer and both loader workers, at once
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == EXIT_PREEMPTED, output
    assert "killed by signal" not in output and "exited unexpectedly" not in output
    if during == "worker start-up":
        return
    stopped = final_state(out)
    if during == "training":
        assert stopped["epoch"] == 0 and stopped["step_in_epoch"] > 0, output
    else:
        assert (stopped["epoch"], stopped["step_in_epoch"]) == (1, 0) and stopped["pending_eval"]["epoch"] == 0


def test_a_stop_at_the_epoch_end_is_agreed_once_and_always_checkpointed(tiny_data, tmp_path, monkeypatch):
    """The stop lands just after the epoch end has looked at it: the run goes on to the next step boundary and
    checkpoints there, so the checkpoint is always at the step the run stopped."""
    import resnet50_recipe.trainer.run as engine

    control, real = StopControl(), engine.agreed_stop
    calls = []

    def stop_just_after_looking(rt, stop):
        seen = real(rt, stop)
        if sys._getframe(1).f_code.co_name == "end_epoch":  # not the evaluation's own checks
            calls.append(seen)
            if len(calls) == 1:
                control.request_stop("test")
        return seen
    monkeypatch.setattr(engine, "agreed_stop", stop_just_after_looking)
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{"train.epochs": 3, "checkpoint.every_epochs": 5}))
    summary = train(recipe, tmp_path / "run", quiet=True, control=control)
    assert summary["stopped"] and summary["global_step"] == 3  # one step into epoch 2
    assert read_manifest(tmp_path / "run/checkpoints")["step"] == 3
    assert calls == [False]  # one agreement at the end of epoch 1, before the stop; the next one is a step's


def test_a_second_save_at_the_newest_checkpoints_step_never_rewrites_it(tiny_data, bucket, s3_endpoint, tmp_path,
                                                                       monkeypatch):
    """A run stopped during its last evaluation saves step S with the evaluation pending; the resumed run
    evaluates, then saves step S again. That save gets a name of its own: the file (and the S3 object) the
    manifest and the pointer list with their sha256 are never rewritten under them."""
    import resnet50_recipe.trainer.run as engine
    from resnet50_recipe.store.checkpoints import sha256_of

    control, evaluate_epoch = StopControl(), engine.evaluate_epoch

    def stopped_during_evaluation(loop, _control):
        control.request_stop("test")
        return None  # what evaluate_epoch answers when a stop cuts the evaluation short
    monkeypatch.setattr(engine, "evaluate_epoch", stopped_during_evaluation)
    args = tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "twice"), **{"checkpoint.keep_last": 5})
    first = train(load_recipe("smoke", args), tmp_path / "run", quiet=True, control=control)
    assert first["stopped"] and first["during"] == "evaluation"
    folder, store = tmp_path / "run" / "checkpoints", S3Store(f"s3://{bucket}/runs/twice", s3_endpoint)
    stopped = read_manifest(folder)
    assert store.get_json("checkpoints/latest.json")[0]["sha256"] == stopped["sha256"]

    monkeypatch.setattr(engine, "evaluate_epoch", evaluate_epoch)
    second = train(load_recipe("smoke", args), tmp_path / "run", quiet=True)
    assert second["exit_status"] == 0 and second["global_step"] == stopped["step"]
    final = read_manifest(folder)
    assert final["step"] == stopped["step"] and final["file"] != stopped["file"]
    assert sha256_of(folder / stopped["file"]) == stopped["sha256"]  # the first save at that step, untouched
    assert store.sha256(f"checkpoints/{stopped['file']}") == stopped["sha256"]
    pointer = store.get_json("checkpoints/latest.json")[0]
    assert pointer["file"] == final["file"]
    for entry in pointer["checkpoints"]:  # every object the pointer lists has the sha256 it lists
        assert store.sha256(f"checkpoints/{entry['file']}") == entry["sha256"], entry["file"]
    path, state = find_latest(folder)
    assert path.name == final["file"] and state["pending_eval"] is None  # a resume takes the evaluated one


def test_a_later_save_at_the_same_step_in_s3_wins_over_the_local_one(tiny_data, bucket, s3_endpoint, tmp_path,
                                                                     monkeypatch, capsys):
    """Machine A stops during its last evaluation (ckpt-S.pt, the evaluation pending) and is lost; machine B
    resumes from S3, evaluates and saves ckpt-S.1.pt. A resume on A's old disk takes B's evaluated save (a later
    save at the same step is newer), rather than evaluate again and save its own ckpt-S.1.pt over the object the
    remote pointer lists with B's sha256."""
    import resnet50_recipe.trainer.run as engine

    control, evaluate_epoch = StopControl(), engine.evaluate_epoch

    def stopped_during_evaluation(loop, _control):
        control.request_stop("test")
        return None
    monkeypatch.setattr(engine, "evaluate_epoch", stopped_during_evaluation)
    args = tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "later"), **{"checkpoint.keep_last": 5})
    assert train(load_recipe("smoke", args), tmp_path / "a", quiet=True, control=control)["stopped"]
    monkeypatch.setattr(engine, "evaluate_epoch", evaluate_epoch)
    shutil.copytree(tmp_path / "a", tmp_path / "a-disk")  # machine A's disk, as it was when it was lost
    train(load_recipe("smoke", args), tmp_path / "b", quiet=True)  # machine B, from S3
    store = S3Store(f"s3://{bucket}/runs/later", s3_endpoint)
    evaluated = store.get_json("checkpoints/latest.json")[0]["file"]
    capsys.readouterr()
    summary = train(load_recipe("smoke", args), tmp_path / "a-disk", quiet=False)
    assert summary["exit_status"] == 0
    assert f"resuming from {tmp_path / 'a-disk' / 'checkpoints' / evaluated}:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Bounded waits and the finish


def test_with_s3_down_a_stop_ends_by_its_deadline(tiny_data, s3_endpoint, tmp_path):  # s3_endpoint: credentials
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket="down")
    control = StopControl()
    stopped_at = []

    def outage_then_notice():
        while not (tmp_path / "run" / "checkpoints" / "latest.json").exists():
            time.sleep(0.02)
        server.stop()  # the store goes away mid-run...
        stopped_at.append(time.time())
        control.request_stop("EC2 spot interruption notice", deadline=time.time() + 4)  # ...and the notice comes
    threading.Thread(target=outage_then_notice, daemon=True).start()
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{
        "checkpoint.remote": "s3://down/r", "checkpoint.endpoint_url": f"http://127.0.0.1:{port}",
        "train.epochs": 50, "train.steps_per_epoch": 4, "train.batch_size": 2, "checkpoint.every_steps": 1}))
    summary = train(recipe, tmp_path / "run", quiet=True, control=control)
    took = time.time() - stopped_at[0]
    # Bounded by the deadline, not by boto3's retries (5 attempts of up to 5 s connect timeouts each, and then the
    # uploader's own backoff, for as long as the store is down).
    assert summary["stopped"] and took < 4 + 6, f"the stop took {took:.1f} s against a 4 s deadline"
    assert summary["exit_status"] == EXIT_INCOMPLETE
    assert any("upload of checkpoints/" in u for u in summary["unfinished"]), summary["unfinished"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["unfinished"] == summary["unfinished"]
    assert find_latest(tmp_path / "run" / "checkpoints")[1]["global_step"] == summary["global_step"]


def test_a_stops_deadline_is_fixed_when_it_is_asked_for_and_only_an_earlier_one_shortens_it():
    control = StopControl(timeout_s=100.0)
    asked = time.time()
    control.request_stop("SIGTERM received")
    first = control.stop_deadline()
    assert asked + 100 <= first <= time.time() + 100
    time.sleep(0.05)
    assert control.stop_deadline() == first  # the drain and the final sync share it: they never add up
    control.request_stop("EC2 spot interruption notice", deadline=first + 60)
    assert control.stop_deadline() == first  # a later notice does not lengthen it...
    control.request_stop("EC2 spot interruption notice", deadline=first - 30)
    assert control.stop_deadline() == first - 30  # ...an earlier one shortens it
    notice = StopControl(timeout_s=100.0)
    notice.request_stop("EC2 spot interruption notice", deadline=time.time() + 120)
    assert notice.stop_deadline() <= time.time() + 100  # a notice two minutes out still ends in stop_timeout_s


def test_a_sigterm_with_the_store_stalled_ends_within_one_stop_timeout(tiny_data, tmp_path):
    """The store stops answering (moto's server paused: the kernel accepts connections, nobody replies), then
    SIGTERM: the stop's drain and the final sync share one deadline, so the process is gone within
    checkpoint.stop_timeout_s (plus the exit), not twice that; systemd's TimeoutStopSec=110 covers 100 s once."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = None
    try:
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        s3.create_bucket(Bucket="stalls")
        out = tmp_path / "run"
        args = [sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--output", str(out)]
        for item in tiny_overlay(tiny_data, **{
                "checkpoint.remote": "s3://stalls/r", "checkpoint.endpoint_url": endpoint, "train.epochs": 500,
                "train.steps_per_epoch": 4, "train.batch_size": 2, "checkpoint.every_steps": 1,
                "checkpoint.stop_timeout_s": 5, "checkpoint.spot_notice": "off", "export.enabled": "false"}):
            args += ["--set", item]
        trainer = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while trainer.poll() is None and s3.list_objects_v2(Bucket="stalls", Prefix="r/checkpoints/latest.json",
                                                            MaxKeys=1).get("KeyCount", 0) == 0:
            time.sleep(0.1)
        os.kill(server.pid, signal.SIGSTOP)  # the store stalls: uploads hang on their read timeout (60 s)
        time.sleep(0.5)
        asked = time.monotonic()
        trainer.send_signal(signal.SIGTERM)
        output = trainer.communicate(timeout=300)[0]
        took = time.monotonic() - asked
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        server.wait(timeout=30)
    assert trainer.returncode == EXIT_INCOMPLETE, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] and any("upload of checkpoints/" in u for u in summary["unfinished"])
    assert find_latest(out / "checkpoints")[1]["global_step"] == summary["global_step"]
    # One 5 s deadline, with 4 s to spare for the step boundary, the save and the exit; the old second deadline
    # for the final sync alone made it 10 s or more.
    assert took < 9, f"SIGTERM to exit took {took:.1f} s against a 5 s stop_timeout_s\n{output}"


class PassedNotice(MetadataStandIn):
    """A spot notice whose time has already passed: the run's first stop save starts after its deadline."""
    notice = {"action": "terminate", "time": "2001-01-01T00:00:00Z"}


def test_a_stop_past_its_deadline_has_its_checkpoint_on_disk_before_the_summary(tiny_data, tmp_path, monkeypatch):
    from http.server import ThreadingHTTPServer

    from resnet50_recipe.trainer import run

    out, seen = tmp_path / "run", []
    real = run.write_json

    def recording_write_json(path, data):  # what the disk holds at the moment the summary says "stopped"
        if path.name == "summary.json":
            seen.append((data["stopped"], find_latest(out / "checkpoints")))
        real(path, data)
    monkeypatch.setattr(run, "write_json", recording_write_json)
    server = ThreadingHTTPServer(("127.0.0.1", 0), PassedNotice)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{
            "train.epochs": 3, "train.steps_per_epoch": 6, "checkpoint.spot_notice": "on", "export.enabled": "false",
            "checkpoint.imds_endpoint": f"http://127.0.0.1:{server.server_port}"}))
        summary = train(recipe, out, quiet=True)
    finally:
        server.shutdown()
    assert summary["stopped"] and summary["global_step"] < 18
    assert seen and all(stopped for stopped, _ in seen)
    assert all(latest is not None and latest[1]["global_step"] == summary["global_step"] for _, latest in seen), \
        f"summary.json written before the stop's checkpoint was on disk: {seen}"
    assert not any(u.startswith("write of checkpoint") for u in summary["unfinished"])


def test_a_stopped_runs_summary_is_resumed_or_started_over_never_refused(tiny_data, tmp_path):
    """A summary that says the run stopped (74, 75) is no finished run's result: --resume auto resumes from the
    checkpoint, or, where the process was killed before it was written, starts cleanly, never exits 2."""
    from http.server import ThreadingHTTPServer

    class Notice(PassedNotice):
        pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Notice)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = {"train.epochs": 2, "train.steps_per_epoch": 3, "checkpoint.spot_notice": "on",
                "export.enabled": "false", "checkpoint.imds_endpoint": f"http://127.0.0.1:{server.server_port}"}
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **settings))
    try:
        stopped = [train(recipe, tmp_path / name, quiet=True) for name in ("kept", "lost")]
        Notice.notice = None  # the restart: on a new instance, no notice
        assert all(s["stopped"] for s in stopped)
        shutil.rmtree(tmp_path / "lost" / "checkpoints")  # killed before the checkpoint reached the disk
        assert json.loads((tmp_path / "lost" / "summary.json").read_text())["stopped"]
        resumed = train(recipe, tmp_path / "kept", quiet=True)
        fresh = train(recipe, tmp_path / "lost", quiet=True)
    finally:
        server.shutdown()
    assert resumed["exit_status"] == fresh["exit_status"] == 0 and resumed["global_step"] == fresh["global_step"] == 6
    assert read_metrics_kinds(tmp_path / "kept").count("start") == 2  # resumed: the same log, a second start
    assert read_metrics_kinds(tmp_path / "lost").count("start") == 1  # started over: a fresh log


def read_metrics_kinds(out: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("failing", ["push", "export"])
def test_a_failed_publish_leaves_the_run_complete_and_synced_with_status_3(failing, tiny_data, bucket, s3_endpoint,
                                                                           tmp_path, monkeypatch, caplog):
    import huggingface_hub

    from resnet50_recipe.trainer import run

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")

    def refuse(*args, **kwargs):
        raise OSError("503 Service Unavailable" if failing == "push" else "[Errno 28] No space left on device")
    if failing == "push":
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)  # the Hub down
    else:
        monkeypatch.setattr(run, "export", refuse)  # the disk full by the time the export is written
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "p"),
                                               **{"export.repo_id": "someone/tiny"}))
    summary = train(recipe, tmp_path / "run", quiet=True)
    error = summary[f"{failing}_error"]
    assert summary["exit_status"] == EXIT_PUBLISH_FAILED and ("503" if failing == "push" else "Errno 28") in error
    retry = "resnet50-recipe push" if failing == "push" else f"resnet50-recipe export {tmp_path / 'run'}"
    assert retry in caplog.text and ("--repo-id someone/tiny" in caplog.text or failing == "export")
    store = S3Store(f"s3://{bucket}/runs/p", s3_endpoint)
    remote_summary, _ = store.get_json("summary.json")
    assert remote_summary[f"{failing}_error"] == error and remote_summary["global_step"] == 2
    assert remote_summary["exit_status"] == EXIT_PUBLISH_FAILED
    assert store.manifest()[0]["step"] == 2
    names = set(store.list())
    assert {"metrics.jsonl", "checkpoints/latest.json", "curves.png"} <= names
    if failing == "push":  # what was exported is synced too
        assert {"export/model.safetensors", "export/config.json"} <= names
    assert "hf_not_a_real_token" not in (tmp_path / "run" / "summary.json").read_text()


# ---------------------------------------------------------------------------------------------------------
# DDP: every rank waits for rank 0's stop checkpoint

SLOW_STOP_SAVE = """
import os, sys, time
from pathlib import Path
if os.environ.get("LOCAL_RANK") is not None:  # torchrun's workers only
    import torch
    real_save, real_exit = torch.save, sys.exit
    def slow_save(state, f, *args, **kwargs):
        if isinstance(state, dict) and state.get("step_in_epoch") and os.environ["RANK"] == "0":
            Path(os.environ["EXIT_DIR"], "saving").touch()
            time.sleep(float(os.environ["SLOW_SAVE_S"]))  # longer than torchrun's grace period below
        return real_save(state, f, *args, **kwargs)
    def recording_exit(code=0):
        Path(os.environ["EXIT_DIR"], "rank" + os.environ["RANK"]).write_text(str(code))
        real_exit(code)
    torch.save, sys.exit = slow_save, recording_exit
"""


def test_ddp_stop_every_rank_waits_for_rank_0s_checkpoint(data, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_STOP_SAVE)
    exits = tmp_path / "exits"
    exits.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "EXIT_DIR": str(exits), "SLOW_SAVE_S": "8", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"}
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "resnet50_recipe", *args_for(data, out, 2),
                                "--nproc-per-node", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= 13:
            break
        time.sleep(0.02)
    ranks = worker_pids(process.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGTERM)  # only rank 1 hears of it
    output = process.communicate(timeout=120)[0]
    assert (exits / "saving").exists(), output  # the slow save happened
    assert process.returncode == EXIT_PREEMPTED, output
    assert {p.name: p.read_text() for p in exits.glob("rank*")} == {"rank0": "75", "rank1": "75"}, output
    folder = out / "checkpoints"
    manifest = read_manifest(folder)
    assert verify_checkpoint(folder / manifest["file"], manifest) is None
    stopped = load_state(folder / manifest["file"])
    assert stopped["step_in_epoch"] > 0 and stopped["global_step"] >= 13


# ---------------------------------------------------------------------------------------------------------
# Nothing touched on failure


def test_a_bad_input_start_leaves_an_existing_run_directory_unchanged(tiny_data, tmp_path):
    from resnet50_recipe.cli import main

    run = tmp_path / "run"
    train(load_recipe("smoke", tiny_overlay(tiny_data)), run, quiet=True)
    args = ["train", "smoke", "--output", str(run), "--quiet"]
    for item in tiny_overlay(tiny_data):
        args += ["--set", item]
    with_checkpoints = files_of(run)
    assert main(args + ["--set", f"data.path={tmp_path / 'no-such-data'}"]) == 2  # a mistyped --data
    assert main(args + ["--set", "optim.lr=0.5"]) == 2  # a recipe change, refused
    assert files_of(run) == with_checkpoints
    # A finished run whose checkpoints were removed to save space: its export and summary stay.
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    (run / "checkpoints").rmdir()
    results = files_of(run)
    assert main(args + ["--set", f"data.path={tmp_path / 'no-such-data'}"]) == 2
    assert main(args) == 2  # even with good input, a fresh start does not replace results without --force
    assert files_of(run) == results


def test_a_save_on_a_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(tiny_data, tmp_path):
    run = tmp_path / "run"
    recipe = load_recipe("smoke", tiny_overlay(tiny_data))
    train(recipe, run, quiet=True)
    folder = run / "checkpoints"
    manifest = read_manifest(folder)
    longer = load_recipe("smoke", tiny_overlay(tiny_data, **{"train.epochs": 2}))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (manifest["size"] // 2, limits[1]))  # files past this fail: EFBIG
    try:
        with pytest.raises(CheckpointError, match=r"writing a checkpoint to .* failed \(\[Errno 27\] File too large\)"
                                                  r"; the previous checkpoint and latest.json are intact"):
            train(longer, run, quiet=True, allow_recipe_change=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert not list(folder.glob(".*tmp*"))
    assert read_manifest(folder) == manifest
    assert find_latest(folder)[1]["global_step"] == 2


# ---------------------------------------------------------------------------------------------------------
# Every bad input: one line, exit 2, before any work


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet50_recipe", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def one_clear_line(done: subprocess.CompletedProcess, *needles: str, alone: bool = True) -> None:
    """Exit 2 and the error in one line, with no traceback; `alone`: nothing else on stderr either."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("resnet50-recipe: error:"), done.stderr
    assert len(lines) == 1 or not alone, done.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.mark.parametrize("text, needles", [
    ("", ["the recipe is empty", "extends: smoke"]),
    ("# only a comment\n", ["the recipe is empty"]),
    ("train:\n  epochs: 2\n  epochs: 3\n", ["duplicate key 'epochs' at line 3 (first at line 2)"]),
    ("train:\n  epochs: 2\nmodel:\n  name: resnet18\ntrain:\n  batch_size: 8\n",
     ["duplicate key 'train' at line 5 (first at line 1)"]),
    ("extends: 5\n", ["`extends` must be a recipe file or shipped name, or a list of them, got 5"]),
    ("extends: {smoke: true}\n", ["`extends` must be a recipe file or shipped name"]),
    ("extends: [smoke, 3]\n", ["got 3 in the list"]),
    ("extends: smoke\nname: ../../elsewhere\n", ["name: '../../elsewhere' is not a run name"]),
], ids=["empty", "comment-only", "duplicate-key", "duplicate-section", "extends-int", "extends-mapping",
        "extends-list-item", "name-with-path"])
def test_bad_recipe_files_are_one_clear_line(text, needles, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    done = cli("train", str(recipe), "--output", str(tmp_path / "run"))
    one_clear_line(done, str(recipe) if "name:" not in text else "", *needles)
    assert not (tmp_path / "run").exists()


def test_bad_arguments_are_one_clear_line(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    one_clear_line(cli("train", str(tmp_path / "binary.yaml")), "not a text file")
    (tmp_path / "folder.yaml").mkdir()
    one_clear_line(cli("train", str(tmp_path / "folder.yaml")), "is a folder")
    one_clear_line(cli("train", "smoke", "--set", "train.epochs=[1", "--print-recipe"),
                   "--set train.epochs: '[1' is not a valid YAML value")
    one_clear_line(cli("train", "smoke", "--nproc-per-node", "0"), "--nproc-per-node 0")
    one_clear_line(cli("aws", "price", "--instance-types", "g4dn.xlarge,g9x.huge"),
                   "--instance-types: g9x.huge: not an instance type", "known: g4dn.xlarge")


def test_settings_that_would_fail_after_training_fail_before_it(tiny_data, tmp_path):
    args = ["train", "smoke", "--output", str(tmp_path / "run")]
    for item in tiny_overlay(tiny_data):
        args += ["--set", item]
    env_without_token = {**os.environ, "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "resnet50_recipe", *args, "--set", "export.repo_id=someone/tiny"],
                          capture_output=True, text=True, timeout=120, env=env_without_token)
    one_clear_line(done, "export.repo_id: pushing to the Hub needs a token")
    one_clear_line(cli(*args, "--set", "export.repo_id=not a repo"), "export.repo_id: 'not a repo'")
    one_clear_line(cli(*args, "--set", f"export.label_names={tmp_path / 'names.txt'}"),
                   "export.label_names", "not found")
    (tmp_path / "names.txt").write_text("one\ntwo\n")
    one_clear_line(cli(*args, "--set", f"export.label_names={tmp_path / 'names.txt'}"),
                   "has 2 names for the 3 classes")
    if not torch.cuda.is_available():
        one_clear_line(cli(*args, "--set", "train.device=cuda"), "train.device: 'cuda' asked for")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["zero-byte", "corrupt"])
def test_an_unreadable_jpeg_is_one_line_through_a_loader_worker_and_keeps_the_work_done(damage, tmp_path):
    from resnet50_recipe.data.pipeline import EpochSampler, scan_images
    from resnet50_recipe.data.synthetic import generate

    root = generate(tmp_path / "data", classes=2, per_class=40, val_per_class=2, size=32)
    samples = scan_images(root / "train", sorted(p.name for p in (root / "train").iterdir()))
    order = EpochSampler(len(samples), seed=0).global_order().tolist()
    # The first image of epoch 0's order, after a few steps, that is not among the 16 sample images a fresh run
    # shows TensorBoard (every fifth of the 80).
    position = next(k for k in range(6, len(order)) if order[k] % 5)
    broken, step = Path(samples[order[position]][0]), position // 2  # 2 images a step
    broken.write_bytes(b"" if damage == "zero-byte" else b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["train", "smoke", "--output", str(tmp_path / "run")]
    for item in tiny_overlay(root, **{"data.workers": 1, "train.batch_size": 2, "train.steps_per_epoch": step + 4,
                                      "checkpoint.every_epochs": 5}):
        args += ["--set", item]
    done = cli(*args)
    one_clear_line(done, f"{broken}: unreadable image", "data verify --fix", alone=False)
    assert f"checkpoint at step {step} written before stopping on an unreadable image" in done.stderr
    assert read_manifest(tmp_path / "run" / "checkpoints")["step"] == step  # the steps before it are kept


def test_a_final_upload_that_hangs_is_said_while_it_is_waited_for(tiny_data, bucket, s3_endpoint, tmp_path, caplog):
    """The finish waits up to checkpoint.upload_timeout_s for the uploads: a store that stops answering is a wait
    that the user sees, once, and how it ended."""
    import logging

    from helpers import FaultProxy

    caplog.set_level(logging.INFO, logger="resnet50_recipe")
    # The store stops answering at the final sync: summary.json is written at the finish only.
    with FaultProxy(s3_endpoint, lambda method, path, headers: "hang" if "summary.json" in path else None) as proxy:
        recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, proxy.endpoint, "hangs"), **{
            "checkpoint.upload_timeout_s": 9, "export.enabled": "false"}))
        summary = train(recipe, tmp_path / "run", quiet=True)
    assert summary["exit_status"] == EXIT_INCOMPLETE
    waits = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waits) == 1 and "Ctrl-C" in waits[0], caplog.text
    assert "gave up waiting" in caplog.text
