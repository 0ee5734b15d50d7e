"""Which resnet50-recipe the instance installs: a wheel of the one that launches it, shipped through the run's S3
prefix, or what `--package` names.

An editable install or a source tree is built into a wheel (pip wheel); an install from a wheel file ships that
file; a release installed from an index is packed back into a wheel from its installed files (`pack_installed`).
pip records no index URL for what it installs, so a release from a private index cannot be told from a PyPI
one: were the instance to `pip install resnet50-recipe==X` from the public index, a same-named public package
would run there with the run role and the Hub token. The instance gets the very files that run here instead;
`--package 'resnet50-recipe[aws]==X'` installs from the instance's index when that is what you want.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from resnet50_recipe.errors import MissingInput, UserError
from resnet50_recipe.version import __version__

__all__ = ["DIST", "Package", "choose", "build_wheel", "pack_installed"]

DIST = "resnet50-recipe"


@dataclass(frozen=True)
class Package:
    """What the instance installs: a pip `spec` (--package: a release, or an s3:// wheel), or a local wheel
    (`wheel`, uploaded to the run's prefix) that is built first from `build_from`, or packed first from the
    installed release whose .dist-info folder is `installed`, when one of those is set."""
    why: str
    spec: str | None = None
    wheel: Path | None = None
    build_from: Path | None = None
    installed: Path | None = None

    @property
    def wheel_name(self) -> str | None:
        if self.wheel is not None:
            return self.wheel.name
        if self.installed is not None:
            return _wheel_name(self.installed)
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
    if dist is not None and direct is None:
        metadata = next(f for f in dist.files if f.name == "METADATA" and f.parts[0].endswith(".dist-info"))
        return Package(f"{DIST} {version} was installed from an index, which pip does not record: a wheel of the "
                       "installed files is shipped through the run's prefix (--package "
                       f"'{DIST}[aws]=={version}' installs it from the instance's index instead)",
                       installed=Path(dist.locate_file(metadata)).parent)
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


# What pip adds to a .dist-info folder when it installs a wheel: not the release's files.
_ADDED_BY_PIP = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}


def _wheel_name(dist_info: Path) -> str:
    """name-version-tag.whl from the .dist-info folder's name and its WHEEL file's first Tag."""
    tag = next(line.split(":", 1)[1].strip() for line in (dist_info / "WHEEL").read_text().splitlines()
               if line.startswith("Tag:"))
    return f"{dist_info.name.removesuffix('.dist-info')}-{tag}.whl"


def pack_installed(dist_info: Path, into: Path | None = None) -> Path:
    """A wheel of an installed release made of its installed files, as its RECORD lists them: the .dist-info
    folder (less what pip added) and the top-level packages, without the bytecode pip compiled or the scripts it
    generated (the installing pip makes those again from entry_points.txt). A new RECORD hashes what is packed."""
    site = dist_info.parent
    top = (dist_info / "top_level.txt").read_text().split() if (dist_info / "top_level.txt").is_file() else \
        [dist_info.name.split("-")[0]]
    names = []
    for line in (dist_info / "RECORD").read_text().splitlines():
        name = line.rsplit(",", 2)[0]
        first, _, rest = name.partition("/")
        if first == dist_info.name and rest in _ADDED_BY_PIP or "__pycache__/" in name or name.endswith(".pyc"):
            continue
        if first in (dist_info.name, *top) or Path(first).stem in top:  # a package folder, or a top-level module
            names.append(name)
    into = Path(into or tempfile.mkdtemp(prefix="resnet50-recipe-wheel-"))
    into.mkdir(parents=True, exist_ok=True)
    wheel, record = into / _wheel_name(dist_info), []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            data = (site / name).read_bytes()
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{dist_info.name}/RECORD,,")
        z.writestr(f"{dist_info.name}/RECORD", "\n".join(record) + "\n")
    return wheel
