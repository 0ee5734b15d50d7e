"""`data imagenet --from` on miniature fakes of the places people get ImageNet: Kaggle's tree, the Hub's
ILSVRC/imagenet-1k archives and timm/imagenet-1k-wds shards, in a folder or served by a local stand-in for
the Hub (HF_ENDPOINT); resized while unpacking; interrupted by SIGTERM and rerun."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import free_port, jpeg_bytes, tar_bytes
from PIL import Image

from resnet50_recipe.cli import main
from resnet50_recipe.data.pipeline import class_names

# Real ImageNet-1k wnids (class indices 0, 1 and 2 in timm's ImageNetInfo), so the label mapping is real.
WNIDS = ["n01440764", "n01443537", "n01484850"]
TRAIN = {"n01440764": 3, "n01443537": 2, "n01484850": 4}
# val image k's wnid, deliberately not in wnid order
VAL = ["n01484850", "n01440764", "n01484850", "n01443537", "n01440764", "n01443537"]
VAL_NAME = "ILSVRC2012_val_{:08d}.JPEG"


def train_image(wnid: str, i: int, size=(24, 20)) -> bytes:
    return jpeg_bytes(100 * WNIDS.index(wnid) + i, size)


def val_image(k: int, size=(24, 20)) -> bytes:
    return jpeg_bytes(1000 + k, size)


def check_folder(out: Path, resized: bool = False, suffix: str = ".JPEG") -> None:
    """Every image in its wnid folder under its official name, with its bytes unless resized."""
    assert class_names(out) == WNIDS
    for wnid, n in TRAIN.items():
        names = sorted(p.name for p in (out / "train" / wnid).iterdir())
        assert names == [f"{wnid}_{i}{suffix}" for i in range(n)]
        if not resized:
            assert all((out / "train" / wnid / f"{wnid}_{i}{suffix}").read_bytes() == train_image(wnid, i)
                       for i in range(n))
    for k, wnid in enumerate(VAL, start=1):
        path = out / "val" / wnid / VAL_NAME.format(k)
        assert path.is_file() and (resized or path.read_bytes() == val_image(k))
    assert sum(1 for _ in (out / "val").rglob("*.JPEG")) == len(VAL)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val", "verify.json"]
    report = json.loads((out / "verify.json").read_text())
    assert report["problems"] == [] and report["splits"]["train"]["images"] == sum(TRAIN.values())


def make_kaggle(root: Path, size=(24, 20), per_class: dict | None = None) -> Path:
    """Kaggle's layout: ILSVRC/Data/CLS-LOC/{train/<wnid>,val}, LOC_val_solution.csv (rows not in file order,
    wnids not sorted, boxes after the wnid) and LOC_synset_mapping.txt."""
    base = root / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, n in (per_class or TRAIN).items():
        (base / "train" / wnid).mkdir(parents=True)
        for i in range(n):
            (base / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(train_image(wnid, i, size))
    (base / "val").mkdir(parents=True)
    for k in range(1, len(VAL) + 1):
        (base / "val" / VAL_NAME.format(k)).write_bytes(val_image(k, size))
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for k in (4, 1, 6, 2, 5, 3):
            writer.writerow([VAL_NAME.format(k)[:-len(".JPEG")], f"{VAL[k - 1]} 10 12 200 180 {VAL[k - 1]} 1 2 3 4"])
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n"
                                                 "n01484850 great white shark\n")
    return root


def make_hub_archives(root: Path, padding: int = 0) -> Path:
    """ILSVRC/imagenet-1k's layout: data/train_images_{0,1}.tar.gz and data/val_images.tar.gz, the wnid the
    last `_` field of each file name. `padding` bytes of noise (a member that is no image) make
    train_images_1.tar.gz big enough to be cut mid-transfer after huggingface_hub has written some of it."""
    (root / "data").mkdir(parents=True)
    train = [(f"{wnid}_{i}_{wnid}.JPEG", train_image(wnid, i)) for wnid, n in TRAIN.items() for i in range(n)]
    for part in range(2):
        noise = {"padding.bin": os.urandom(padding)} if part and padding else {}
        (root / "data" / f"train_images_{part}.tar.gz").write_bytes(tar_bytes({**dict(train[part::2]), **noise},
                                                                              "w:gz"))
    (root / "data" / "val_images.tar.gz").write_bytes(tar_bytes(
        {f"ILSVRC2012_val_{k:08d}_{wnid}.JPEG": val_image(k) for k, wnid in enumerate(VAL, start=1)}, "w:gz"))
    return root


def make_shards(root: Path) -> Path:
    """timm/imagenet-1k-wds's layout: a sample is KEY.jpg with KEY.cls (train) or KEY.json (val) beside it."""
    train, val = {}, {}
    for wnid, n in TRAIN.items():
        for i in range(n):
            train[f"{wnid}_{i}.jpg"] = train_image(wnid, i)
            train[f"{wnid}_{i}.cls"] = str(WNIDS.index(wnid)).encode()
    for k, wnid in enumerate(VAL, start=1):
        key = f"sample{k:04d}"
        val[f"{key}.jpg"] = val_image(k)
        val[f"{key}.json"] = json.dumps({"label": WNIDS.index(wnid), "filename": VAL_NAME.format(k)}).encode()
    root.mkdir(parents=True, exist_ok=True)
    (root / "imagenet1k-train-0000.tar").write_bytes(tar_bytes(train))
    (root / "imagenet1k-validation-00.tar").write_bytes(tar_bytes(val))
    return root


def test_kaggle_tree_sorts_val_by_the_solution_csv(tmp_path, capsys):
    source = make_kaggle(tmp_path / "kaggle")
    out = tmp_path / "imagenet"
    assert main(["data", "imagenet", str(out), "--from", str(source), "--quiet"]) == 2  # not 1000 classes
    assert "expected 1000 and 1281167" in capsys.readouterr().err and not (out / "train").exists()
    assert main(["data", "imagenet", str(out), "--from", str(source), "--partial", "--quiet"]) == 0
    check_folder(out)
    assert os.path.samefile(out / "train" / "n01440764" / "n01440764_0.JPEG",  # same disk: linked, not copied
                            source / "ILSVRC/Data/CLS-LOC/train/n01440764/n01440764_0.JPEG")


def test_kaggle_val_image_missing_from_disk_is_named(tmp_path, capsys):
    source = make_kaggle(tmp_path / "kaggle")
    (source / "ILSVRC/Data/CLS-LOC/val" / VAL_NAME.format(3)).unlink()
    assert main(["data", "imagenet", str(tmp_path / "o"), "--from", str(source), "--partial", "--quiet"]) == 2
    assert f"{VAL_NAME.format(3)}: named in LOC_val_solution.csv but not there" in capsys.readouterr().err


def test_hub_archives_in_a_folder_take_the_wnid_from_each_file_name(tmp_path):
    out = tmp_path / "imagenet"
    assert main(["data", "imagenet", str(out), "--from", str(make_hub_archives(tmp_path / "hub")), "--partial",
                 "--quiet"]) == 0
    check_folder(out)


def test_a_hub_archive_name_without_a_known_wnid_is_refused(tmp_path, capsys):
    source = make_hub_archives(tmp_path / "hub")
    (source / "data" / "val_images.tar.gz").write_bytes(tar_bytes({"ILSVRC2012_val_00000001.JPEG": val_image(1)},
                                                                  "w:gz"))
    assert main(["data", "imagenet", str(tmp_path / "o"), "--from", str(source), "--partial", "--quiet"]) == 2
    assert "ILSVRC2012_val_00000001.JPEG does not end in _<wnid>.JPEG" in capsys.readouterr().err


def test_webdataset_shards_map_class_indices_to_wnids(tmp_path):
    out = tmp_path / "imagenet"
    assert main(["data", "imagenet", str(out), "--from", str(make_shards(tmp_path / "wds")), "--partial",
                 "--quiet"]) == 0
    check_folder(out, suffix=".jpg")  # a sample without a .json's file name is named after its key


def test_short_side_resizes_while_unpacking_and_passes_verify(tmp_path):
    source = make_kaggle(tmp_path / "kaggle", size=(500, 375))
    small = source / "ILSVRC/Data/CLS-LOC/train/n01440764/n01440764_0.JPEG"
    small.write_bytes(train_image("n01440764", 0, (200, 150)))  # already under 256: keeps its bytes
    out = tmp_path / "imagenet"
    assert main(["data", "imagenet", str(out), "--from", str(source), "--short-side", "256", "--partial",
                 "--workers", "2", "--quiet"]) == 0
    check_folder(out, resized=True)
    for path in (out / "train").rglob("*.JPEG"):
        with Image.open(path) as img:
            assert img.format == "JPEG" and min(img.size) == (150 if path.name == small.name else 256)
            assert path.name == small.name or img.size == (341, 256)
    assert (out / "train/n01440764" / small.name).read_bytes() == small.read_bytes()
    assert main(["data", "verify", str(out), "--quiet"]) == 0


def test_unknown_layout_is_one_line(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train-00000-of-00294.parquet").write_bytes(b"PAR1")
    assert main(["data", "imagenet", str(tmp_path / "o"), "--from", str(tmp_path / "src")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ImageNet layout recognised; expected" in err


# ---------------------------------------------------------------------------------------------------------
# SIGTERM in the middle of an unpack


def run_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "resnet50_recipe", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigterm_mid_unpack_then_rerun_finishes_with_the_right_counts(tmp_path):
    per_class = {wnid: 60 for wnid in WNIDS}
    source = make_kaggle(tmp_path / "kaggle", size=(640, 480), per_class=per_class)
    out = tmp_path / "imagenet"
    args = ["data", "imagenet", str(out), "--from", str(source), "--short-side", "256", "--partial", "--workers", "2",
            "--quiet"]
    proc = run_cli(*args)
    partial = out / ".train.partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_dir() and sum(1 for _ in partial.rglob("*.JPEG")) >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and not (out / "train").exists()
    written = [p for p in partial.rglob("*.JPEG") if not p.name.startswith(".")]
    assert 20 <= len(written) < 180, err
    for path in written:  # whatever was written is whole
        with Image.open(path) as img:
            img.load()
    stamp = {p: p.stat().st_ino for p in written}
    rerun = run_cli(*args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    for wnid in WNIDS:
        assert len(list((out / "train" / wnid).glob("*.JPEG"))) == 60
    assert sum(1 for _ in (out / "val").rglob("*.JPEG")) == len(VAL)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary file left behind
    assert all((out / "train" / p.relative_to(partial)).stat().st_ino == ino for p, ino in stamp.items())  # kept
    assert json.loads((out / "verify.json").read_text())["problems"] == []


# ---------------------------------------------------------------------------------------------------------
# The Hub, through a local stand-in


TOKEN = "hf_localtesttoken"


class FakeHub(ThreadingHTTPServer):
    """Just enough of the Hub's HTTP API for huggingface_hub's list_repo_files and snapshot_download: repo
    info, the recursive tree and resolve (HEAD, and GET with Range). `gated` repos answer 401 as the Hub does
    unless the request carries TOKEN; `drop_once` (a size) cuts the next file body larger than that short."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated=()):
        super().__init__(("127.0.0.1", free_port()), _HubHandler)
        self.repos, self.gated, self.drop_once, self.requests = repos, set(gated), False, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    COMMIT = "a" * 40

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        hub = self.server
        path = self.path.split("?")[0]
        hub.requests.append((self.command, path, self.headers.get("Range")))
        for repo, files in {**dict.fromkeys(hub.gated, {}), **hub.repos}.items():
            api, resolve = f"/api/datasets/{repo}/", f"/datasets/{repo}/resolve/"
            if path.startswith(api) or path.startswith(resolve):
                if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.reply(401, json.dumps({"error": f"Access to dataset {repo} is restricted."}).encode(),
                                      {"X-Error-Code": "GatedRepo"})
                if path.startswith(api + "revision/"):
                    return self.reply(200, json.dumps({"id": repo, "sha": self.COMMIT, "private": False}).encode())
                if path.startswith(api + "tree/"):
                    tree = [{"type": "file", "path": name, "size": len(data), "oid": f"{i:040x}"}
                            for i, (name, data) in enumerate(sorted(files.items()))]
                    return self.reply(200, json.dumps(tree).encode())
                name = path[len(resolve):].split("/", 1)[1]
                return self.send_file(files[name], head)
        self.reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})

    def send_file(self, data: bytes, head: bool):
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        headers = {"ETag": f'"{hash(data) & 0xffffffff:08x}"', "X-Repo-Commit": self.COMMIT,
                   "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if head:
            return self.reply(200, b"", {**headers, "Content-Length": str(len(data))}, length=len(data))
        if self.server.drop_once and not start and len(body) > self.server.drop_once:
            self.server.drop_once = False
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[: len(body) * 7 // 8])
            self.wfile.flush()
            self.close_connection = True
            return
        self.reply(206 if start else 200, body, headers)

    def reply(self, status: int, body: bytes, headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(tmp_path):
    archives = make_hub_archives(tmp_path / "served", padding=12 << 20)
    repos = {"ILSVRC/imagenet-1k": {str(p.relative_to(archives)): p.read_bytes() for p in archives.rglob("*.tar.gz")},
             "timm/imagenet-1k-wds": {p.name: p.read_bytes() for p in make_shards(tmp_path / "wds").iterdir()},
             "someone/parquet-imagenet": {"data/train-00000-of-00001.parquet": b"PAR1"}}
    repos["ILSVRC/imagenet-1k"]["classes.py"] = b"IMAGENET2012_CLASSES = {}\n"  # not an archive: not downloaded
    repos["ILSVRC/gated-imagenet"] = repos["ILSVRC/imagenet-1k"]
    hub = FakeHub(repos, gated={"ILSVRC/gated-imagenet"})
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def hub_env(hub: FakeHub, tmp_path: Path) -> dict:
    # HF_ENDPOINT is read when huggingface_hub is imported, hence a fresh process
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "HF_HUB_DISABLE_XET": "1"}


def test_hub_download_resumes_a_dropped_file_then_unpacks(fake_hub, tmp_path):
    fake_hub.drop_once = 10 << 20  # past huggingface_hub's first 10 MB chunk, which it writes before the cut
    out = tmp_path / "imagenet"
    proc = run_cli("data", "imagenet", str(out), "--from", "hf:ILSVRC/imagenet-1k", "--partial", "--quiet",
                   env=hub_env(fake_hub, tmp_path))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    check_folder(out)
    ranges = [r for method, _, r in fake_hub.requests if method == "GET" and r]
    assert len(ranges) == 1 and int(ranges[0][len("bytes="):-1]) >= 10 << 20  # resumed, not restarted
    kept = tmp_path / "ILSVRC--imagenet-1k" / "data"
    assert sorted(p.name for p in kept.iterdir()) == ["train_images_0.tar.gz", "train_images_1.tar.gz",
                                                      "val_images.tar.gz"]
    assert not any("classes.py" in path for _, path, _ in fake_hub.requests if "/resolve/" in path)


def test_hub_token_from_hf_token_opens_a_gated_repo(fake_hub, tmp_path):
    out = tmp_path / "imagenet"
    proc = run_cli("data", "imagenet", str(out), "--from", "hf:ILSVRC/gated-imagenet", "--partial", "--quiet",
                   env={**hub_env(fake_hub, tmp_path), "HF_TOKEN": TOKEN})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    check_folder(out)


def test_hub_webdataset_repo(fake_hub, tmp_path):
    out = tmp_path / "imagenet"
    proc = run_cli("data", "imagenet", str(out), "--from", "hf:timm/imagenet-1k-wds", "--partial", "--quiet",
                   "--archive-dir", str(tmp_path / "shards"), env=hub_env(fake_hub, tmp_path))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    check_folder(out, suffix=".jpg")


@pytest.mark.parametrize("repo, message", [
    ("ILSVRC/gated-imagenet", "hf:ILSVRC/gated-imagenet: the dataset is gated: accept its terms at "
                              "{url}/datasets/ILSVRC/gated-imagenet, then log in"),
    ("someone/missing", "hf:someone/missing: not found, or gated or private and no valid token was sent "
                        "({url}/datasets/someone/missing); log in"),
    ("someone/parquet-imagenet", "hf:someone/parquet-imagenet: no ImageNet layout this knows among its 1 files "
                                 "(train-00000-of-00001.parquet"),
])
def test_hub_refusals_are_one_line(fake_hub, tmp_path, repo, message):
    proc = run_cli("data", "imagenet", str(tmp_path / "o"), "--from", f"hf:{repo}", "--quiet",
                   env=hub_env(fake_hub, tmp_path))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and message.format(url=fake_hub.url) in err, err
    assert not (tmp_path / "o").exists()
