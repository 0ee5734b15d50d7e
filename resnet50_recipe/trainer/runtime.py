"""Where and how the process runs: device, precision, seeding, determinism, process rank, versions."""

from __future__ import annotations

import io
import json
import os
import platform
import random
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from resnet50_recipe.recipe import CheckpointConfig, ExportConfig, RecipeError, TrainConfig
from resnet50_recipe.version import __version__

__all__ = ["Runtime", "pick_device", "pick_amp_dtype", "wait_timeout_s", "setup", "seed_everything", "versions",
           "git_commit", "write_json"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    rank: int
    world_size: int
    # Under DDP, the gloo group whose collectives wait for rank 0's own long work (`wait_timeout_s`); the training
    # collectives keep torch's default timeout, so that a hung rank is still found in minutes.
    waits: object | None = None
    # Whether every rank runs on rank 0's machine (torchrun's LOCAL_WORLD_SIZE is the world size), and so can open
    # rank 0's run directory; on several machines each has its own, which only rank 0's is the run's.
    one_machine: bool = True

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and logs; other ranks stay quiet."""
        return self.rank == 0

    @property
    def use_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) a tensor over the processes, in place; a no-op in a single process."""
        if self.distributed:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj):
        """Rank 0's object on every rank; a no-op in a single process. For small decisions (the run's opening:
        a path, a lineage, an error; the final status), which pickle, never for tensors. Every such decision is
        rank 0's to make after work of its own (the preflight, a download, the final sync and push), so the other
        ranks wait for it in the `waits` group, whose timeout is the recipe's (`wait_timeout_s`)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.waits)
        return box[0]

    def broadcast_file(self, path: Path | None) -> io.BytesIO | None:
        """Rank 0's file `path` as bytes on every other rank (None on rank 0, which has the file): a checkpoint
        for the ranks on other machines, which cannot open rank 0's run directory. Sent over the `waits` group, a
        gloo group on the CPU even when training uses NCCL."""
        import torch.distributed as dist
        size = self.broadcast(path.stat().st_size if self.is_main else None)
        data = torch.empty(size, dtype=torch.uint8)
        if self.is_main:
            with open(path, "rb") as f:
                f.readinto(data.numpy())
        dist.broadcast(data, src=0, group=self.waits)
        return None if self.is_main else io.BytesIO(data.numpy())

    def gather(self, obj) -> list:
        """Every rank's object, by rank, on every rank; [obj] in a single process. Small per-rank records (RNG
        states, BN statistics) that pickle; never a model."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        box = [None] * self.world_size
        dist.all_gather_object(box, obj)
        return box

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"train.device: {name!r} asked for, but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


def pick_amp_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """fp16 + GradScaler on GPUs without fast bf16 (T4, V100), bf16 on Ampere and later, fp32 on the CPU.

    An explicit `amp_dtype` wins, so bf16 autocast can be asked for on a CPU that has it.
    """
    if not train.amp:
        return None
    if train.amp_dtype != "auto":
        return getattr(torch, train.amp_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return None


def wait_timeout_s(checkpoint: CheckpointConfig, export: ExportConfig) -> float:
    """How long the other ranks wait in a collective while rank 0 works alone, before torch's watchdog ends them
    (and torchrun then rank 0, in the middle of its work): the longest such phase that a deadline of the recipe
    bounds (the start's preflight, `startup_retry_s`; the finish's drain and syncs, `upload_timeout_s`, then the
    push, `export.push_timeout_s`; a stop's drain, `stop_timeout_s`), plus torch's own default of ten minutes for
    the work that has no deadline of its own (a checkpoint's download and its sending to other machines at the
    start, the export at the finish). With the default deadlines: twenty minutes, fifty with a push."""
    finish = checkpoint.upload_timeout_s + (export.push_timeout_s if export.enabled and export.repo_id else 0.0)
    return max(checkpoint.startup_retry_s, finish, checkpoint.stop_timeout_s) + 600.0


def setup(train: TrainConfig, seed: int, wait_s: float = 600.0) -> Runtime:
    """Device, precision, seeds; under torchrun (WORLD_SIZE > 1) also the process group: NCCL on GPUs, gloo
    on CPUs, rendezvous from torchrun's environment, and the gloo group in which the ranks wait `wait_s` seconds
    at most for rank 0's own work (`wait_timeout_s`)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    waits = None
    if world_size > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        waits = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    seed_everything(seed + rank)
    if train.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    # An unknown launcher (no LOCAL_WORLD_SIZE) counts as several machines: sending rank 0's file works on one too.
    one_machine = world_size == 1 or os.environ.get("LOCAL_WORLD_SIZE") == str(world_size)
    return Runtime(device, pick_amp_dtype(train, device), rank, world_size, waits, one_machine)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    """Package, library, CUDA and GPU versions, and the git commit when the code runs from a checkout."""
    import timm
    import torchvision


    info = {
        "resnet50_recipe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": str(torch.__version__),  # a TorchVersion object would need pickle to load
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
    return info


def git_commit() -> str | None:
    """The commit of this package's own checkout; None for an installed copy, even one that happens to sit
    inside some other git repository (a virtualenv in a user's project, say)."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=checkout, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != checkout:
        return None
    return lines[1]


def write_json(path: Path, data) -> None:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
