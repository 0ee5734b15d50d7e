"""`aws price|launch|status|follow|logs|stop|ls`: parsing and dispatch."""

from __future__ import annotations

import sys

from resnet50_recipe.cli.common import add_set
from resnet50_recipe.ec2 import DEFAULT_PRICE_TYPES, INSTANCE_TYPES, TABLE_TYPES
from resnet50_recipe.errors import EXIT_FAILED, EXIT_FINISHED, UserError

__all__ = ["add_aws", "cmd_aws"]


def add_aws(sub) -> None:
    p = sub.add_parser("aws", help="price, launch, watch and stop spot training runs on AWS (needs boto3: the "
                       "[aws] extra)", description="Spot training runs on AWS. Every client honours "
                       "AWS_ENDPOINT_URL; credentials and region come from boto3's chain. See docs/aws.md.")
    aws_sub = p.add_subparsers(dest="aws_command", required=True)
    q = aws_sub.add_parser("price", help="spot price per AZ and, with --recipe, hours and cost; with --recipes, a "
                           "table of recipes x instance types: hours and dollars to finish, the cheapest marked")
    q.add_argument("--instance-types", help="comma-separated instance types, or all (default: "
                   f"{','.join(DEFAULT_PRICE_TYPES)}; with --recipes {','.join(TABLE_TYPES)})")
    q.add_argument("--recipe", help="recipe file or shipped name to estimate hours and cost for")
    q.add_argument("--recipes", nargs="+", metavar="RECIPE", help="recipes for the table: names, files or globs "
                   "over the shipped names (imagenet-fast-*), comma- or space-separated")
    q.add_argument("--budget-usd", type=float, help="with --recipes: mark the estimates within this many dollars")
    q.add_argument("--from-run", action="append", default=[], metavar="RUN", help="with --recipes: a run directory "
                   "or s3://BUCKET/PREFIX/RUN whose measured images/s replaces its GPU's estimate (repeatable)")
    q.add_argument("--dry-run", action="store_true", help="with --recipes: make no AWS call; price at the on-demand "
                   "list prices")
    q.add_argument("--images", type=int, help="train images per epoch (default: known for ImageNet-1k and the "
                   "generated data)")
    add_set(q)
    q = aws_sub.add_parser("launch", help="launch a persistent spot instance that trains a recipe")
    q.add_argument("recipe", help="recipe file or shipped name; resolved and checked here, uploaded to the run")
    q.add_argument("--bucket", required=True, metavar="s3://BUCKET/PREFIX",
                   help="where runs live; this one goes to PREFIX/NAME")
    q.add_argument("--name", help="run name (default: the recipe's name)")
    add_set(q)
    q.add_argument("--instance-type", default="g4dn.2xlarge", metavar="TYPE[,TYPE...]|auto",
                   help="one type, several tried in order, or auto: every type that fits the spot quota, ranked by "
                   "estimated cost to finish (default g4dn.2xlarge)")
    q.add_argument("--budget-usd", type=float, help="refuse when the estimate (aws price's, with the disk) passes "
                   "it; on the instance the run checkpoints and stops (exit 4) before it would (train.budget_usd)")
    q.add_argument("--push", metavar="USER/NAME", help="push the weights to this Hugging Face repository from the "
                   "instance; the token (HF_TOKEN or your login) goes to SSM Parameter Store, never to S3 or the logs")
    q.add_argument("--private", action="store_true", help="with --push: a private repository")
    q.add_argument("--keep-instance", action="store_true", help="at the end power the instance off instead of "
                   "cancelling its spot request and terminating it (it then bills its disk until aws stop)")
    q.add_argument("--abort-incomplete-uploads", action="store_true", help="add a lifecycle rule to the bucket "
                   "that aborts multipart uploads unfinished after a day under the runs' prefix (offered when missing)")
    place = q.add_mutually_exclusive_group()
    place.add_argument("--az", default="auto", help="availability zone; auto (default): the cheapest with capacity")
    place.add_argument("--subnet", help="launch into this subnet (its AZ) instead")
    q.add_argument("--key-name", help="EC2 key pair for SSH (not needed: status and logs work without)")
    q.add_argument("--security-group", dest="security_groups", action="append", default=[], metavar="SG_ID")
    source = q.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="s3://...", help="dataset: a folder with train/ and val/, or a .tar or "
                        ".tar.gz of one; copied to the instance's disk once")
    source.add_argument("--volume", metavar="snap-...", help="dataset: an EBS snapshot whose filesystem holds "
                        "train/ and val/, attached as a volume")
    q.add_argument("--ami", help="AMI id, or the name of an SSM parameter holding one (default: the public "
                   "parameter of the current AWS Deep Learning Base AMI, Ubuntu 22.04)")
    q.add_argument("--package", help="what the instance pip-installs: a pip spec, a local .whl (uploaded to the "
                   "run) or an s3://...whl (default: a wheel of this install, packed from an index release's "
                   "installed files or built from a checkout, shipped through the run's prefix)")
    q.add_argument("--disk-gb", type=int, help="root volume size in GB; data copied from S3 and checkpoints live "
                   "there (default: 300 for ImageNet from S3, else 150)")
    q.add_argument("--dry-run", action="store_true", help="print every AWS call with its arguments; make none")
    for command, text in (("status", "instance, spot request, last checkpoint, metrics, cost so far, ETA"),
                          ("logs", "the instance's console output: setup and training log"),
                          ("stop", "cancel the persistent spot request and terminate the instance; S3 stays")):
        q = aws_sub.add_parser(command, help=text)
        q.add_argument("run", help="run name")
    for q in (aws_sub.choices["launch"], aws_sub.choices["status"]):
        q.add_argument("--follow", action="store_true", help="redraw the status, as watch does, until the run ends; "
                       "then print where the weights are (S3, Hub)")
        q.add_argument("--interval", type=float, default=60.0, help="with --follow: seconds between redraws")
    q = aws_sub.add_parser("ls", help="the runs launched by this tool, by tag")
    for q in aws_sub.choices.values():
        q.add_argument("--region", help="AWS region (default: boto3's configured region, else us-east-1)")


def cmd_aws(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.cloud.api import AwsError
    from resnet50_recipe.cloud.cost import match_recipes, price, price_table
    from resnet50_recipe.cloud.instances import follow, logs, ls, print_status, run_status, stop
    from resnet50_recipe.cloud.launch import launch

    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        BotoCoreError = ClientError = AwsError  # noqa: N806  boto3 missing: _boto3() says how to fix it
    try:
        if args.aws_command == "price":
            # lazy: only the command that runs pays for importing torch, timm or boto3
            from resnet50_recipe.recipe import load_recipe
            if args.recipes:
                types = _types(args.instance_types, TABLE_TYPES)
                recipes = [load_recipe(name, args.overrides) for name in match_recipes(args.recipes)]
                price_table(recipes, types, args.region, args.budget_usd, tuple(args.from_run), args.dry_run)
            else:
                if args.budget_usd is not None or args.from_run or args.dry_run:
                    raise UserError("--budget-usd, --from-run and --dry-run go with --recipes (the table)")
                recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
                price(_types(args.instance_types, DEFAULT_PRICE_TYPES), args.region, recipe, args.images)
        elif args.aws_command == "launch":
            launched = launch(args.recipe, args.bucket, name=args.name, overrides=args.overrides,
                              instance_type=args.instance_type, region=args.region, az=args.az, subnet=args.subnet,
                              key_name=args.key_name, security_groups=args.security_groups, data=args.data,
                              volume=args.volume, ami=args.ami, package=args.package, disk_gb=args.disk_gb,
                              budget_usd=args.budget_usd, push=args.push, private=args.private,
                              keep_instance=args.keep_instance,
                              abort_incomplete_uploads=args.abort_incomplete_uploads, dry_run=args.dry_run)
            if args.follow and not args.dry_run:
                follow(args.name or launched["run"], args.region, args.interval)
        elif args.aws_command == "status" and args.follow:
            follow(args.run, args.region, args.interval)
        elif args.aws_command == "status":
            print_status(run_status(args.run, args.region))
        elif args.aws_command == "logs":
            print(logs(args.run, args.region))
        elif args.aws_command == "stop":
            stop(args.run, args.region)
        else:
            ls(args.region)
    except (AwsError, ClientError, BotoCoreError) as e:
        # AWS refused, or would: one line, exit 1 (2 stays for bad input, raised as UserError above).
        print(f"resnet50-recipe: aws {args.aws_command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FINISHED


def _types(option: str | None, default: tuple[str, ...]) -> list[str]:
    if option == "all":
        return list(INSTANCE_TYPES)
    return [t.strip() for t in option.split(",") if t.strip()] if option else list(default)
