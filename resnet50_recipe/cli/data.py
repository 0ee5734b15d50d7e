"""`data synthetic|imagenette|imagenet|verify|resize`: parsing and dispatch."""

from __future__ import annotations

import signal
from pathlib import Path

from resnet50_recipe.cli.common import add_endpoint_url, add_quiet
from resnet50_recipe.errors import EXIT_FAILED, EXIT_FINISHED, UserError

__all__ = ["add_data", "cmd_data"]


def add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("synthetic", help="write a learnable, generated JPEG ImageFolder")
    q.add_argument("out")
    q.add_argument("--classes", type=int, default=10)
    q.add_argument("--per-class", type=int, default=300, help="train images per class")
    q.add_argument("--val-per-class", type=int, default=50)
    q.add_argument("--size", type=int, default=64, help="image side in pixels")
    q.add_argument("--seed", type=int, default=0)
    q = data_sub.add_parser("imagenette", help="download and extract fast.ai's Imagenette into OUT/train and OUT/val",
                            description="Download (resuming a partial download) and checksum-verify an Imagenette "
                            "archive, then extract it into OUT/train and OUT/val.")
    q.add_argument("out")
    q.add_argument("--size", choices=("160", "320", "full"), default="160",
                   help="short side of the images in pixels, or full resolution (default 160)")
    q.add_argument("--url", help="archive URL, for a mirror (default: fast.ai's S3 bucket)")
    q.add_argument("--md5", help="expected MD5 (default: the official archive's, as pinned by torchvision)")
    q.add_argument("--sha256", help="expected SHA-256, instead of the MD5")
    q.add_argument("--no-checksum", action="store_true", help="skip the checksum (a mirror of another file)")
    q.add_argument("--archive-dir", help="where the archive is downloaded and kept (default: OUT's parent)")
    add_quiet(q, "no progress bars")
    q = data_sub.add_parser("imagenet", help="build ImageNet-1k's OUT/train and OUT/val from the official archives, "
                            "Kaggle or the Hugging Face Hub",
                            description="Unpack ImageNet-1k into OUT/train/<wnid> and OUT/val/<wnid> from the official "
                            "ILSVRC2012 archives (val sorted by the devkit's ground truth), Kaggle's ImageNet Object "
                            "Localization Challenge, the Hub's ILSVRC/imagenet-1k archives or timm/imagenet-1k-wds "
                            "shards, optionally resized as it goes; check the counts and verify every image "
                            "(OUT/verify.json). Restartable: a rerun continues where an interrupted run stopped.")
    q.add_argument("out")
    q.add_argument("--train-tar", help="ILSVRC2012_img_train.tar: a path or s3://bucket/key")
    q.add_argument("--val-tar", help="ILSVRC2012_img_val.tar: a path or s3://bucket/key")
    q.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz: a path or s3://bucket/key")
    q.add_argument("--from", dest="source", metavar="DIR|S3_PREFIX|hf:REPO",
                   help="a folder holding the three official archives, Kaggle's download (ILSVRC/ and "
                        "LOC_val_solution.csv), the Hub's train_images_*.tar.gz + val_images.tar.gz or webdataset "
                        "shards; s3://bucket/prefix holding the official archives (streamed, never copied to disk); "
                        "or hf:ILSVRC/imagenet-1k or hf:timm/imagenet-1k-wds, downloaded first")
    q.add_argument("--archive-dir", help="where an hf: source is downloaded and kept (default: OUT's parent/"
                   "owner--name)")
    q.add_argument("--short-side", type=int, help="write each image resized to this short side in pixels (e.g. "
                   "256) instead of its original bytes; smaller images keep theirs")
    q.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images (default 90)")
    q.add_argument("--workers", type=int, help="writing processes (default: one per core with --short-side, "
                   "else one)")
    add_endpoint_url(q)
    q.add_argument("--verify-md5", action="store_true",
                   help="check the archives against the official MD5s first (reads all ~155 GB once more)")
    q.add_argument("--partial", action="store_true",
                   help="accept counts other than 1000 classes, 1,281,167 train and 50,000 val images")
    add_quiet(q, "no progress bars")
    q = data_sub.add_parser("verify", help="decode every image; report corrupt, truncated, CMYK and mislabelled "
                            "files as JSON")
    q.add_argument("dir", help="dataset folder with train/ and/or val/")
    q.add_argument("--fix", action="store_true", help="re-encode CMYK, truncated and non-JPEG .JPEG files in place "
                   "as RGB JPEG (undecodable files are only listed)")
    q.add_argument("--workers", type=int, help="decoding processes (default: one per core but one)")
    q.add_argument("--report", help="where to write the JSON report (default: DIR/verify.json)")
    add_quiet(q, "no progress bars")
    q = data_sub.add_parser("resize", help="write a copy with a smaller short side, which decodes faster")
    q.add_argument("dir")
    q.add_argument("out")
    q.add_argument("--short-side", type=int, default=256, help="pixels (default 256); smaller images are copied")
    q.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images (default 90)")
    q.add_argument("--workers", type=int, help="processes (default: one per core but one)")
    add_quiet(q, "no progress bars")


def cmd_data(args) -> int:
    if args.data_command == "synthetic":
        # lazy: only the command that runs pays for importing torch, timm or boto3
        from resnet50_recipe.data.synthetic import generate

        out = generate(args.out, classes=args.classes, per_class=args.per_class, val_per_class=args.val_per_class,
                       size=args.size, seed=args.seed)
        print(f"wrote {out}: {args.classes} classes, {args.per_class} train + {args.val_per_class} val images each")
        return EXIT_FINISHED
    if args.data_command == "verify":
        # lazy: only the command that runs pays for importing torch, timm or boto3
        from resnet50_recipe.data.images import verify

        result = verify(Path(args.dir), fix=args.fix, workers=args.workers, report=args.report, quiet=args.quiet)
        for split, s in result["splits"].items():
            print(f"{split}: {s['classes']} classes, {s['images']} images")
        for p in result["problems"]:
            fixed = "" if "fixed" not in p else (" (fixed)" if p["fixed"] else " (not fixed)")
            print(f"{p['kind']}: {p['path']}: {p['detail']}{fixed}")
        print(f"wrote {args.report or Path(args.dir) / 'verify.json'}")
        left = [p for p in result["problems"] if not p.get("fixed")]
        return EXIT_FAILED if left or "class_mismatch" in result or "empty_classes" in result else EXIT_FINISHED
    if args.data_command == "resize":
        # lazy: only the command that runs pays for importing torch, timm or boto3
        from resnet50_recipe.data.images import resize

        counts = resize(Path(args.dir), Path(args.out), args.short_side, args.quality, args.workers, args.quiet)
        print(f"wrote {args.out}: " + "; ".join(f"{split}: " + ", ".join(f"{v} {k}" for k, v in c.items())
                                                 for split, c in counts.items()))
        return EXIT_FINISHED
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.data.prepare import prepare_imagenet, prepare_imagenet_from, prepare_imagenette
    from resnet50_recipe.data.sources import IMAGENET_ARCHIVES

    if args.data_command == "imagenette":
        given = [(name, value) for name, value in (("md5", args.md5), ("sha256", args.sha256)) if value]
        if len(given) > 1:
            raise UserError("--md5 and --sha256: give one checksum, not both")
        counts = prepare_imagenette(Path(args.out), args.size, args.url, given[0] if given else None,
                                            verify=not args.no_checksum, archive_dir=args.archive_dir,
                                            quiet=args.quiet)
    else:
        # A SIGTERM (a spot reclaim, `kill`) stops the writers like Ctrl-C: every file is whole or absent, and
        # a rerun of the same command continues.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        written = dict(short_side=args.short_side, quality=args.quality, workers=args.workers, quiet=args.quiet)
        if args.source and not args.source.startswith("s3://") and not (args.train_tar or args.val_tar or args.devkit):
            counts = prepare_imagenet_from(Path(args.out), args.source, partial=args.partial,
                                                   archive_dir=args.archive_dir, verify_md5=args.verify_md5,
                                                   **written)
        else:
            archives = {}
            for kind, flag in (("train", "train_tar"), ("val", "val_tar"), ("devkit", "devkit")):
                given = getattr(args, flag)
                if not given and not args.source:
                    raise UserError(f"data imagenet: say where {IMAGENET_ARCHIVES[kind][0]} is "
                                    f"(--{flag.replace('_', '-')} or --from)")
                archives[kind] = given or f"{args.source.rstrip('/')}/{IMAGENET_ARCHIVES[kind][0]}"
            counts = prepare_imagenet(Path(args.out), archives["train"], archives["val"], archives["devkit"],
                                              verify_md5=args.verify_md5, partial=args.partial,
                                              endpoint_url=args.endpoint_url, **written)
    print(f"wrote {args.out}: " + "; ".join(f"{split}: {c['classes']} classes, {c['images']} images"
                                           for split, c in counts.items()))
    return EXIT_FINISHED
