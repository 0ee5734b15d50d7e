"""`sky`: a SkyPilot managed job for several spot machines, regions or clouds: parsing and dispatch."""

from __future__ import annotations

from pathlib import Path

from resnet50_recipe.cli.common import add_set
from resnet50_recipe.errors import EXIT_FINISHED

__all__ = ["add_sky", "cmd_sky"]


def add_sky(sub) -> None:
    p = sub.add_parser("sky", help="write (or, with --launch, submit) a SkyPilot managed job that trains a recipe on "
                       "spot machines in any region or cloud (--launch needs the [sky] extra)",
                       description="A SkyPilot task YAML for a managed job: spot machines across regions and clouds, "
                       "relaunched after a preemption, the run resuming from S3. See docs/distributed.md.")
    p.add_argument("recipe", help="recipe file or shipped name; resolved and checked here, carried to the machines")
    p.add_argument("--bucket", required=True, metavar="s3://BUCKET/PREFIX",
                   help="where runs live; this one goes to PREFIX/NAME")
    p.add_argument("--name", help="run and job name (default: the recipe's name)")
    add_set(p)
    p.add_argument("--nodes", type=int, default=1, help="machines, each training one process per GPU (default 1)")
    p.add_argument("--gpus", default="T4:1", metavar="NAME:COUNT[,...]", help="accelerators per machine, SkyPilot's "
                   "names; several are candidates, ranked by estimated cost to finish, all with one COUNT (a "
                   "recovery keeps the global batch) (default T4:1)")
    p.add_argument("--clouds", default="aws", metavar="CLOUD[,...]", help="SkyPilot's cloud names (default aws; "
                   "machines elsewhere get AWS keys for S3 as secrets)")
    p.add_argument("--regions", default="", metavar="REGION[,...]", help="regions to try, CLOUD:REGION with "
                   "several clouds (default: any)")
    p.add_argument("--data", metavar="s3://...", help="dataset: a folder with train/ and val/, or a .tar or .tar.gz "
                   "of one; copied to each machine's disk once")
    p.add_argument("--budget-usd", type=float, help="refuse when the estimate passes it; on AWS the run also stops "
                   "(exit 4) before it would (train.budget_usd); elsewhere this says it cannot")
    p.add_argument("--push", metavar="USER/NAME", help="push the weights to this Hugging Face repository; the token "
                   "(HF_TOKEN or your login) goes as a SkyPilot secret, never into the YAML")
    p.add_argument("--private", action="store_true", help="with --push: a private repository")
    p.add_argument("--package", help="what the machines pip-install: a pip spec, a local .whl or an s3://...whl "
                   "(default: a wheel of this install, as aws launch ships)")
    p.add_argument("--disk-gb", type=int, help="disk per machine in GB (default: 300 for ImageNet from S3, else 150)")
    p.add_argument("--region", default="us-east-1", help="the AWS region the machines' AWS CLI starts from "
                   "(default us-east-1; S3 finds the bucket's own)")
    p.add_argument("--out", metavar="FILE", help="write the YAML here (the launch files beside it, in FILE.files/) "
                   "instead of to standard output")
    p.add_argument("--launch", action="store_true", help="submit the job through SkyPilot's Python API "
                   "(sky.jobs.launch) instead of only writing it")


def cmd_sky(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.cloud.sky_job import launch_job, sky_job, to_text

    files = Path(f"{args.out}.files") if args.out else None
    task, notes = sky_job(args.recipe, args.bucket, name=args.name, overrides=args.overrides, nodes=args.nodes,
                          gpus=args.gpus, clouds=args.clouds, regions=args.regions, data=args.data,
                          package=args.package, disk_gb=args.disk_gb, budget_usd=args.budget_usd, push=args.push,
                          private=args.private, files=files, region=args.region)
    text = to_text(task, notes)
    if args.out:
        Path(args.out).write_text(text)
        print("\n".join(notes) + f"\nwrote {args.out}: sky jobs launch {args.out}")
    elif not args.launch:
        print(text, end="")
    if args.launch:
        request = launch_job(task, args.push)
        print(f"submitted managed job {task['name']} (SkyPilot request {request}): sky jobs queue, sky jobs logs "
              f"--name {task['name']}, sky jobs cancel --name {task['name']}")
    return EXIT_FINISHED
