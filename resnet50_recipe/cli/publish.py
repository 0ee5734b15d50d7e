"""`export` and `push`: parsing and dispatch."""

from __future__ import annotations

from resnet50_recipe.cli.common import add_weights
from resnet50_recipe.errors import EXIT_FINISHED

__all__ = ["add_export", "cmd_export", "add_push", "cmd_push"]


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's weights in timm's Hugging Face Hub format")
    p.add_argument("source", help="run directory or checkpoint file")
    p.add_argument("out", help="folder to write model.safetensors, config.json, README.md, curves.png")
    add_weights(p, "auto (default): EMA or raw, whichever scored the better val top-1; best: the run's best "
                   "checkpoint")
    p.add_argument("--label-names", help="file with one class name per line, in class-index order")
    p.add_argument("--repo-id", help="the Hub repo the model card's loading snippet names")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--dataset", help="Hub dataset id for the model card, e.g. imagenet-1k")


def cmd_export(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.publish.export import export

    out = export(args.source, args.out, args.weights, args.label_names, args.repo_id, args.license, args.dataset)
    print(f"wrote {out}; it loads with timm.create_model('local-dir:{out}', pretrained=True)")
    return EXIT_FINISHED


def add_push(sub) -> None:
    p = sub.add_parser("push", help="push an export folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True, help="user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (created when missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message")


def cmd_push(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.publish.push import push

    url = push(args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
               commit_message=args.commit_message)
    print(f"pushed {args.folder} to {url}")
    return EXIT_FINISHED
