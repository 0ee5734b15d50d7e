"""`resnet50-recipe sky`: a SkyPilot managed job that trains a recipe on one or several spot machines, in any
region or cloud SkyPilot reaches, written as a task YAML and, with `--launch`, submitted through SkyPilot's Python
API (`sky.jobs.launch`).

SkyPilot provisions the machines, relaunches a preempted job (in another region first: `EAGER_NEXT_REGION`) and
runs its `run` section again; this project keeps what it does already: exact resume from checkpoints verified in
S3, the spot notice, the budget. The job's pieces are aws launch's: the same package (a wheel of this checkout,
cloud/ship.py) and the same setup (cloud/user-data.sh `--setup`: the AWS CLI, the package, the data from S3), both
carried to every machine by SkyPilot's file_mounts; the Hub token goes through SkyPilot's secrets. The task's
fields are SkyPilot's (sky/utils/schemas.py of the version setup.cfg's `sky` extra pins; tests/test_sky.py loads
the YAML with `sky.Task.from_yaml_config`). docs/distributed.md says how to use it.
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import yaml

from resnet50_recipe.cloud import ship
from resnet50_recipe.cloud.cost import finish
from resnet50_recipe.cloud.launch import asset, hub_token, plan_launch, render_user_data
from resnet50_recipe.ec2 import INSTANCE_TYPES
from resnet50_recipe.errors import EXIT_INCOMPLETE, EXIT_PREEMPTED, UserError
from resnet50_recipe.recipe import to_yaml

__all__ = ["LAUNCH_FILES", "ROOT", "RECOVER_ON_EXIT_CODES", "MAX_RESTARTS_ON_ERRORS", "MASTER_PORT", "CONTROLLER",
           "parse_gpus", "candidates", "cost_to_finish", "setup_section", "run_section", "task_config",
           "write_launch_files", "ship_package", "sky_job", "to_text", "launch_job"]

# Where SkyPilot's file_mounts put the launch files (setup.sh, recipe.yaml, the wheel) on every machine, and the
# folder under which setup.sh keeps the package, the data and the run (its RESNET50_RECIPE_ROOT): the home folder,
# since SkyPilot's machines run setup and run as a user without root.
LAUNCH_FILES = "~/resnet50-recipe-launch"
ROOT = "$HOME/resnet50-recipe"

# Exits SkyPilot relaunches the job on without counting them as errors: 75 (stopped with a checkpoint: the spot
# notice, SIGTERM) and 74 (a checkpoint not yet in S3: the restart resumes from the newest one there). Any other
# non-zero exit counts against MAX_RESTARTS_ON_ERRORS: crashes are retried that many times. SkyPilot 0.14 has no
# list of exits never to retry, so 2 (bad input) and 3 (export or push failed) are retried too, as often, at the
# cost of a relaunch each (docs/distributed.md).
RECOVER_ON_EXIT_CODES = [EXIT_PREEMPTED, EXIT_INCOMPLETE]
MAX_RESTARTS_ON_ERRORS = 3

MASTER_PORT = 29400  # torchrun's rendezvous on the first machine (SKYPILOT_NODE_IPS' first line)

# What SkyPilot itself leaves billing: its jobs controller, from sky/jobs/constants.py (CONTROLLER_RESOURCES,
# CONTROLLER_AUTOSTOP) of the pinned version.
CONTROLLER = ("SkyPilot's jobs controller: the first managed job starts a small VM in your cloud account (4+ vCPUs, "
              "50 GB disk) that watches every managed job; it stops itself after 10 idle minutes and then bills its "
              "disk until deleted: `sky status` lists it (sky-jobs-controller-...), `sky down "
              "sky-jobs-controller-...` deletes it")


def parse_gpus(text: str) -> list[tuple[str, int]]:
    """`T4:1,A10G:1` -> [("T4", 1), ("A10G", 1)]: SkyPilot's accelerator names, per machine."""
    found = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"([A-Za-z0-9-]+)(?::([1-9][0-9]*))?", item)
        if not m:
            raise UserError(f"--gpus {text!r}: {item!r} is not NAME or NAME:COUNT (SkyPilot's accelerator names, "
                            "e.g. T4:1, A10G:1, A100:8)")
        found.append((m.group(1), int(m.group(2) or 1)))
    if not found:
        raise UserError(f"--gpus {text!r}: name at least one accelerator, e.g. T4:1")
    counts = sorted({count for _, count in found}, reverse=True)
    if len(counts) > 1:  # train.batch_size is per process: another count is another global batch
        raise UserError(f"--gpus {text}: the candidates have {' and '.join(map(str, counts))} GPUs per machine; a "
                        "recovery onto another count would change the global batch, which a resume refuses (exit 2, "
                        "and the job ends): give every candidate the same count")
    return found


def cost_to_finish(recipe, gpu: str, per_node: int, nodes: int) -> dict | None:
    """Hours and USD to train `recipe` on `nodes` machines of `per_node` `gpu`s: cost.finish's estimate for the EC2
    type with those GPUs that finishes cheapest at its on-demand list price (ec2.INSTANCE_TYPES; spot is usually
    lower), its hours spread over the machines (DDP). None where nothing is known (another GPU, a dataset of
    unknown size). The one place this command asks cost.py."""
    found = [finish(recipe, t, v[3]) for t, v in INSTANCE_TYPES.items() if v[0] == gpu and v[1] == per_node and v[3]]
    found = [f for f in found if f is not None]
    if not found:
        return None
    best = min(found, key=lambda f: f["usd"])
    hours = best["hours"] / nodes
    return {"hours": hours, "usd": hours * best["price_usd_per_h"] * nodes, "instance_type": best["instance_type"],
            "price": best["price_usd_per_h"]}


def candidates(recipe, gpus: list[tuple[str, int]], clouds: list[str], regions: list[str], nodes: int) -> list[dict]:
    """The `any_of` entries: each accelerator on each cloud (and region), cheapest estimated cost to finish first,
    those without an estimate after them in the order given."""
    places = []
    for cloud in clouds:
        mine = [r.split(":", 1)[1] for r in regions if r.startswith(f"{cloud}:")]
        plain = [r for r in regions if ":" not in r]
        if plain and len(clouds) > 1:
            raise UserError(f"--regions {','.join(regions)}: with several clouds name each region's cloud, "
                            "CLOUD:REGION (aws:us-east-1,gcp:us-central1)")
        places += [(cloud, r) for r in (mine + plain or [None])]
    unknown = [r for r in regions if ":" in r and r.split(":", 1)[0] not in clouds]
    if unknown:
        raise UserError(f"--regions: {', '.join(unknown)} name a cloud that --clouds {','.join(clouds)} leaves out")
    entries = []
    for gpu, count in gpus:
        cost = cost_to_finish(recipe, gpu, count, nodes)
        for cloud, region in places:
            entry = {"cloud": cloud, **({"region": region} if region else {}), "accelerators": f"{gpu}:{count}"}
            entries.append((cost["usd"] if cost else float("inf"), len(entries), entry))
    return [entry for _, _, entry in sorted(entries, key=lambda e: e[:2])]


def setup_section() -> str:
    """aws launch's instance setup (user-data.sh --setup), run from the launch files: the AWS CLI, the package, the
    data from S3, under the user's home folder."""
    return (f"cd {LAUNCH_FILES}\n"
            f"RESNET50_RECIPE_ROOT=\"{ROOT}\" bash setup.sh --setup\n")


def run_section() -> str:
    """sky-run.sh: `train --nproc-per-node` on every machine from SkyPilot's variables; its comments say more."""
    return asset("sky-run.sh")


def task_config(plan, nodes: int, gpus: list[tuple[str, int]], clouds: list[str], regions: list[str],
                files: Path) -> dict:
    """The managed job's task, as SkyPilot's YAML has it."""
    secrets = {}
    if plan.push:
        secrets["HF_TOKEN"] = None  # given at launch (sky jobs launch --secret HF_TOKEN), never in the YAML
    if any(c != "aws" for c in clouds):  # the run talks to S3 from another cloud's machines
        secrets.update(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    task = {
        "name": plan.name,
        "num_nodes": nodes,
        "resources": {
            "use_spot": True,
            "disk_size": plan.disk_gb,
            "any_of": candidates(plan.recipe, gpus, clouds, regions, nodes),
            "job_recovery": {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": MAX_RESTARTS_ON_ERRORS,
                             "recover_on_exit_codes": RECOVER_ON_EXIT_CODES},
        },
        "envs": {"RUN": plan.name, "REMOTE": plan.remote, "MASTER_PORT": str(MASTER_PORT)},
        **({"secrets": secrets} if secrets else {}),
        "file_mounts": {LAUNCH_FILES: str(files)},
        "setup": setup_section(),
        "run": run_section(),
    }
    return task


def write_launch_files(plan, files: Path, package: str, region: str) -> None:
    """setup.sh (user-data.sh with its settings), the resolved recipe and, unless --package names a release, the
    wheel, in `files`: what file_mounts copy to every machine."""
    files.mkdir(parents=True, exist_ok=True)
    settings = {"RUN": plan.name, "REMOTE": plan.remote, "REGION": region, "PACKAGE": package, "DATA": plan.data or "",
                "VOLUME": "", "EPOCHS_NOTE": f"{plan.recipe.train.epochs} epochs", "HUB_TOKEN_PARAMETER": "",
                "KEEP_INSTANCE": "", "LAUNCH_FILES": "."}
    (files / "setup.sh").write_text(render_user_data(settings))
    (files / "recipe.yaml").write_text(to_yaml(plan.recipe))


def ship_package(plan, files: Path) -> str:
    """What setup.sh pip-installs: --package's spec, or a wheel of this install put in `files` (relative to them:
    setup runs there)."""
    chosen = plan.package
    if chosen.spec:
        return chosen.spec
    files.mkdir(parents=True, exist_ok=True)
    if chosen.build_from is not None:
        wheel = ship.build_wheel(chosen.build_from, files)
    elif chosen.installed is not None:
        wheel = ship.pack_installed(chosen.installed, files)
    else:
        wheel = files / chosen.wheel.name
        wheel.write_bytes(chosen.wheel.read_bytes())
    return f"./{wheel.name}[aws]"


def sky_job(recipe_source: str, bucket: str, *, name: str | None = None, overrides: list[str] = (), nodes: int = 1,
            gpus: str = "T4:1", clouds: str = "aws", regions: str = "", data: str | None = None,
            package: str | None = None, disk_gb: int | None = None, budget_usd: float | None = None,
            push: str | None = None, private: bool = False, files: Path | None = None,
            region: str = "us-east-1") -> tuple[dict, list[str]]:
    """The managed job's task and the notes that go with it (the estimate, the budget, what SkyPilot leaves
    billing). Bad input fails here, before anything is written."""
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: expected 1 or more machines")
    cloud_list = [c.strip().lower() for c in clouds.split(",") if c.strip()]
    if not cloud_list or not all(re.fullmatch(r"[a-z0-9]+", c) for c in cloud_list):
        raise UserError(f"--clouds {clouds!r}: SkyPilot's cloud names, comma-separated (aws,gcp,azure,...)")
    region_list = [r.strip() for r in regions.split(",") if r.strip()]
    gpu_list = parse_gpus(gpus)
    # train.budget_usd is checked by the trainer against what the instance it runs on costs, which it reads from EC2
    # (trainer/budget.py), times the machines (all of one type): on AWS. Elsewhere this command checks the estimate
    # and says so.
    priced_by_trainer = cloud_list == ["aws"]
    plan = plan_launch(recipe_source, bucket, name, list(overrides), "auto", data, None, package, disk_gb,
                       budget_usd if priced_by_trainer else None, push, private, False)
    if data and not data.startswith("s3://"):
        raise UserError(f"--data {data!r}: the machines copy the dataset from S3: s3://BUCKET/PREFIX/ (a folder with "
                        "train/ and val/, or a .tar/.tar.gz of one)")
    files = Path(files) if files else Path(tempfile.mkdtemp(prefix=f"resnet50-recipe-sky-{plan.name}-"))
    write_launch_files(plan, files, ship_package(plan, files), region)
    task = task_config(plan, nodes, gpu_list, cloud_list, region_list, files)
    why = plan.package.why.replace("through the run's prefix", "with the launch files")
    notes = [f"package: {why}; the launch files are in {files} (file_mounts copies them to every "
             "machine at launch: keep them until the job has started)"]
    first = task["resources"]["any_of"][0]
    gpu, count = first["accelerators"].split(":")
    cost = cost_to_finish(plan.recipe, gpu, int(count), nodes)
    if cost:
        notes.append(f"estimated cost to finish on the first candidate ({nodes} x {gpu}:{count} on {first['cloud']}): "
                     f"~{cost['hours']:.2f} h, ~${cost['usd']:.2f} at the on-demand price of {nodes} x "
                     f"{cost['instance_type']} (${cost['price']:.3f}/h each; spot is usually lower), hours from the "
                     "per-GPU throughput table (aws price)")
    else:
        notes.append(f"no estimate for the first candidate ({gpu}:{count}): no throughput figure or list price for "
                     "that GPU, or the dataset's size is unknown")
    if budget_usd is not None:
        if cost and cost["usd"] > budget_usd:
            raise UserError(f"--budget-usd {budget_usd:g}: the estimate for {plan.recipe.name} on {nodes} x "
                            f"{gpu}:{count} is ~${cost['usd']:.2f}; pass a larger budget, fewer epochs (--set "
                            "train.epochs=N) or other --gpus")
        if priced_by_trainer:
            notes.append(f"--budget-usd {budget_usd:g}: the estimate fits, and the run stops with a checkpoint (exit "
                         f"4, final) before its next epoch would pass it (train.budget_usd, priced on EC2 for "
                         f"{nodes} machine{'s' if nodes > 1 else ''})")
        else:
            notes.append(f"--budget-usd {budget_usd:g}: checked against the estimate only; the trainer prices EC2 "
                         "instances and cannot price another cloud's: watch the cost with `sky jobs queue`")
    notes.append(CONTROLLER)
    return task, notes


class _Dumper(yaml.SafeDumper):
    """setup and run as YAML block scalars (|), readable as the shell they are."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s
                                                             else None))


def to_text(task: dict, notes: list[str]) -> str:
    """The task YAML, the notes as its opening comments."""
    head = "".join(f"# {line}\n" for line in notes)
    return head + yaml.dump(task, Dumper=_Dumper, sort_keys=False, width=120)


def launch_job(task: dict, push: str | None) -> object:
    """Submit the task as a managed job through SkyPilot's Python API; the secrets (the Hub token with --push, AWS
    keys for another cloud's machines, from this environment) go with the request, never into the YAML."""
    try:
        import sky
    except ImportError:
        raise UserError("--launch needs SkyPilot: pip install 'resnet50-recipe[sky]' (or write the YAML and run "
                        "`sky jobs launch` yourself)") from None
    import os

    config = copy.deepcopy(task)
    values = {}
    for key in config.get("secrets") or {}:
        value = hub_token() if key == "HF_TOKEN" else os.environ.get(key)
        if not value:
            raise UserError(f"--launch: secret {key} is not set in this environment; export it, or write the YAML "
                            f"and run `sky jobs launch --secret {key}=...`")
        values[key] = value
    config.pop("secrets", None)
    parsed = sky.Task.from_yaml_config(config)
    if values:
        parsed.update_secrets(values)
    return sky.jobs.launch(parsed, name=task["name"])
