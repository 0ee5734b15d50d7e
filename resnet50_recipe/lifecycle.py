"""The phases of a run around the training loop, in the order `engine.train` calls them (docs/DESIGN.md,
"The run's phases"):

1. `check_inputs`: everything a start can fail on (data, batch arithmetic, export settings, the remote), checked
   before anything is written, so a bad start leaves the run directory as it was;
2. `open_run`: the run-directory lock, the resume decision and the run's lineage, checks of the checkpoint
   against the recipe and data, and only then the first writes;
3. `Services`: the checkpoint writer, the S3 uploader and the spot watcher, with bounded drains;
4. (the epoch loop and the `Checkpointer`, in engine.py);
5. `exit_status` and `finish_sync`: what a stop or a finish leaves behind, and the status the process exits with.

The signal handlers are installed by `engine.train` before phase 1, so a stop is honoured at every point.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint as ckpt
from .data import ImageFolderDataset, class_names, eval_transform, resolve_data_dir, train_size_at, train_transform
from .recipe import Recipe, RecipeError, recipe_diff, to_dict
from .runlog import check_replaceable, clear_run_dir
from .runtime import Runtime
from .spot import EXIT_PREEMPTED, StopControl

log = logging.getLogger(__name__)

# Exit statuses (README, "Exit codes"). The systemd unit restarts on 74 and 75 and on nothing it cannot fix.
EXIT_FINISHED = 0
EXIT_BAD_INPUT = 2
EXIT_PUBLISH_FAILED = 3  # trained, complete and synced; the export or the Hub push failed: retry those by hand
EXIT_BUDGET = 4  # stopped with a checkpoint, complete and synced, because train.budget_usd would be passed
EXIT_INCOMPLETE = 74  # EX_IOERR: a checkpoint or the run's files did not reach disk or S3 before the deadline
__all__ = ["EXIT_PREEMPTED"]


class SetupStopped(Exception):
    """A stop request arrived before training began: nothing was changed, so the run exits 75 at once."""


def check_stop(control: StopControl, where: str) -> None:
    if control.stop.is_set():
        raise SetupStopped(f"stopped during set-up ({control.reason}), before {where}; nothing was changed")


# ---------------------------------------------------------------------------------------------------------
# 1. Inputs


@dataclass
class Inputs:
    """What the run trains on, checked: datasets scanned, batch arithmetic done, the remote reachable."""
    data_dir: Path
    classes: list[str]
    train_set: ImageFolderDataset
    val_set: ImageFolderDataset
    num_batches: int  # micro-batches per epoch, a whole number of optimizer steps
    updates_per_epoch: int
    samples_per_batch: int  # one micro-batch over every process
    global_batch: int
    store: object | None  # storage.S3Store when checkpoint.remote is set


def check_inputs(recipe: Recipe, rt: Runtime, control: StopControl) -> Inputs:
    """Every check that needs no checkpoint, in the order of their cost; raises on bad input, writes nothing."""
    tc = recipe.train
    if tc.sync_bn and rt.distributed and rt.device.type != "cuda":
        raise RecipeError("train.sync_bn: torch's SyncBatchNorm runs on CUDA devices only; set it to false for "
                          "CPU processes")
    if recipe.log.wandb and importlib.util.find_spec("wandb") is None:
        raise RecipeError("log.wandb: true needs the wandb package: pip install 'resnet50-recipe[wandb]', or set "
                          "log.wandb: false")
    data_dir = resolve_data_dir(recipe.data)
    classes = class_names(data_dir)
    if rt.is_main:
        check_export(recipe, classes)
    check_stop(control, "scanning the data")
    # The transform is set per epoch by the loop (progressive resizing); epoch 0's until then, which is what the
    # sample images of a fresh run show.
    train_set = ImageFolderDataset(data_dir / "train", classes, train_transform(recipe.augment,
                                   train_size_at(recipe.augment, 0)), recipe.seed, recipe.data.bad_images)
    val_set = ImageFolderDataset(data_dir / "val", classes, eval_transform(recipe.augment), recipe.seed,
                                 recipe.data.bad_images)
    check_stop(control, "opening the run")
    samples_per_batch = tc.batch_size * rt.world_size
    full_batches = len(train_set) // samples_per_batch
    num_batches = full_batches if tc.steps_per_epoch is None else min(full_batches, tc.steps_per_epoch * tc.accum_steps)
    num_batches -= num_batches % tc.accum_steps
    if num_batches == 0:
        raise ValueError(f"{data_dir / 'train'}: {len(train_set)} images give no full optimizer step at "
                         f"train.batch_size={tc.batch_size} x {rt.world_size} processes x accum_steps="
                         f"{tc.accum_steps}; lower the batch size")
    store = None
    cc = recipe.checkpoint
    if cc.remote:
        from .storage import S3Store

        check_stop(control, "checking the remote")
        store = S3Store(cc.remote, cc.endpoint_url, cc.checksum)
        if rt.is_main:
            store.preflight(cc.startup_retry_s)  # a wrong bucket or a missing permission fails here, before any work
    return Inputs(data_dir, classes, train_set, val_set, num_batches, num_batches // tc.accum_steps,
                  samples_per_batch, samples_per_batch * tc.accum_steps, store)


def check_export(recipe: Recipe, classes: list[str]) -> None:
    """The export and push settings, which would otherwise fail only after the whole run has trained."""
    ec = recipe.export
    if not ec.enabled:
        return
    if ec.label_names:
        path = Path(ec.label_names).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"export.label_names: {str(path)!r} not found; expected a text file with one "
                                    f"class name per line ({len(classes)} lines, in class-index order)")
        names = [line for line in path.read_text().splitlines() if line.strip()]
        if len(names) != len(classes):
            raise RecipeError(f"export.label_names: {path} has {len(names)} names for the {len(classes)} classes "
                              "of the data; it needs one per class, in class-index order")
    if ec.repo_id:
        from huggingface_hub import get_token
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(ec.repo_id)
        except HFValidationError as e:
            raise RecipeError(f"export.repo_id: {ec.repo_id!r} is not a Hub repo id ({e}); expected user/name")
        if "/" not in ec.repo_id:
            raise RecipeError(f"export.repo_id: {ec.repo_id!r} names no owner; expected user/name")
        if get_token() is None:
            raise RecipeError("export.repo_id: pushing to the Hub needs a token, and none was found (HF_TOKEN or "
                              "`hf auth login`); log in, or set export.repo_id: null and push later with "
                              "`resnet50-recipe push`")


# ---------------------------------------------------------------------------------------------------------
# 2. Opening the run


class RunLocked(FileExistsError):
    """Another live trainer holds the run directory."""


# Descriptors of the run locks this process holds. A forked child (a DataLoader worker) would share the lock
# through its copy of the descriptor and keep it alive after the trainer itself was killed, so that the restart
# found the run "in use" until the orphaned workers noticed: each child closes its copies at once. Closing a
# copy never releases the parent's lock; only LOCK_UN or the last copy's close does.
_held_lock_fds: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in _held_lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_lock_fds.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)


class RunLock:
    """An OS lock (flock) on `<run dir>/.lock`, held for the whole run by the process that writes the directory.

    The kernel drops the lock when its holder dies, however it dies (forked children keep no copy of it), so a
    lock file left by a killed process is stale and simply taken over. The file names its holder (pid, host,
    start time) for the refusal message, and it is removed on release, so a refused or failed start leaves the
    directory's files as they were.
    """

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLocked(f"{self.path.parent}: another trainer is using this run directory (pid "
                                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
                                f"{holder.get('since', '?')}); wait for it, stop it, or pass --output DIR for a "
                                "separate run") from None
            try:  # a holder that released between our open and our flock has unlinked the file: start again
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        stale = _holder(fd)
        if stale:
            log.warning("taking over the lock of %s: pid %s on host %s is no longer running there", self.path,
                        stale.get("pid"), stale.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self.fd = fd
        _held_lock_fds.add(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        _held_lock_fds.discard(self.fd)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


@dataclass
class Run:
    """An opened run: where it lives, its lineage, and the checkpoint it resumes from (None: step 0)."""
    out: Path
    lineage: dict
    state: dict | None = None
    resume_path: Path | None = None
    diff: list[str] = field(default_factory=list)  # result-changing recipe keys that differ, allowed
    lock: RunLock | None = None

    @property
    def folder(self) -> Path:
        return self.out / "checkpoints"

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run(recipe: Recipe, rt: Runtime, inputs: Inputs, output: str | Path | None, resume: str, force: bool,
             allow_recipe_change: bool, control: StopControl, say) -> Run:
    """Decide where the run starts, on rank 0, and tell every rank.

    Rank 0 takes the lock, finds the checkpoint (`decide`), checks it against the recipe and data, and only then
    writes: the run directory, a fetched checkpoint, a new lineage's manifest, the claim on the remote. Every
    other rank then loads the same checkpoint. An error on rank 0 ends every rank the same way.
    """
    out = Path(output or Path("runs") / recipe.name)
    decision: dict = {}
    run = None
    if rt.is_main:
        try:
            run = Run(out, lineage={}, lock=RunLock(out).acquire())
            decide(run, recipe, rt, inputs, resume, force, allow_recipe_change, control, say)
            decision = {"lineage": run.lineage, "path": str(run.resume_path) if run.state is not None else None,
                        "diff": run.diff}
        except BaseException as e:
            if run is not None:
                run.close()
            decision = {"error": f"{type(e).__name__}: {e}"}
            rt.broadcast(decision)
            raise
    decision = rt.broadcast(decision)
    if "error" in decision:
        if decision["error"].startswith("SetupStopped"):
            raise SetupStopped(decision["error"])
        raise RuntimeError(f"rank 0 could not open the run: {decision['error']}")
    if run is None:
        run = Run(out, decision["lineage"], diff=decision["diff"])
        if decision["path"] is not None:
            run.resume_path = Path(decision["path"])
            run.state = ckpt.load_state(run.resume_path)
    return run


def decide(run: Run, recipe: Recipe, rt: Runtime, inputs: Inputs, resume: str, force: bool,
           allow_recipe_change: bool, control: StopControl, say) -> None:
    """The resume decision and the lineage rule (docs/DESIGN.md, "Run lineage"), then the run directory."""
    folder, store = run.folder, inputs.store
    damaged = False
    try:
        manifest = ckpt.read_manifest(folder) if folder.is_dir() else None
    except ValueError:  # explained in the error; only a start that leaves the files to their owner goes on
        if resume == "auto" or (resume == "never" and not force):
            raise
        manifest, damaged = None, True
    staged = None
    remote = None
    if resume == "auto":
        local = ckpt.find_latest(folder)
        if local is None and manifest is not None and manifest["checkpoints"]:
            raise ValueError(f"{folder}: latest.json lists {len(manifest['checkpoints'])} checkpoint(s) and none "
                             "passes its size and hash check (see the lines above). Nothing was changed: resume "
                             "from one explicitly with --resume PATH, or pass --output DIR for a new run")
        current = ckpt.lineage_of(manifest)
        if store is not None:
            check_stop(control, "fetching from the remote")
            remote, _ = store.manifest(rebuild=True)  # a lost latest.json: from the sidecars
            theirs = ckpt.lineage_of(remote)
            if theirs is not None and (current is None or (theirs["run_id"] != current["run_id"]
                                                           and theirs["started"] > current["started"])):
                if current is not None:  # the remote moved on to a newer lineage: local files are an old one
                    say(f"the remote holds lineage {theirs['run_id']}, newer than this directory's "
                        f"{current['run_id']}: following it")
                current, local = theirs, None
            if theirs is not None and theirs["run_id"] == current["run_id"]:
                from .storage import stage_remote
                staged = stage_remote(store, folder, remote, local[1]["global_step"] if local else -1)
        run.lineage = current or ckpt.new_lineage()
        if staged is not None:
            run.resume_path, run.state = folder / staged[1]["file"], ckpt.load_state(staged[0], staged[1])
        elif local is not None:
            run.resume_path, run.state = local
    elif resume == "never":
        if (damaged or manifest is not None and manifest["checkpoints"]) and not force:
            raise FileExistsError(f"{run.out} holds checkpoints of an earlier run; resume it (the default, --resume "
                                  "auto), pass --output DIR for a new run, or --force to delete them and start "
                                  "over")
        run.lineage = ckpt.new_lineage()
    else:
        run.resume_path, run.state = Path(resume), ckpt.load_state(resume)
        theirs = ckpt.lineage_of(run.state)
        newest = manifest is not None and manifest.get("file") and (folder / manifest["file"]).resolve() == \
            run.resume_path.resolve() and ckpt.lineage_of(manifest)["run_id"] == theirs["run_id"]
        # Continuing from the newest checkpoint of this directory's lineage is a plain resume; any other start
        # from a file (a rollback, a copy into a new directory) is a new lineage that remembers its parent.
        run.lineage = ckpt.lineage_of(manifest) if newest else ckpt.new_lineage(
            {"run_id": theirs["run_id"], "step": run.state["global_step"]})
    try:
        check_resumable(run, recipe, inputs, allow_recipe_change)
        if run.state is None and (resume == "never" or manifest is None
                                  or ckpt.lineage_of(manifest)["run_id"] == run.lineage["run_id"]):
            check_replaceable(run.out, force)  # a fresh start over this lineage's own results
    except BaseException:
        if staged is not None:
            staged[0].unlink(missing_ok=True)
        raise
    check_stop(control, "writing the run directory")
    prepare(run, manifest, damaged, staged, remote, resume, force, recipe, inputs, say)


def check_resumable(run: Run, recipe: Recipe, inputs: Inputs, allow_recipe_change: bool) -> None:
    """The checkpoint must be of this model and these classes (always), and of this recipe, this train set and
    this global batch (or the change allowed)."""
    state = run.state
    if state is None:
        return
    then, now = state["recipe"]["model"], to_dict(recipe)["model"]
    arch = [f"model.{key}: {then.get(key)!r} -> {now.get(key)!r}" for key in ("name", "aa_layer")
            if then.get(key) != now.get(key)]
    if arch:
        raise RecipeError(f"{run.resume_path}: {'; '.join(arch)}: the model architecture cannot change on resume, "
                          "even with --allow-recipe-change (the saved weights fit only their own architecture); "
                          "resume with the checkpoint's model, or start a new run with --output DIR")
    if state["class_names"] != inputs.classes:
        raise ValueError(f"{inputs.data_dir}: its {len(inputs.classes)} classes differ from the "
                         f"{len(state['class_names'])} the checkpoint {run.resume_path} was trained on; the classes "
                         "cannot change on resume, even with --allow-recipe-change (the classifier has one output "
                         "per class): use the data it was trained on, or start a new run with --output DIR")
    run.diff = recipe_diff(state["recipe"], to_dict(recipe))
    if run.diff and not allow_recipe_change:
        raise RecipeError(f"{run.resume_path}: the recipe differs from the checkpoint's in keys that change the "
                          "result:\n  " + "\n  ".join(run.diff) + "\npass --allow-recipe-change to resume anyway, "
                          "or --output DIR for a new run")
    changed = train_set_change(state, inputs)
    if changed and not allow_recipe_change:
        raise RecipeError(f"{inputs.data_dir / 'train'}: the train set differs from the one the checkpoint "
                          f"{run.resume_path} was trained on ({changed}); the epoch's order and the schedule's "
                          "length follow from it. Put the files back, or pass --allow-recipe-change to go on with "
                          "this train set from the first batch of the next epoch")
    if changed:
        run.diff.append(f"train set: {changed}")  # the schedule is rebuilt for the new epoch length
    tc = recipe.train
    if state.get("global_batch", inputs.global_batch) != inputs.global_batch and not allow_recipe_change:
        raise RecipeError(f"{run.resume_path}: the global batch was {state['global_batch']} images per step and is "
                          f"now {inputs.global_batch} (batch_size {tc.batch_size} x "
                          f"{inputs.samples_per_batch // tc.batch_size} processes x accum_steps {tc.accum_steps}); "
                          "match it, or pass --allow-recipe-change")


def train_set_change(state: dict, inputs: Inputs) -> str | None:
    """How the train set differs from the checkpoint's (its image count and file-list hash); None when it does
    not, or when the checkpoint predates the record."""
    then, now = state.get("train_set"), inputs.train_set.fingerprint()
    if then is None or then == now:
        return None
    return (f"{then['images']} images then, {now['images']} now" if then["images"] != now["images"] else
            f"the same {now['images']} images in number, but other files")


def prepare(run: Run, manifest: dict | None, damaged: bool, staged, remote: dict | None, resume: str, force: bool,
            recipe: Recipe, inputs: Inputs, say) -> None:
    """The first writes, once everything is checked: the run directory, the lineage, the fetched checkpoint."""
    folder, cc = run.folder, recipe.checkpoint
    if resume == "never" and force and not damaged:
        for path in folder.glob("ckpt-*.pt"):  # what --force promises; set-aside lineages stay
            path.unlink()
    current = ckpt.lineage_of(manifest)
    if folder.is_dir() and (damaged or (current is not None and current["run_id"] != run.lineage["run_id"])):
        ckpt.start_lineage(folder, run.lineage)  # an abandoned lineage's files are set aside, and listed
    if run.state is None or resume == "never":
        clear_run_dir(run.out)
    if staged is not None:
        from .storage import install_staged, pull_files

        install_staged(inputs.store, folder, staged, remote, cc.keep_last)
        pull_files(inputs.store, run.out)
    elif run.state is not None and ckpt.lineage_of(run.state)["run_id"] != run.lineage["run_id"]:
        # A new lineage from a checkpoint: its first checkpoint is that state, under the new id, so that a stop
        # before its first save resumes from the same point instead of from step 0.
        state = {**run.state, "lineage": run.lineage}
        entry = ckpt.save_atomic(state, folder / ckpt.checkpoint_name(state["global_step"]))
        ckpt.commit(folder, entry, None, cc.keep_last, cc.keep_best, run.lineage)
        run.state, run.resume_path = state, folder / entry["file"]
    ckpt.remove_partials(folder)  # leftovers of an interrupted write (the staged download is in place by now)
    if current is None or current["run_id"] != run.lineage["run_id"]:
        parent = run.lineage.get("parent")
        say(f"new lineage {run.lineage['run_id']}" + (f", from step {parent['step']} of lineage {parent['run_id']}"
                                                      if parent else "") + f"; run dir {run.out}")
    if inputs.store is not None:
        from .storage import claim

        claim(inputs.store, run.lineage)  # before the first upload: the remote follows this lineage from now on
    run.out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------
# 3. Services


class Services:
    """The checkpoint writer, the S3 uploader and the spot watcher (rank 0 only), and their bounded drains."""

    def __init__(self, run: Run, recipe: Recipe, rt: Runtime, inputs: Inputs, control: StopControl, runlog):
        from .spot import start_spot_watcher

        cc = recipe.checkpoint
        self.uploader = self.writer = self.watcher = self.budget = None
        if not rt.is_main:
            return
        if inputs.store is not None:
            from .storage import Uploader

            self.uploader = Uploader(inputs.store, run.out, cc.keep_last, cc.keep_best, run.lineage)
            local = ckpt.read_manifest(run.folder) if run.folder.is_dir() else None
            if local is not None and local.get("file"):
                self.uploader.submit(local)  # a checkpoint written while the store was out of reach goes up now
        self.writer = ckpt.Writer(run.folder, cc.keep_last, cc.keep_best,
                                  self.uploader.submit if self.uploader else None, run.lineage)
        self.watcher = start_spot_watcher(control, cc.spot_notice, cc.imds_endpoint, cc.spot_poll_s)
        if self.watcher is not None:  # on EC2: every metrics line also says what the instance costs
            from . import cost
            runlog.extra = cost.InstanceCost(self.watcher, run.out / "metrics.jsonl")
            if recipe.train.budget_usd is not None:
                self.budget = cost.Budget(recipe.train.budget_usd, runlog.extra)

    def drain(self, deadline: float) -> list[str]:
        """Wait, until `deadline` (epoch seconds) at most, for the checkpoint on disk and then in S3; return what
        did not finish. The writer's errors (a full disk) are raised, not waited out."""
        unfinished = []
        if self.writer is not None and not self.writer.drain(max(0.0, deadline - time.time())):
            unfinished += [f"write of checkpoint at step {step}" for step in self.writer.waiting]
        if self.uploader is not None:
            if not unfinished:
                self.uploader.drain(max(0.0, deadline - time.time()))
            unfinished += self.uploader.unfinished()
        return unfinished

    def sync(self, deadline: float) -> list[str]:
        """The run's files (metrics, summary, export, ...) after the checkpoints; what did not finish."""
        if self.uploader is None:
            return []
        self.uploader.sync_files()
        return self.drain(deadline)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.halt()
        if self.uploader is not None:
            self.uploader.close()


# ---------------------------------------------------------------------------------------------------------
# 5. The end


def exit_status(summary: dict) -> int:
    """0 finished; 74 something did not reach disk or S3 in time (a restart retries it); 75 stopped with a
    checkpoint (a restart continues); 3 finished and synced, but the export or push failed; 4 stopped with a
    checkpoint by train.budget_usd (not restarted)."""
    if summary.get("unfinished"):
        return EXIT_INCOMPLETE
    if summary.get("over_budget"):
        return EXIT_BUDGET
    if summary.get("stopped"):
        return EXIT_PREEMPTED
    if summary.get("export_error") or summary.get("push_error"):
        return EXIT_PUBLISH_FAILED
    return EXIT_FINISHED
