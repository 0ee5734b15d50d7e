"""Arguments several commands share: `--set` overrides and their shortcuts, `--endpoint-url`, `--weights`,
`--quiet`."""

from __future__ import annotations

__all__ = ["SHORTCUTS", "add_set", "add_endpoint_url", "add_weights", "add_quiet"]

# Shortcut flags for the settings changed most often (--data, --epochs, ...); each is a `--set` in disguise
# and shows in the resolved recipe.
SHORTCUTS = {"data": "data.path", "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
             "workers": "data.workers", "remote": "checkpoint.remote"}


# Flags several commands share, each defined once.
def add_set(p) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key; the value is parsed as YAML (repeatable)")


def add_endpoint_url(p) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 or AWS)")


def add_weights(p, help: str = "which weights: auto (EMA or raw, whichever scored the better val top-1), ema, "
                "raw, or best (the run's best checkpoint)") -> None:
    p.add_argument("--weights", choices=("auto", "ema", "raw", "best"), default="auto", help=help)


def add_quiet(p, help: str) -> None:
    p.add_argument("--quiet", action="store_true", help=help)
