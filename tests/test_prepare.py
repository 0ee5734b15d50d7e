"""`data imagenette` against a local HTTP server and `data imagenet` on generated miniature ILSVRC archives."""
import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from helpers import free_port, jpeg_bytes, tar_bytes

from resnet50_recipe.cli import main
from resnet50_recipe.data.pipeline import class_names
from resnet50_recipe.publish.export import label_names

# ---------------------------------------------------------------------------------------------------------
# Imagenette over HTTP


@pytest.fixture
def imagenette_server():
    """Serves a generated imagenette2-160.tgz with Range support; `drop_once` cuts the next body in half."""
    files = {f"imagenette2-160/{split}/{wnid}/{wnid}_{i}.JPEG": jpeg_bytes(i + 10 * k)
             for k, wnid in enumerate(("n01440764", "n02102040")) for split, n in (("train", 3), ("val", 2))
             for i in range(n)}
    files["imagenette2-160/noisy_imagenette.csv"] = b"path,noisy_labels_0\n"
    payload = tar_bytes(files, "w:gz")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            start = 0
            self.server.ranges.append(self.headers.get("Range"))
            if self.headers.get("Range"):
                start = int(self.headers["Range"].split("=")[1].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            else:
                self.send_response(200)
            body = payload[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.server.drop_once:
                self.server.drop_once = False
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.ranges, server.drop_once, server.payload = [], False, payload
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_imagenette_download_resumes_after_a_dropped_transfer_verifies_and_extracts(imagenette_server, tmp_path):
    server = imagenette_server
    server.drop_once = True
    url = f"http://127.0.0.1:{server.server_address[1]}/imagenette2-160.tgz"
    md5 = hashlib.md5(server.payload).hexdigest()
    out = tmp_path / "imagenette"
    assert main(["data", "imagenette", str(out), "--url", url, "--md5", md5, "--quiet"]) == 0
    first, second = server.ranges
    assert first is None and second == f"bytes={len(server.payload) // 2}-"  # resumed, not restarted
    assert (tmp_path / "imagenette2-160.tgz").read_bytes() == server.payload
    assert class_names(out) == ["n01440764", "n02102040"]
    assert len(list((out / "train").rglob("*.JPEG"))) == 6 and len(list((out / "val").rglob("*.JPEG"))) == 4
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]  # no scratch left behind
    assert main(["data", "imagenette", str(out), "--url", url, "--md5", md5, "--quiet"]) == 0  # done: a no-op
    assert len(server.ranges) == 2


def test_imagenette_wrong_checksum_fails_cleanly_and_extracts_nothing(imagenette_server, tmp_path, capsys):
    url = f"http://127.0.0.1:{imagenette_server.server_address[1]}/imagenette2-160.tgz"
    out = tmp_path / "imagenette"
    assert main(["data", "imagenette", str(out), "--url", url, "--sha256", "0" * 64, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "does not match the expected " + "0" * 64 in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no dataset, no archive, no .part
    # the pinned MD5 of the official 160 px archive is the default, and this file is not it
    assert main(["data", "imagenette", str(out), "--url", url, "--quiet"]) == 2
    assert "e793b78cc4c9e9a4ccc0c1155377a412" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------------------------
# ImageNet from miniature ILSVRC2012 archives

# (ILSVRC2012_ID, wnid, words, num_children): IDs follow the devkit's order, which is not sorted-wnid order,
# and ID 3 is a non-leaf synset (an ancestor) that must not become a class.
SYNSETS = [(1, "n01443537", "goldfish, Carassius auratus", 0),
           (2, "n01440764", "tench, Tinca tinca", 0),
           (3, "n01439121", "cyprinid", 2),
           (4, "n01484850", "great white shark, white shark, man-eater", 0)]
TRAIN = {"n01443537": 3, "n01440764": 2, "n01484850": 4}
VAL_TRUTH = [2, 4, 1, 2, 1, 4, 4]  # ILSVRC2012_ID of val image 1, 2, ...


def meta_mat() -> bytes:
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
              ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    synsets = np.zeros((len(SYNSETS), 1), dtype=fields)
    for row, (idx, wnid, words, children) in enumerate(SYNSETS):
        synsets[row, 0] = (np.array([[idx]], dtype=np.uint16), np.array([wnid]), np.array([words]),
                           np.array(["gloss"]), np.array([[children]], dtype=np.uint8),
                           np.array([[1, 2]] if children else np.zeros((1, 0)), dtype=np.uint8),
                           np.array([[0]], dtype=np.uint8), np.array([[TRAIN.get(wnid, 0)]], dtype=np.uint16))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc")
    class_tars = {f"{wnid}.tar": tar_bytes({f"{wnid}_{i}.JPEG": jpeg_bytes(100 * k + i) for i in range(n)})
                  for k, (wnid, n) in enumerate(TRAIN.items())}
    (root / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(class_tars))
    (root / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(
        {f"ILSVRC2012_val_{i + 1:08d}.JPEG": jpeg_bytes(1000 + i) for i in range(len(VAL_TRUTH))}))
    truth = "".join(f"{idx}\n" for idx in VAL_TRUTH).encode()
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(tar_bytes(
        {"ILSVRC2012_devkit_t12/data/meta.mat": meta_mat(),
         "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth,
         "ILSVRC2012_devkit_t12/readme.txt": b"devkit"}, "w:gz"))
    return root


def check_imagenet(out: Path, ilsvrc: Path) -> None:
    wnid_of = {idx: wnid for idx, wnid, _, _ in SYNSETS}
    assert class_names(out) == sorted(TRAIN)  # the non-leaf n01439121 is no class
    for wnid, n in TRAIN.items():
        assert len(list((out / "train" / wnid).iterdir())) == n
    for i, idx in enumerate(VAL_TRUTH):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        assert (out / "val" / wnid_of[idx] / name).read_bytes() == jpeg_bytes(1000 + i)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val", "verify.json"]  # verified at the end
    assert label_names(class_names(out))[0] == "tench, Tinca tinca"  # n01440764 sorts first


def test_imagenet_from_the_archives_maps_val_by_ilsvrc_id_and_checks_counts(ilsvrc, tmp_path, capsys):
    out = tmp_path / "imagenet"
    args = ["data", "imagenet", str(out), "--from", str(ilsvrc), "--quiet"]
    assert main(args) == 2  # 3 classes and 16 images are not ImageNet-1k
    err = capsys.readouterr().err
    assert "expected 1000 and 1281167" in err and "--partial" in err
    assert not (out / "train").exists() and not (out / "val").exists()  # nothing that looks complete
    assert main(args + ["--partial"]) == 0
    check_imagenet(out, ilsvrc)
    assert main(args + ["--verify-md5"]) == 2  # these are not the official archives
    assert "is not the official ILSVRC2012_img_train.tar's 1d675b47d978889d74fa0da5fadfb00e" in \
        capsys.readouterr().err


def test_imagenet_interrupted_then_rerun_finishes_and_keeps_finished_work(ilsvrc, tmp_path, capsys):
    full = (ilsvrc / "ILSVRC2012_img_train.tar").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    with tarfile.open(ilsvrc / "ILSVRC2012_img_train.tar") as tar:
        last = tar.getmembers()[-1]
    (cut / "ILSVRC2012_img_train.tar").write_bytes(full[: last.offset_data + last.size // 2])  # dies in the last class
    for name in ("ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        (cut / name).symlink_to(ilsvrc / name)
    out = tmp_path / "imagenet"
    assert main(["data", "imagenet", str(out), "--from", str(cut), "--partial", "--quiet"]) == 2
    assert "ended early or is damaged" in capsys.readouterr().err
    partial = out / ".train.partial"
    finished = [f for f in partial.glob("*/*") if not f.name.startswith(".")]
    assert 1 <= len(finished) < sum(TRAIN.values()) and not (out / "train").exists()
    stamp = {f.relative_to(partial): f.stat().st_ino for f in finished}
    assert main(["data", "imagenet", str(out), "--from", str(ilsvrc), "--partial", "--quiet"]) == 0
    check_imagenet(out, ilsvrc)
    assert all((out / "train" / name).stat().st_ino == ino for name, ino in stamp.items())  # not redone


def test_imagenet_streams_the_archives_from_an_s3_prefix(ilsvrc, tmp_path, s3_endpoint, bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in ilsvrc.iterdir():
        s3.upload_file(str(path), bucket, f"archives/{path.name}")
    out = tmp_path / "imagenet"
    assert main(["data", "imagenet", str(out), "--from", f"s3://{bucket}/archives", "--endpoint-url", s3_endpoint,
                 "--partial", "--quiet"]) == 0
    check_imagenet(out, ilsvrc)
    assert not list(tmp_path.rglob("*.tar*"))  # streamed: no archive copy on disk


def test_a_ground_truth_naming_a_non_leaf_synset_is_refused(ilsvrc, tmp_path, capsys):
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (tmp_path / name).symlink_to(ilsvrc / name)
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(tar_bytes(
        {"ILSVRC2012_devkit_t12/data/meta.mat": meta_mat(),
         "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": b"2\n3\n1\n"}, "w:gz"))
    assert main(["data", "imagenet", str(tmp_path / "o"), "--from", str(tmp_path), "--partial", "--quiet"]) == 2
    assert "no leaf synset in meta.mat: [3]" in capsys.readouterr().err


def test_imagenet_names_a_missing_archive(tmp_path, capsys):
    assert main(["data", "imagenet", str(tmp_path / "o"), "--train-tar", str(tmp_path / "x.tar")]) == 2
    assert "ILSVRC2012_img_val.tar" in capsys.readouterr().err
    assert main(["data", "imagenet", str(tmp_path / "o"), "--from", str(tmp_path)]) == 2
    assert "no ImageNet layout recognised; expected the three ILSVRC2012 archives" in capsys.readouterr().err
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
    assert main(["data", "imagenet", str(tmp_path / "o"), "--from", str(tmp_path)]) == 2
    assert "ILSVRC2012_img_train.tar: archive not found, next to the other" in capsys.readouterr().err


def test_imagenet_wnids_map_to_timm_class_names():
    assert label_names(["n01440764", "n01443537"]) == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    assert label_names(["cat", "n01440764"]) == ["cat", "n01440764"]  # not all synsets: folder names
