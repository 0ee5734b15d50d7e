"""Which resnet50-recipe the instance installs: the same release from PyPI, or a wheel of this one.

Only an exact release installed from an index can be fetched from PyPI by the instance. An editable install, a
local directory or wheel, a VCS checkout, or a version with a local or dev segment is shipped as a wheel through
the run's S3 prefix. Whether PyPI has a given release cannot be checked offline, and a launch must not depend on
PyPI answering: a release installed from an index is taken to be on PyPI (where else did it come from?). A
private index's release is the one case this gets wrong; `--package` overrides the choice.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from resnet50_recipe.errors import MissingInput, UserError
from resnet50_recipe.version import __version__

__all__ = ["DIST", "Package", "choose", "build_wheel"]

DIST = "resnet50-recipe"


@dataclass(frozen=True)
class Package:
    """What the instance installs: a pip `spec` (an index release, or an s3:// wheel), or a local wheel
    (`wheel`, uploaded to the run's prefix) that is built first from `build_from` when that is set."""
    why: str
    spec: str | None = None
    wheel: Path | None = None
    build_from: Path | None = None

    @property
    def wheel_name(self) -> str | None:
        if self.wheel is not None:
            return self.wheel.name
        return f"resnet50_recipe-{__version__}-py3-none-any.whl" if self.build_from else None


def choose(package: str | None) -> Package:
    """The package for `--package` (a pip spec, a local .whl, an s3://...whl), or, without it, for this install."""
    if package:
        if package.endswith(".whl") and not package.startswith("s3://"):
            if not Path(package).is_file():
                raise MissingInput(f"--package {package}: no such wheel")
            return Package("--package: this wheel, through the run's prefix", wheel=Path(package))
        return Package("--package", spec=package)
    source = _source()
    if source is not None:  # an editable install or a source tree on sys.path: the code is a checkout's
        return Package(f"{DIST} {__version__} runs from a checkout (an editable install, not a PyPI "
                       "release): a wheel of it is built (pip wheel) and shipped through the run's prefix",
                       build_from=source)
    # Installed into site-packages: its own metadata there says how (a checkout's egg-info must not answer).
    found = list(importlib.metadata.distributions(name=DIST, path=[str(Path(__file__).resolve().parents[2])]))
    dist = found[0] if found else None
    direct = json.loads(dist.read_text("direct_url.json") or "null") if dist else None
    version = dist.version if dist else __version__
    if dist is not None and direct is None and re.fullmatch(r"\d+(\.\d+)*(\.post\d+)?", version):
        return Package(f"{DIST} {version} was installed from an index: the instance installs the same release "
                       "from PyPI", spec=f"{DIST}[aws]=={version}")
    url = urlparse((direct or {}).get("url", ""))
    where = Path(unquote(url.path)) if url.scheme == "file" else None
    if where is not None and where.is_file() and where.suffix == ".whl":
        return Package(f"{DIST} {version} was installed from the wheel {where.name}: that wheel is shipped",
                       wheel=where)
    if where is None or not (where / "pyproject.toml").is_file():
        raise UserError(f"{DIST} {version} is not a PyPI release and its source was not found to build a wheel "
                        "from: pass --package (a .whl, an s3://...whl or a pip spec)")
    return Package(f"{DIST} {version} was installed from {where} (not a PyPI release): a wheel of it is built "
                   "(pip wheel) and shipped through the run's prefix", build_from=where)


def _source() -> Path | None:
    """The checkout this module runs from, when it is one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def build_wheel(source: Path, into: Path | None = None) -> Path:
    """`pip wheel --no-deps` of `source`; the wheel's path. Without build isolation when setuptools is here
    already (a checkout installed for development has it), so that a launch needs no index to build."""
    into = Path(into or tempfile.mkdtemp(prefix="resnet50-recipe-wheel-"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(into), str(source)]
    if importlib.util.find_spec("setuptools") is not None:
        command.insert(4, "--no-build-isolation")
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("resnet50_recipe-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"pip wheel {source} failed ({done.returncode}): {done.stderr.strip()[-500:]}; build one "
                           "by hand and pass it with --package")
    return wheels[-1]
