"""The run, in the order it happens: `train` is the outline, one call per phase, and the phases follow it here
in the same order and with the same numbers as in docs/DESIGN.md ("The run's phases").

0. signals: `install_signal_handlers`, before any set-up work, so that a stop is honoured at every point;
1. inputs, `check_inputs`: everything a start can fail on (data, batch arithmetic, export settings, the remote),
   checked before anything is written, so that a bad start leaves the run directory as it was;
2. open the run, `open_run`: the run-directory lock, the resume decision and the run's lineage, the checkpoint
   checked against the recipe and the data, and only then the first writes (`write_start`);
3. build, `build_loop`: samplers, loaders, the trainer, the checkpoint restored;
4. services, `Services`: the checkpoint writer, the S3 uploader and the spot watcher, with bounded drains;
5. the epoch loop, `run_epochs`: `run_epoch` (the steps, in step.py), `end_epoch` (evaluate, log, the one stop
   agreement, the checkpoint cadence), with the `Checkpointer`;
6. stop and drain, `stop_and_drain`: a stop's checkpoint on disk and in S3 by the deadline;
7. finish, `finish`: the summary, the last sync, export and push, and `exit_status`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from timm.utils import distribute_bn
from tqdm import tqdm

from resnet50_recipe.data.pipeline import (
    EpochSampler,
    ImageFolderDataset,
    UnreadableImage,
    class_names,
    close_loader,
    eval_transform,
    make_loader,
    resolve_data_dir,
    train_size_at,
    train_transform,
)
from resnet50_recipe.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUDGET,
    EXIT_FINISHED,
    EXIT_INCOMPLETE,
    EXIT_PREEMPTED,
    EXIT_PUBLISH_FAILED,
    ExistingOutput,
    MissingInput,
    UserError,
)
from resnet50_recipe.publish.export import export
from resnet50_recipe.publish.push import push
from resnet50_recipe.recipe import Recipe, RecipeError, recipe_diff, scaled_lr, to_dict
from resnet50_recipe.store.checkpoints import (
    Writer,
    checkpoint_name,
    commit,
    find_latest,
    free_name,
    lineage_of,
    load_state,
    new_lineage,
    read_manifest,
    remove_partials,
    save_atomic,
    save_order,
    start_lineage,
)
from resnet50_recipe.store.lineage import claim, install_staged, pull_files, stage_remote
from resnet50_recipe.store.s3 import RemoteUnavailable, S3Store, Waiting, is_transient
from resnet50_recipe.store.uploader import Uploader
from resnet50_recipe.trainer.budget import BUDGET_REASON, Budget, InstanceCost, fitted
from resnet50_recipe.trainer.components import build_scheduler
from resnet50_recipe.trainer.lock import RunLock
from resnet50_recipe.trainer.runlog import RunLog, check_replaceable, clear_run_dir
from resnet50_recipe.trainer.runtime import Runtime, setup, wait_timeout_s, write_json
from resnet50_recipe.trainer.state import (
    Progress,
    load_norm_buffers,
    norm_buffers,
    rank_rng_state,
    restore,
    rng_state,
    set_rng_state,
    snapshot,
)
from resnet50_recipe.trainer.step import Trainer, agreed_stop, build_trainer, evaluate, train_steps
from resnet50_recipe.trainer.stop import (
    StopControl,
    install_signal_handlers,
    metadata_endpoint,
    on_ec2,
    restore_signal_handlers,
    start_spot_watcher,
)

__all__ = ["train", "SetupStopped", "check_stop", "agreed", "shared_error", "raise_shared", "Inputs", "check_inputs",
           "check_export_settings", "Run",
           "open_run", "decide", "check_resumable", "train_set_change", "write_start", "Loop", "replan", "Outcome",
           "build_loop",
           "Services", "Checkpointer", "run_epochs", "run_epoch", "end_epoch", "evaluate_epoch", "stop_and_drain",
           "finish", "publish_run", "make_summary", "exit_status"]

log = logging.getLogger(__name__)

# A stop's reason when another run has taken the remote prefix over (exit 2).
SUPERSEDED_REASON = "the remote was taken over by another run"


# ---------------------------------------------------------------------------------------------------------
# The whole run: `train` is the outline; each phase is one call (docs/DESIGN.md, "The run's phases").


def train(recipe: Recipe, output: str | Path | None = None, *, quiet: bool = False, resume: str = "auto",
          force: bool = False, allow_recipe_change: bool = False, control: StopControl | None = None) -> dict:
    """Train `recipe` in the run directory `output` (default runs/<recipe name>); return the summary, whose
    `exit_status` is what `resnet50-recipe train` exits with (docs/exit-codes.md).

    `resume`: "auto" continues the run's current lineage from its newest valid checkpoint, locally or in S3,
    when there is one; "never" starts a new lineage (refusing to replace checkpoints unless `force`); a path
    continues from that checkpoint (a new lineage unless it is the current lineage's newest). A stop request
    (SIGTERM, SIGINT, SIGUSR1, the EC2 spot notice, or `control`) at any point ends the run at the next step
    boundary with a checkpoint, and `summary["stopped"]` set.
    """
    control = control or StopControl()
    # A stop's whole budget, from the moment it is asked for (a stop asked for before this, while the CLI loaded the
    # recipe, ends in set-up at once).
    control.timeout_s = recipe.checkpoint.stop_timeout_s
    handlers = install_signal_handlers(control)  # before any set-up work: a stop is honoured from here on
    run = services = loop = None
    try:
        rt = setup(recipe.train, recipe.seed, wait_timeout_s(recipe.checkpoint, recipe.export))
        say = (lambda *a: None) if quiet or not rt.is_main else (lambda msg: print(msg, flush=True))
        # 1. every check that needs no checkpoint, nothing written; an error on any rank ends every rank alike
        inputs = agreed(rt, lambda: check_inputs(recipe, rt, control), "check the inputs")
        run = open_run(recipe, rt, inputs, output, resume, force, allow_recipe_change, control, say)  # 2.
        loop = build_loop(recipe, rt, inputs, run, say, quiet)  # 3. loaders, trainer, the checkpoint restored
        services = Services(run, recipe, rt, inputs, control, loop.runlog)  # 4. writer, uploader, spot watcher
        outcome = run_epochs(loop, Checkpointer(loop, services, control), control)  # 5. the epoch loop
        unfinished = stop_and_drain(loop, services, outcome, control)  # 6. a stop's checkpoint made safe
        return finish(loop, services, outcome, unfinished, control)  # 7. summary, sync, export, push
    except SetupStopped as e:
        log.warning(str(e))
        return {"stopped": True, "during": "set-up", "global_step": None, "top1": None,
                "exit_status": EXIT_PREEMPTED}
    finally:
        if loop is not None:  # the loader workers leave the stop signals to us: we end them
            close_loader(loop.train_loader)
            close_loader(loop.val_loader)
        if services is not None:
            services.close()
        if run is not None:
            run.close()
        restore_signal_handlers(handlers)  # after the last sync


class SetupStopped(Exception):
    """A stop request arrived before training began: nothing was changed, so the run exits 75 at once."""


def check_stop(control: StopControl, where: str) -> None:
    if control.stop.is_set():
        raise SetupStopped(f"stopped during set-up ({control.reason}), before {where}; nothing was changed")


def agreed(rt: Runtime, work: Callable, what: str):
    """Run a set-up phase on every rank, then agree on how it went, in one collective: an error on any rank (the
    remote's preflight runs on rank 0 alone; a stop may reach one rank before the others) ends every rank with the
    status the single process would have, 2 for bad input and 75 for a stop or a store that may come back, and
    never leaves a rank waiting in a collective for a rank that has exited."""
    if not rt.distributed:
        return work()
    try:
        result, error = work(), None
    except Exception as e:
        result, error = e, shared_error(e)
    errors = rt.gather(error)
    if error is not None:
        raise result
    failed = next((rank for rank, e in enumerate(errors) if e is not None), None)
    if failed is not None:
        raise_shared(errors[failed], f"rank {failed} could not {what}")
    return result


def shared_error(error: Exception) -> dict:
    """A set-up error as another rank needs it: its line, and its kind, which sets the exit status."""
    kind = ("stopped" if isinstance(error, SetupStopped) else "user" if isinstance(error, UserError)
            else "transient" if is_transient(error) else "bug")
    return {"error": f"{type(error).__name__}: {error}", "kind": kind}


def raise_shared(error: dict, context: str):
    """Another rank's set-up error, raised here as the same kind: the CLI exits 75 for a stop or a transient
    store error, 2 for bad input (one line each, not a traceback), 1 for anything else."""
    kind = {"stopped": SetupStopped, "user": UserError, "transient": RemoteUnavailable}.get(error["kind"], RuntimeError)
    raise kind(f"{context}: {error['error']}")


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
        check_export_settings(recipe, classes)
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
        raise UserError(f"{data_dir / 'train'}: {len(train_set)} images give no full optimizer step at "
                        f"train.batch_size={tc.batch_size} x {rt.world_size} processes x accum_steps="
                        f"{tc.accum_steps}; lower the batch size")
    store = None
    cc = recipe.checkpoint
    if cc.remote:
        check_stop(control, "checking the remote")
        # On EC2 missing credentials are the instance role's, late: the store waits for them (its own layer cannot
        # ask the metadata service the trainer's way, so it is handed the probe, asked only if they are missing).
        store = S3Store(cc.remote, cc.endpoint_url, cc.checksum,
                        on_ec2=lambda: on_ec2(metadata_endpoint(cc.imds_endpoint)))
        if rt.is_main:
            # A wrong bucket or a missing permission fails here, before any work; a stop ends the wait.
            store.preflight(cc.startup_retry_s, control.stop)
            check_stop(control, "the remote answered")
    return Inputs(data_dir, classes, train_set, val_set, num_batches, num_batches // tc.accum_steps,
                  samples_per_batch, samples_per_batch * tc.accum_steps, store)


def check_export_settings(recipe: Recipe, classes: list[str]) -> None:
    """The export and push settings, which would otherwise fail only after the whole run has trained."""
    ec = recipe.export
    if not ec.enabled:
        return
    if ec.label_names:
        path = Path(ec.label_names).expanduser()
        if not path.is_file():
            raise MissingInput(f"export.label_names: {str(path)!r} not found; expected a text file with one "
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
# 2. Open the run


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
    other rank then loads the same checkpoint: from rank 0's file on its machine, or, with ranks on several
    machines, from its bytes, which rank 0 sends (each machine has its own --output, and only rank 0's run
    directory is the run's: the others' stay unwritten). An error on rank 0 ends every rank the same way.
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
            rt.broadcast(shared_error(e) if isinstance(e, Exception) else {"error": repr(e), "kind": "bug"})
            raise
    decision = rt.broadcast(decision)
    if "error" in decision:  # ended the way rank 0 ends: a stop or a transient store error 75, bad input 2
        raise_shared(decision, "rank 0 could not open the run")
    sent = None
    if decision["path"] is not None and not rt.one_machine:
        sent = rt.broadcast_file(run.resume_path if rt.is_main else None)
    if run is None:
        run = Run(out, decision["lineage"], diff=decision["diff"])
        if decision["path"] is not None:
            run.resume_path = Path(decision["path"])
            run.state = load_state(run.resume_path, data=sent)
    return run


def decide(run: Run, recipe: Recipe, rt: Runtime, inputs: Inputs, resume: str, force: bool,
           allow_recipe_change: bool, control: StopControl, say) -> None:
    """The resume decision and the lineage rule (docs/DESIGN.md, "Run lineage"), then the run directory."""
    folder, store = run.folder, inputs.store
    damaged = False
    try:
        manifest = read_manifest(folder) if folder.is_dir() else None
    except ValueError:  # explained in the error; only a start that leaves the files to their owner goes on
        if resume == "auto" or (resume == "never" and not force):
            raise
        manifest, damaged = None, True
    staged = None
    remote = None
    if resume == "auto":
        local = find_latest(folder)
        # Every listed checkpoint failing its check is refused (a fresh start would drop the run), unless S3
        # holds a good one of this lineage, which is then resumed from.
        damaged_all = local is None and manifest is not None and bool(manifest["checkpoints"])
        current = lineage_of(manifest)
        if store is not None:
            check_stop(control, "fetching from the remote")
            remote, _ = store.manifest(rebuild=True)  # a lost latest.json: from the sidecars
            theirs = lineage_of(remote)
            if theirs is not None and (current is None or (theirs["run_id"] != current["run_id"]
                                                           and theirs["started"] > current["started"])):
                if current is not None:  # the remote moved on to a newer lineage: local files are an old one
                    say(f"the remote holds lineage {theirs['run_id']}, newer than this directory's "
                        f"{current['run_id']}: following it")
                current, local = theirs, None
            if theirs is not None and theirs["run_id"] == current["run_id"]:
                mine = save_order({"step": local[1]["global_step"], "file": local[0].name}) if local else -1
                staged = stage_remote(store, folder, remote, mine)
                if staged is None and local is None and remote["checkpoints"]:
                    # A start from step 0 in this lineage would replace the run's pointer, and retention delete
                    # what it lists: as with a local directory, the user decides.
                    raise UserError(f"{store.remote}/checkpoints/latest.json lists {len(remote['checkpoints'])} "
                                    "checkpoint(s) of this run and none passes its sha256 check (see the lines "
                                    "above). Nothing was changed: resume from one explicitly with --resume PATH, "
                                    "or start over with --no-resume --force")
        if damaged_all and staged is None:
            raise UserError(f"{folder}: latest.json lists {len(manifest['checkpoints'])} checkpoint(s) and none "
                            "passes its size and hash check (see the lines above)"
                            + (", nor does the remote hold one of this run" if store is not None else "")
                            + ". Nothing was changed: resume from one explicitly with --resume PATH, or pass "
                            "--output DIR for a new run")
        run.lineage = current or new_lineage()
        if staged is not None:
            run.resume_path, run.state = folder / staged[1]["file"], load_state(staged[0], staged[1])
        elif local is not None:
            run.resume_path, run.state = local
    elif resume == "never":
        if (damaged or manifest is not None and manifest["checkpoints"]) and not force:
            raise ExistingOutput(f"{run.out} holds checkpoints of an earlier run; resume it (the default, --resume "
                                 "auto), pass --output DIR for a new run, or --force to delete them and start "
                                 "over")
        run.lineage = new_lineage()
    else:
        run.resume_path, run.state = Path(resume), load_state(resume)
        theirs = lineage_of(run.state)
        newest = manifest is not None and manifest.get("file") and (folder / manifest["file"]).resolve() == \
            run.resume_path.resolve() and lineage_of(manifest)["run_id"] == theirs["run_id"]
        # Continuing from the newest checkpoint of this directory's lineage is a plain resume; any other start
        # from a file (a rollback, a copy into a new directory) is a new lineage that remembers its parent.
        run.lineage = lineage_of(manifest) if newest else new_lineage(
            {"run_id": theirs["run_id"], "step": run.state["global_step"]})
    try:
        check_resumable(run, recipe, inputs, allow_recipe_change)
        if run.state is None and (resume == "never" or manifest is None
                                  or lineage_of(manifest)["run_id"] == run.lineage["run_id"]):
            check_replaceable(run.out, force)  # a fresh start over this lineage's own results
    except BaseException:
        if staged is not None:
            staged[0].unlink(missing_ok=True)
        raise
    check_stop(control, "writing the run directory")
    write_start(run, manifest, damaged, staged, remote, resume, force, recipe, inputs, say)


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
        raise UserError(f"{inputs.data_dir}: its {len(inputs.classes)} classes differ from the "
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


def write_start(run: Run, manifest: dict | None, damaged: bool, staged, remote: dict | None, resume: str, force: bool,
            recipe: Recipe, inputs: Inputs, say) -> None:
    """The first writes, once everything is checked: the run directory, the lineage, the fetched checkpoint."""
    folder, cc = run.folder, recipe.checkpoint
    if resume == "never" and force and not damaged:
        for path in folder.glob("ckpt-*.pt"):  # what --force promises; set-aside lineages stay
            path.unlink()
    current = lineage_of(manifest)
    if folder.is_dir() and (damaged or (current is not None and current["run_id"] != run.lineage["run_id"])):
        start_lineage(folder, run.lineage)  # an abandoned lineage's files are set aside, and listed
    if run.state is None or resume == "never":
        clear_run_dir(run.out)
    if staged is not None:
        install_staged(inputs.store, folder, staged, remote, cc.keep_last)
        pull_files(inputs.store, run.out, replace=True)  # the remote is ahead: so are its records
    elif run.state is not None and lineage_of(run.state)["run_id"] != run.lineage["run_id"]:
        # A new lineage from a checkpoint: its first checkpoint is that state, under the new id, so that a stop
        # before its first save resumes from the same point instead of from step 0.
        state = {**run.state, "lineage": run.lineage}
        entry = save_atomic(state, folder / checkpoint_name(state["global_step"]))
        commit(folder, entry, None, cc.keep_last, cc.keep_best, run.lineage)
        run.state, run.resume_path = state, folder / entry["file"]
    remove_partials(folder)  # leftovers of an interrupted write (the staged download is in place by now)
    if current is None or current["run_id"] != run.lineage["run_id"]:
        parent = run.lineage.get("parent")
        say(f"new lineage {run.lineage['run_id']}" + (f", from step {parent['step']} of lineage {parent['run_id']}"
                                                      if parent else "") + f"; run dir {run.out}")
    if inputs.store is not None:
        claim(inputs.store, run.lineage)  # before the first upload: the remote follows this lineage from now on
    run.out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------
# 3. Build


@dataclass
class Loop:
    """What the epoch loop works with, built once by `build`."""
    recipe: Recipe
    rt: Runtime
    t: Trainer
    inputs: Inputs
    run: Run
    progress: Progress
    runlog: RunLog
    train_sampler: EpochSampler
    val_loader: torch.utils.data.DataLoader
    val_batches: int  # evaluation batches of the longest shard: every rank checks for a stop that often
    loader_args: dict
    say: Callable[[str], None]
    show_bar: bool
    start_epoch: int = 0
    start_batch: int = 0
    train_loader: torch.utils.data.DataLoader | None = None  # made per training resolution, in the epoch loop
    loader_size: int | None = None

    @property
    def epochs(self) -> int:
        """The run's length: train.epochs, or the shorter plan of train.budget_mode: fit (`replan`)."""
        return self.progress.replan["epochs"] if self.progress.replan else self.recipe.train.epochs


def replan(loop: Loop, epochs: int, after_epoch: int) -> None:
    """Shorten the run to `epochs`: timm's scheduler rebuilt for them (budget.py's `fitted`: the decay ends at the
    new last epoch), the lr set for the step about to run; the resolution ramp follows `loop.epochs` (run_epoch).
    The plan is in every checkpoint from here on (`Progress.replan`), so a resumed run continues it."""
    t = loop.t
    loop.progress.replan = {"planned_epochs": loop.recipe.train.epochs, "epochs": epochs, "after_epoch": after_epoch}
    t.scheduler = build_scheduler(fitted(loop.recipe, epochs)[1], t.optimizer, epochs, loop.inputs.updates_per_epoch)
    t.scheduler.step_update(num_updates=t.global_step)


@dataclass
class Outcome:
    """How the epoch loop ended: at the end, or stopped with a checkpoint at (epoch, batches done)."""
    stopped: bool = False
    at: tuple[int, int] | None = None
    during: str | None = None  # "training" or "evaluation"


def build_loop(recipe: Recipe, rt: Runtime, inputs: Inputs, run: Run, say, quiet: bool) -> Loop:
    """The build phase: samplers and loaders, the trainer, the checkpoint restored, the run's log opened."""
    tc, n = recipe.train, inputs.samples_per_batch
    train_sampler = EpochSampler(len(inputs.train_set), recipe.seed, shuffle=True, rank=rt.rank,
                                 world_size=rt.world_size, aug_repeats=recipe.data.aug_repeats)
    val_sampler = EpochSampler(len(inputs.val_set), recipe.seed, shuffle=False, rank=rt.rank, world_size=rt.world_size)
    loader_args = dict(workers=recipe.data.workers, pin_memory=recipe.data.pin_memory, seed=recipe.seed,
                       stops_to_parent=True)
    val_loader = make_loader(inputs.val_set, val_sampler, tc.batch_size, drop_last=False, **loader_args)
    longest_shard = -(-len(inputs.val_set) // rt.world_size)
    t = build_trainer(recipe, rt, len(inputs.classes), inputs.updates_per_epoch)
    loop = Loop(recipe, rt, t, inputs, run, Progress(), RunLog(run.out, enabled=rt.is_main), train_sampler,
                val_loader, -(-longest_shard // tc.batch_size), loader_args, say,
                show_bar=not quiet and rt.is_main and sys.stderr.isatty())
    state, p = run.state, loop.progress
    if state is not None:
        plan = state.get("replan")  # a schedule train.budget_mode: fit shortened: it goes on as planned
        if plan is not None and plan["planned_epochs"] == tc.epochs:
            replan(loop, plan["epochs"], plan["after_epoch"])  # the scheduler for it, before its state is loaded
        elif plan is not None:
            say(f"the checkpoint's plan, shortened by the budget from {plan['planned_epochs']} to {plan['epochs']} "
                f"epochs, is dropped: train.epochs is now {tc.epochs}")
        # After an allowed recipe change (more epochs, say) the schedule follows the new recipe from here on.
        restore(t, state, scheduler=not run.diff)
        p.history, p.best, p.best_checkpoint = state["metrics"], state["best"], state["best_checkpoint"]
        p.pending_eval, p.elapsed_before = state.get("pending_eval"), state["elapsed_s"]
        loop.start_epoch, loop.start_batch = state["epoch"], state["step_in_epoch"] // n
        if loop.start_batch and train_set_change(state, inputs):  # allowed: the rest of the old order means nothing
            loop.start_epoch, loop.start_batch = loop.start_epoch + 1, 0
            say(f"the train set changed ({train_set_change(state, inputs)}): epoch {loop.start_epoch} ends here; "
                f"training goes on from the first batch of epoch {loop.start_epoch + 1}")
        loop.runlog.resume(t.global_step, p.history)
        say(f"resuming from {run.resume_path}: epoch {loop.start_epoch + 1}, batch {loop.start_batch} of "
            f"{inputs.num_batches}, step {t.global_step}")
    loop.runlog.start(recipe, {"epochs": loop.epochs, "steps_per_epoch": inputs.updates_per_epoch,
                               "global_batch": inputs.global_batch, "world_size": rt.world_size,
                               "train_images": len(inputs.train_set), "device": str(rt.device),
                               "run_id": run.lineage["run_id"], "budget_usd": tc.budget_usd,
                               "budget_mode": tc.budget_mode,
                               **({"planned_epochs": tc.epochs} if p.replan else {})})
    if state is None:
        loop.runlog.sample_images(inputs.train_set)
    n_params = sum(p.numel() for p in t.model.parameters())
    say(f"{recipe.name}: {recipe.model.name} ({n_params / 1e6:.1f}M params), {len(inputs.classes)} classes, "
        f"{len(inputs.train_set)} train / {len(inputs.val_set)} val images from {inputs.data_dir}; {rt.device}, "
        f"amp={str(rt.amp_dtype).replace('torch.', '') if rt.amp_dtype else 'off'}, "
        f"peak lr {scaled_lr(recipe.optim, inputs.global_batch):.4g} at global batch {inputs.global_batch}; "
        f"run dir {run.out}")
    if state is not None:
        rng, note = rank_rng_state(state["rng"], rt.rank, rt.world_size, recipe.seed, state["global_step"])
        if note:
            say(note)
        set_rng_state(rng)  # last, after everything that drew from the RNGs while being built
    return loop


# ---------------------------------------------------------------------------------------------------------
# 4. Services


class Services:
    """The checkpoint writer and the S3 uploader (rank 0 only), the spot watcher (each machine's local rank 0), and
    their bounded drains."""

    def __init__(self, run: Run, recipe: Recipe, rt: Runtime, inputs: Inputs, control: StopControl, runlog):
        cc = recipe.checkpoint
        self.control = control
        self.uploader = self.writer = self.watcher = self.budget = None
        if not rt.is_main:
            # A spot notice reaches only the machine being reclaimed: its local rank 0 watches, and the stop it
            # sets is agreed by every rank at the next step (agreed_stop), so the run stops with one checkpoint.
            if os.environ.get("LOCAL_RANK") == "0":
                self.watcher = start_spot_watcher(control, cc.spot_notice, cc.imds_endpoint, cc.spot_poll_s)
            return
        if inputs.store is not None:
            # A run whose prefix another run took over stops (exit 2): it would train on for nothing, billing,
            # with no copy of its work in S3.
            self.uploader = Uploader(inputs.store, run.out, cc.keep_last, cc.keep_best, run.lineage,
                                     lambda why: control.request_stop(f"{SUPERSEDED_REASON}: {why}"))
            local = read_manifest(run.folder) if run.folder.is_dir() else None
            if local is not None and local.get("file"):
                self.uploader.submit(local)  # a checkpoint written while the store was out of reach goes up now
        self.writer = Writer(run.folder, cc.keep_last, cc.keep_best,
                             self.uploader.submit if self.uploader else None, run.lineage)
        self.watcher = start_spot_watcher(control, cc.spot_notice, cc.imds_endpoint, cc.spot_poll_s)
        if self.watcher is not None:  # on EC2: every metrics line also says what the instance costs
            # Every machine costs what this one does (cost_usd is the run's); LOCAL_WORLD_SIZE is torchrun's.
            machines = rt.world_size // int(os.environ.get("LOCAL_WORLD_SIZE") or rt.world_size)
            runlog.extra = InstanceCost(self.watcher, run.out / "metrics.jsonl", machines=max(1, machines))
            if recipe.train.budget_usd is not None:
                self.budget = Budget(recipe.train.budget_usd, runlog.extra, recipe.train.budget_mode)

    def drain(self, deadline: float) -> list[str]:
        """Wait for the checkpoint on disk, then in S3 until `deadline` (epoch seconds) at most, or the stop's own
        deadline once a stop has been asked for (a signal during the final sync, or a spot notice after a signal,
        only ever shortens the wait); return what did not finish.

        The local write is waited for whatever the deadline: a summary that says the run stopped must never come
        before the stop's checkpoint is on disk (a restart would find a stopped run and nothing to resume), and an
        atomic save to local disk takes seconds at most. The writer's errors (a full disk) are raised."""
        if self.writer is not None:
            self.writer.drain()
        if self.uploader is None:
            return []
        waiting, remote = Waiting(), self.uploader.store.remote
        while True:
            if self.control.stop.is_set():
                deadline = min(deadline, self.control.stop_deadline())
            left = max(0.0, deadline - time.time())
            if self.uploader.drain(min(left, 1.0)) or left <= 1.0:  # a second at a time: the deadline may move
                unfinished = self.uploader.unfinished()
                waiting.end(f"{remote}: " + (f"gave up waiting, unfinished: {', '.join(unfinished)}," if unfinished
                                             else "everything is there"))
                return unfinished
            if time.monotonic() - waiting.started >= 5:  # a wait of a few seconds is said, and how it goes
                what = ", ".join(self.uploader.unfinished()) or "the uploads"
                waiting.note(f"{remote}: waiting up to {left:.0f} s more for {what}; Ctrl-C twice leaves at once, "
                             "with it unfinished", f"{remote}: still waiting for {what}, {left:.0f} s left")

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
# 5. The epoch loop


class Checkpointer:
    """Checkpoint cadence and saving: the snapshot, the writer, when the last save was, and the best checkpoint.

    Saves come at epoch ends (`checkpoint.every_epochs`, the last epoch, a stop), inside an epoch
    (`every_steps`, `every_minutes`, a rebalance recommendation) and at a stop. Only rank 0 has a writer; the
    other ranks keep the cadence's bookkeeping and write nothing.
    """

    def __init__(self, loop: Loop, services: Services, control: StopControl):
        self.loop, self.services, self.control = loop, services, control
        self.writer = services.writer
        self.last_save = time.monotonic()
        # The names a save must not take: those the manifest lists (with their sha256, here and in S3) and any
        # file on disk. A save at a step already saved (a resume of a run stopped during evaluation) gets one of
        # its own, never replacing a listed file in place.
        folder = loop.run.folder
        listed = read_manifest(folder) if self.writer is not None and folder.is_dir() else None
        self.taken = {e["file"] for e in (listed or {}).get("checkpoints", [])} | \
            ({p.name for p in folder.glob("ckpt-*.pt")} if folder.is_dir() else set())

    def save(self, epoch: int, batches_done: int, pending_eval: dict | None = None, is_best: bool = False) -> None:
        """Snapshot the state into CPU memory now (the epoch to run next and the batches of it done); the writer
        thread puts it on disk. A best epoch's snapshot is never superseded in the writer's queue."""
        loop, p, t, rt = self.loop, self.loop.progress, self.loop.t, self.loop.rt
        self.last_save = time.monotonic()
        name = free_name(t.global_step, self.taken)
        self.taken.add(name)
        if is_best:
            p.best_checkpoint = {**p.best, "file": name}
        # Every rank takes part: its RNG state and its own BN statistics go into the checkpoint, and under DDP
        # without SyncBN the saved statistics are the mean over ranks (timm's distribute_bn), while each rank's
        # own are put back, so that a save leaves the run exactly as an unsaved one goes on.
        modules = [t.model] + ([t.ema.module] if t.ema is not None else [])
        reduce = rt.distributed and not loop.recipe.train.sync_bn
        own = [norm_buffers(m) for m in modules] if reduce else None
        ranks = rt.gather({"rng": rng_state(), "norm_buffers": own})
        for module in modules if reduce else []:
            distribute_bn(module, rt.world_size, reduce=True)
        if self.writer is not None:
            state = snapshot(t, epoch, batches_done * loop.inputs.samples_per_batch, p, loop.inputs.classes,
                             loop.run.lineage, pending_eval, ranks, loop.inputs.train_set.fingerprint())
            self.writer.submit({**state, "is_best": is_best, "file": name})
        for module, buffers in zip(modules, own or []):
            load_norm_buffers(module, buffers)

    def after_step(self, epoch: int, batches_done: int) -> None:
        """After every optimizer step: a failed write stops the run at once; a mid-epoch save when one is due."""
        if self.writer is not None and self.writer.error is not None:
            self.writer.raise_error()
        cc = self.loop.recipe.checkpoint
        timed = bool((cc.every_minutes and time.monotonic() - self.last_save >= cc.every_minutes * 60)
                     or self.control.checkpoint_now.is_set())
        rt, step = self.loop.rt, self.loop.t.global_step
        if rt.distributed:
            # A save is a collective (every rank's RNG state is gathered), so the clock's and the rebalance
            # notice's saves are agreed at the stop-agreement cadence, when every rank is at the same step.
            timed = step % self.loop.recipe.train.stop_sync_every == 0 and rt.all_reduce(
                torch.tensor(float(timed), device=rt.device), op="max").item() > 0
        due = (cc.every_steps and step % cc.every_steps == 0) or timed
        # A single process skips a save that its stop's own save follows at once; under DDP the stop is not agreed
        # yet at this point, and every rank must join the same saves.
        if due and batches_done < self.loop.inputs.num_batches and (rt.distributed or not self.control.stop.is_set()):
            self.control.checkpoint_now.clear()
            self.save(epoch, batches_done)

    def save_and_wait(self, epoch: int, batches_done: int) -> list[str]:
        """A checkpoint before the run ends on an error it cannot train past (an unreadable image)."""
        self.save(epoch, batches_done)
        return self.services.drain(time.time() + self.loop.recipe.checkpoint.stop_timeout_s)


def run_epochs(loop: Loop, checkpointer: Checkpointer, control: StopControl) -> Outcome:
    """The epoch loop. A stop during training ends it with a checkpoint at the step boundary; a stop during
    evaluation with the epoch-end state and the epoch's record, which the resumed run evaluates first."""
    pending, loop.progress.pending_eval = loop.progress.pending_eval, None
    if pending is not None:
        loop.say(f"evaluating epoch {pending['epoch'] + 1} first: a stop interrupted its evaluation")
        stopped = end_epoch(loop, checkpointer, pending, control)
        if stopped is not None:
            return stopped
    epoch = loop.start_epoch
    while epoch < loop.epochs:  # the budget may shorten the run at an epoch end
        first_batch = loop.start_batch if epoch == loop.start_epoch else 0
        record = run_epoch(loop, checkpointer, epoch, first_batch, control)
        if isinstance(record, Outcome):
            return record
        stopped = end_epoch(loop, checkpointer, record, control)
        if stopped is not None:
            return stopped
        epoch += 1
    return Outcome()


def run_epoch(loop: Loop, checkpointer: Checkpointer, epoch: int, first_batch: int,
                control: StopControl) -> dict | Outcome:
    """Train one epoch from `first_batch`; its record, or the Outcome of a stop (checkpoint submitted)."""
    recipe, rt, t, inputs, tc = loop.recipe, loop.rt, loop.t, loop.inputs, loop.recipe.train
    size = train_size_at(fitted(recipe, loop.epochs)[0], epoch)  # the ramp, compressed with a shortened plan
    if size != loop.loader_size:
        # Progressive resizing: new workers with the new crop size. This happens once per distinct size,
        # so restarting the persistent workers costs seconds in a run of hours.
        inputs.train_set.transform = train_transform(recipe.augment, size)
        close_loader(loop.train_loader)
        loop.train_loader = make_loader(inputs.train_set, loop.train_sampler, tc.batch_size, drop_last=True,
                                        **loop.loader_args)
        if loop.loader_size is not None:
            loop.say(f"epoch {epoch + 1}: training resolution {loop.loader_size} -> {size} px")
        loop.loader_size = size
    loop.train_sampler.set_epoch(epoch, first_batch * inputs.samples_per_batch)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    epoch_start = time.time()
    with tqdm(total=inputs.num_batches, initial=first_batch, desc=f"epoch {epoch + 1}/{loop.epochs}",
              disable=not loop.show_bar, leave=False, dynamic_ncols=True) as bar:
        def log_step(record):
            loop.runlog.log(record)
            if not loop.show_bar:
                loop.say(f"epoch {epoch + 1} step {record['step']}/{inputs.updates_per_epoch} loss "
                         f"{record['loss']:.4f} lr {record['lr']:.4g} {record['img_per_s']:.0f} img/s "
                         f"data-wait {record['data_wait']:.0%}")
        try:
            stats = train_steps(t, loop.train_loader, epoch, inputs.num_batches, log_step,
                                    bar if loop.show_bar else None, control, first_batch,
                                    lambda done: checkpointer.after_step(epoch, done))
        except UnreadableImage as e:  # bad input met mid-run: keep the work done so far, then say what is wrong
            done = getattr(e, "batches_done", None)
            # Under DDP only this rank met the image, and a save is a collective that needs every rank.
            if done is not None and done > first_batch and done % tc.accum_steps == 0 and not rt.distributed:
                left = checkpointer.save_and_wait(epoch, done)
                log.error("checkpoint at step %d %s before stopping on an unreadable image", t.global_step,
                          "written" if not left else f"not complete ({', '.join(left)})")
            raise
    if stats["stopped"]:
        checkpointer.save(epoch, stats["batches"])
        return Outcome(True, (epoch, stats["batches"]), "training")
    return {"kind": "epoch", "epoch": epoch, "global_step": t.global_step, "train_loss": stats["train_loss"],
            "lr": t.optimizer.param_groups[0]["lr"], "train_size": stats["input_size"],
            "epoch_time_s": time.time() - epoch_start}


def end_epoch(loop: Loop, checkpointer: Checkpointer, record: dict, control: StopControl) -> Outcome | None:
    """Evaluate (when due), log, and checkpoint an epoch's end. The stop is agreed once here (one collective
    under DDP), so that a stop arriving at any point of the epoch end is either seen or left to the next step."""
    recipe, rt, p, epoch = loop.recipe, loop.rt, loop.progress, record["epoch"]
    last_epoch = epoch + 1 == loop.epochs
    eval_start = time.time()
    if (epoch + 1) % recipe.train.eval_every == 0 or last_epoch:
        scores = evaluate_epoch(loop, control)
        if scores is None:  # evaluation changes no training state: the epoch-end state is the checkpoint
            checkpointer.save(epoch + 1, 0, pending_eval=record)
            return Outcome(True, (epoch + 1, 0), "evaluation")
        record.update(scores)
        score = max(record["top1"], record.get("ema_top1", -1.0))
        if p.best is None or score > p.best["top1"]:
            p.best = {"top1": score, "epoch": epoch, "weights": "ema" if score != record["top1"] else "raw"}
    record.update(epoch_time_s=record["epoch_time_s"] + time.time() - eval_start, bad_images=len(loop.t.bad_images),
                  peak_gpu_mem_gb=(torch.cuda.max_memory_allocated(rt.device) / 2**30
                                   if rt.device.type == "cuda" else None))
    loop.runlog.log(record)
    p.history.append(record)
    loop.runlog.plot()
    loop.say(_epoch_line(record, loop.epochs))
    epochs, said = loop.epochs, None
    if checkpointer.services.budget is not None:  # on EC2 with train.budget_usd: rank 0 asks, the ranks agree below
        epochs, said = checkpointer.services.budget.check(control, epoch + 1, loop.epochs)
    if rt.distributed and recipe.train.budget_usd is not None and recipe.train.budget_mode == "fit":
        epochs = rt.broadcast(epochs)  # rank 0's plan, on every rank
    replanned = epochs != loop.epochs
    if replanned:
        loop.say(said or f"{BUDGET_REASON}: the schedule now ends at epoch {epochs} instead of {loop.epochs}")
        replan(loop, epochs, epoch + 1)
        loop.runlog.log({"kind": "replan", "epoch": epoch, "global_step": loop.t.global_step, "epochs": epochs,
                         "planned_epochs": recipe.train.epochs})
    stop = agreed_stop(rt, control)
    # A new plan is saved at once: a restart from an older checkpoint would have to decide it again.
    if (epoch + 1) % recipe.checkpoint.every_epochs == 0 or last_epoch or stop or replanned:
        checkpointer.save(epoch + 1, 0, is_best=p.best is not None and p.best["epoch"] == epoch)
    if stop and not last_epoch:  # a stop after the last epoch changes nothing: the run finishes
        return Outcome(True, (epoch + 1, 0), "training")
    return None


def evaluate_epoch(loop: Loop, control: StopControl) -> dict | None:
    """Raw and EMA top-1/top-5 on val; None when a stop cut the evaluation short."""
    t, flip = loop.t, loop.recipe.augment.eval_flip
    if loop.rt.distributed and not loop.recipe.train.sync_bn:
        # Without SyncBN each rank's running statistics drift apart: average them (timm's --dist-bn reduce), so
        # that every shard is evaluated with one model.
        distribute_bn(t.model, loop.rt.world_size, reduce=True)
        if t.ema is not None:
            distribute_bn(t.ema.module, loop.rt.world_size, reduce=True)
    raw = evaluate(t.model, loop.val_loader, t.to_input, loop.rt, flip, control, loop.val_batches)
    if raw is None:
        return None
    scores = {"top1": raw["top1"], "top5": raw["top5"], "val_loss": raw["loss"]}
    if t.ema is not None:
        ema = evaluate(t.ema.module, loop.val_loader, t.to_input, loop.rt, flip, control, loop.val_batches)
        if ema is None:
            return None
        scores.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    return scores


# ---------------------------------------------------------------------------------------------------------
# 6. Stop and drain


def stop_and_drain(loop: Loop, services: Services, outcome: Outcome, control: StopControl) -> list[str]:
    """After a stop: wait for its checkpoint on disk, then in S3 until the stop's deadline at most (fixed when the
    stop was asked for: `checkpoint.stop_timeout_s` from then, or the spot notice's if earlier); return what did
    not finish."""
    if not outcome.stopped:
        return []
    cc = loop.recipe.checkpoint
    started = time.time()
    deadline = control.stop_deadline()  # fixed when the stop was asked for: finish's sync shares it
    unfinished = services.drain(deadline)
    where = f"written and uploaded to {cc.remote}" if services.uploader is not None and not unfinished else "written"
    loop.say(f"stopped ({control.reason}): checkpoint at step {loop.t.global_step} {where} in "
             f"{time.time() - started:.1f} s of the {max(0.0, deadline - started):.0f} s left before the deadline"
             + (f"; not finished by then: {', '.join(unfinished)}" if unfinished else "")
             + (f"; the resumed run evaluates epoch {outcome.at[0]} first" if outcome.during == "evaluation" else ""))
    return unfinished


# ---------------------------------------------------------------------------------------------------------
# 7. Finish


def finish(loop: Loop, services: Services, outcome: Outcome, unfinished: list[str], control: StopControl) -> dict:
    """The end, in this order: the summary; metrics and checkpoints synced to S3; then export and push, whose
    failure leaves the run complete and synced, is recorded in summary.json and exits 3 (not restarted)."""
    recipe, rt, t, p, cc = loop.recipe, loop.rt, loop.t, loop.progress, loop.recipe.checkpoint
    summary = make_summary(recipe, t, p.history, p.best, p.elapsed(), sum(q.numel() for q in t.model.parameters()),
                           len(loop.inputs.classes), outcome.stopped, rt)
    summary.update(during=outcome.during, run_id=loop.run.lineage["run_id"])
    if outcome.stopped and (control.reason or "").startswith(BUDGET_REASON):
        summary.update(over_budget=True, stop_reason=control.reason)
    if p.replan is not None:  # train.budget_mode: fit shortened the schedule
        summary["replan"] = p.replan
    # A stop has one deadline for all of it; otherwise the final sync has its own, cut short by a stop during it.
    deadline = control.stop_deadline() if control.stop.is_set() else time.time() + cc.upload_timeout_s
    publish = recipe.export.enabled and rt.is_main and not outcome.stopped
    if publish and control.stop.is_set():  # trained to the end, but the machine is going: the restart exports
        summary.update(stopped=True, during="finish")
        publish = False
    unfinished = unfinished + (services.drain(deadline) if not outcome.stopped else [])
    uploader = services.uploader

    def record(left):
        summary["unfinished"] = sorted(set(left))
        summary["failed_uploads"] = list(uploader.failed) if uploader is not None else []
        if uploader is not None and uploader.superseded:
            summary["superseded"] = uploader.superseded
        summary["exit_status"] = exit_status(summary)
        if rt.is_main:
            write_json(loop.run.out / "summary.json", summary)
    record(unfinished)
    unfinished += services.sync(deadline)  # the summary, metrics and curves follow the checkpoints
    if publish:
        summary.update(publish_run(loop, control))
        record(unfinished)
        unfinished += services.sync(deadline)  # the export, and the summary that says how it went
    record(unfinished)
    loop.runlog.summary(summary)
    loop.runlog.close()
    summary["exit_status"] = rt.broadcast(summary["exit_status"])  # every rank waits for rank 0's last sync
    if rt.distributed:
        import torch.distributed as dist
        dist.destroy_process_group()
    if summary["top1"] is not None and not summary["stopped"]:
        loop.say(f"val top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  best top-1 "
                 f"{summary['best_top1']:.4f} (epoch {summary['best_epoch'] + 1}, {summary['best_weights']})  in "
                 f"{summary['wall_time_s']:.0f} s; run dir {loop.run.out}")
    return summary


def publish_run(loop: Loop, control: StopControl) -> dict:
    """Export, then push when export.repo_id is set; an error is reported with the command that retries it.

    The push runs in a thread of its own and is waited for until `export.push_timeout_s`, or until a stop: its HTTP
    client has no timeout, and a stop must end by its deadline. A push given up at a stop is the stop's (75: the
    restart resumes at the end, exports and pushes again); one past its timeout, a failed push (3). A push given up
    may still land: the thread ends with the process, and the next push of the same files changes nothing."""
    ec, out = loop.recipe.export, loop.run.out
    try:
        exported = export(out, out / "export", ec.weights, ec.label_names, ec.repo_id, ec.license, ec.dataset)
    except Exception as e:  # the run is done and synced; a failed export must not make it look unfinished
        log.error("export failed (%s: %s); the run is complete and synced. Retry with: resnet50-recipe export %s "
                  "%s", type(e).__name__, e, out, out / "export")
        return {"export_error": f"{type(e).__name__}: {e}"}
    loop.say(f"exported {exported} (timm.create_model('local-dir:{exported}', pretrained=True))")
    if not ec.repo_id:
        return {}
    done: dict = {}

    def push_it():
        try:
            done["url"] = push(exported, ec.repo_id, private=ec.private)
        except Exception as e:  # reported below, by the thread that waits
            done["error"] = e

    worker = threading.Thread(target=push_it, name="push", daemon=True)
    worker.start()
    give_up = time.monotonic() + ec.push_timeout_s
    while worker.is_alive() and not control.stop.is_set() and time.monotonic() < give_up:
        worker.join(0.2)
    if worker.is_alive() and control.stop.is_set():
        log.warning("stopped during the push to %s (%s); the restart pushes again", ec.repo_id, control.reason)
        return {"stopped": True, "during": "push"}
    if worker.is_alive():
        done["error"] = TimeoutError(f"the Hub had not taken the push after export.push_timeout_s "
                                     f"({ec.push_timeout_s:.0f} s)")
    if "error" in done:
        e = done["error"]
        log.error("push to %s failed (%s: %s); the run is complete, synced and exported. Retry with: "
                  "resnet50-recipe push %s --repo-id %s%s", ec.repo_id, type(e).__name__, e, exported, ec.repo_id,
                  " --private" if ec.private else "")
        return {"push_error": f"{type(e).__name__}: {e}"}
    loop.say(f"pushed to {done['url']}")
    return {"pushed": ec.repo_id}


def make_summary(recipe: Recipe, t: Trainer, history: list[dict], best: dict | None, wall_time_s: float,
                 n_params: int, num_classes: int, stopped: bool, rt: Runtime) -> dict:
    evaluated = [r for r in history if "top1" in r]
    last = evaluated[-1] if evaluated else {}
    return {
        "recipe": recipe.name, "model": recipe.model.name, "epochs": len(history),
        "global_step": t.global_step, "stopped": stopped,
        "top1": last.get("top1"), "top5": last.get("top5"),
        "ema_top1": last.get("ema_top1"), "ema_top5": last.get("ema_top5"),
        "best_top1": best["top1"] if best else None, "best_epoch": best["epoch"] if best else None,
        "best_weights": best["weights"] if best else None,
        "wall_time_s": wall_time_s, "num_params": n_params, "num_classes": num_classes,
        "bad_images": sorted(set(t.bad_images)), "device": str(rt.device),
    }


def _epoch_line(r: dict, epochs: int) -> str:
    line = f"epoch {r['epoch'] + 1}/{epochs}: train loss {r['train_loss']:.4f}"
    if "top1" in r:
        line += f", val top-1 {r['top1']:.4f} top-5 {r['top5']:.4f}"
    if "ema_top1" in r:
        line += f", EMA top-1 {r['ema_top1']:.4f}"
    return line + f" ({r['epoch_time_s']:.1f} s)"


def exit_status(summary: dict) -> int:
    """0 finished; 74 something did not reach disk or S3 in time (a restart retries it); 75 stopped with a
    checkpoint (a restart continues); 3 finished and synced, but the export or push failed; 4 stopped with a
    checkpoint by train.budget_usd (not restarted); 2 another run took the remote over (two runs on one prefix is
    bad input: this one's work is on its own disk only, and a restart would follow the other run)."""
    if summary.get("superseded"):
        return EXIT_BAD_INPUT
    if summary.get("unfinished"):
        return EXIT_INCOMPLETE
    if summary.get("over_budget"):
        return EXIT_BUDGET
    if summary.get("stopped"):
        return EXIT_PREEMPTED
    if summary.get("export_error") or summary.get("push_error"):
        return EXIT_PUBLISH_FAILED
    return EXIT_FINISHED
