"""Export in timm's Hub format, loaded back through timm; push checked at the huggingface_hub API boundary, then
over HTTP against a local stand-in for the Hub (helpers.HubStandIn), by hand and at the end of training."""
import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import timm
import torch
from helpers import tiny_overlay
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file

from resnet50_recipe import export, load_recipe, push, train
from resnet50_recipe.cli import main
from resnet50_recipe.data.pipeline import eval_transform
from resnet50_recipe.errors import EXIT_BAD_INPUT, EXIT_FINISHED, EXIT_PREEMPTED, EXIT_PUBLISH_FAILED, UserError
from resnet50_recipe.model import build_model
from resnet50_recipe.publish.export import choose_weights, label_names, verify_export
from resnet50_recipe.store.checkpoints import load_state, read_manifest


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{"augment.eval_size": 40, "augment.crop_pct": 0.875,
                                                             "augment.interpolation": "bicubic"}))
    return out, recipe, train(recipe, out, quiet=True)


def test_training_ends_with_an_export_that_timm_loads_with_identical_logits(run, tiny_data):
    out, recipe, summary = run
    folder = out / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "curves.png",
                                                         "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    state = load_state(out / "checkpoints" / read_manifest(out / "checkpoints")["file"])
    weights = "ema" if summary["ema_top1"] > summary["top1"] else "model"
    reference = build_model(recipe.model, len(state["class_names"])).eval()
    reference.load_state_dict(state[weights])
    batch = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(batch), reference(batch))  # bitwise, fp32

    config = timm.data.resolve_data_config({}, model=loaded)
    assert config["input_size"] == (3, 40, 40) and config["crop_pct"] == 0.875
    assert config["interpolation"] == "bicubic" and config["crop_mode"] == "center"
    assert tuple(config["mean"]) == recipe.augment.mean and tuple(config["std"]) == recipe.augment.std
    timm_transform = timm.data.create_transform(**config)
    ours = eval_transform(recipe.augment)
    image = Image.open(next((tiny_data / "val").rglob("*.jpg"))).convert("RGB")
    mean, std = torch.tensor(recipe.augment.mean).view(3, 1, 1), torch.tensor(recipe.augment.std).view(3, 1, 1)
    assert torch.allclose(timm_transform(image), (ours(image).float() / 255 - mean) / std, atol=1e-5)


def test_config_json_follows_timm(run):
    out, recipe, _ = run
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    assert config["label_names"] == ["disk", "square", "triangle"]  # ImageFolder: the folder names
    assert {"num_features", "global_pool"} <= set(config)
    cfg = config["pretrained_cfg"]
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std", "first_conv", "classifier", "license"):
        assert key in cfg, key
    assert "test_input_size" not in cfg  # no stale recommendations from timm's default config


def test_model_card_parses_and_carries_the_measured_top1(run):
    out, recipe, summary = run
    card = ModelCard.load(out / "export" / "README.md")
    assert card.data.library_name == "timm" and "image-classification" in card.data.tags
    assert card.data.license == "apache-2.0"
    top1 = next(r for r in card.data.eval_results if r.metric_name == "top-1")
    kind = "ema_top1" if summary["ema_top1"] > summary["top1"] else "top1"
    assert top1.metric_value == round(summary[kind], 4)
    for text in ("timm.create_model(\"hf-hub:", "## Limitations", "curves.png", "train_size: 32"):
        assert text in card.content, text


def test_export_cli_with_chosen_weights(run, tmp_path, capsys):
    out, _, _ = run
    assert main(["export", str(out), str(tmp_path / "raw"), "--weights", "raw", "--repo-id", "me/tiny"]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert "hf-hub:me/tiny" in (tmp_path / "raw" / "README.md").read_text()
    assert main(["export", str(out), str(tmp_path / "best"), "--weights", "best"]) == 0
    assert main(["export", str(out), str(tmp_path / "x"), "--weights", "ema"]) == 0
    verify_export(tmp_path / "x")


def test_weights_auto_picks_the_better_of_ema_and_raw():
    metrics = [{"top1": 0.5, "ema_top1": 0.6}]
    assert choose_weights({"ema": {}, "metrics": metrics}, "auto") == "ema"
    assert choose_weights({"ema": {}, "metrics": [{"top1": 0.7, "ema_top1": 0.6}]}, "auto") == "raw"
    assert choose_weights({"ema": None, "metrics": metrics}, "auto") == "raw"
    with pytest.raises(ValueError, match="no EMA weights"):
        choose_weights({"ema": None, "metrics": metrics}, "ema")


def test_label_names_are_readable_for_imagenet_and_from_a_names_file(tmp_path):
    assert label_names(["n01440764", "n01443537"]) == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    names = tmp_path / "names.txt"
    names.write_text("round thing\nsquare thing\n")
    assert label_names(["disk", "square"], names) == ["round thing", "square thing"]
    with pytest.raises(ValueError, match="2 names for 3 classes"):
        label_names(["a", "b", "c"], names)


@pytest.fixture
def hub_calls(monkeypatch):
    calls = []

    def record(name):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            if name == "upload_folder":
                folder = kwargs["folder_path"]
                calls.append(("uploaded", sorted(p.name for p in __import__("pathlib").Path(folder).iterdir()),
                              (__import__("pathlib").Path(folder) / "README.md").read_text()))
            if name == "repo_info":  # the repo create_repo made, with the visibility asked for
                created = next(c for c in calls if c[0] == "create_repo")
                return SimpleNamespace(private=bool(created[2].get("private")))
            return f"https://huggingface.co/{kwargs.get('repo_id', args[0] if args else '')}/commit/abc"
        return method

    for name in ("create_repo", "repo_info", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    return calls


def test_push_sends_repo_folder_revision_and_flags_and_never_shows_the_token(run, hub_calls, monkeypatch,
                                                                           capsys, caplog):
    out, _, _ = run
    secret = "hf_not_a_real_token_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    assert main(["push", str(out / "export"), "--repo-id", "me/smoke-test", "--private", "--revision", "exp-1",
                 "--commit-message", "first weights"]) == 0
    names = [c[0] for c in hub_calls]
    assert names == ["create_repo", "repo_info", "create_branch", "upload_folder", "uploaded"]
    assert hub_calls[0][1] == ("me/smoke-test",) and hub_calls[0][2]["private"] is True
    assert hub_calls[0][2]["exist_ok"] is True
    assert hub_calls[2][2]["branch"] == "exp-1"
    upload = hub_calls[3][2]
    assert upload["repo_id"] == "me/smoke-test" and upload["revision"] == "exp-1"
    assert upload["create_pr"] is False and upload["commit_message"] == "first weights"
    assert hub_calls[4][1] == ["README.md", "config.json", "curves.png", "model.safetensors"]
    assert "hf-hub:me/smoke-test" in hub_calls[4][2]  # the uploaded card names the real repo
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err + caplog.text


def test_push_as_a_pull_request(run, hub_calls):
    out, _, _ = run
    push(out / "export", "me/smoke-test", create_pr=True)
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder", "uploaded"]
    assert hub_calls[1][2]["create_pr"] is True


def test_push_refuses_a_folder_that_fails_the_round_trip(run, hub_calls, tmp_path):
    out, _, _ = run
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(out / "export", broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_classes"] = 5
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fails the round trip"):
        push(broken, "me/x")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing model.safetensors"):
        push(broken, "me/x")
    assert hub_calls == []


def test_library_export_with_a_names_file(run, tmp_path):
    out, _, _ = run
    names = tmp_path / "names.txt"
    names.write_text("round\nboxy\npointy\n")
    folder = export(out / "checkpoints" / read_manifest(out / "checkpoints")["file"], tmp_path / "lib",
                    weights="raw", names_file=names, dataset="my-org/shapes")
    config = json.loads((folder / "config.json").read_text())
    assert config["label_names"] == ["round", "boxy", "pointy"]
    assert ModelCard.load(folder / "README.md").data.datasets == ["my-org/shapes"]


TOKEN = "hf_stand_in_token_0123456789"


def test_push_over_http_stores_what_timm_loads_back_bitwise(run, hub, monkeypatch, capsys):
    out, _, _ = run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(out / "export"), "--repo-id", "me/smoke-test", "--private"]) == 0
    folder = hub.root / "me" / "smoke-test"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "curves.png", "model.safetensors"]
    for name in ("config.json", "curves.png", "model.safetensors"):
        assert (folder / name).read_bytes() == (out / "export" / name).read_bytes(), name
    assert "hf-hub:me/smoke-test" in (folder / "README.md").read_text()
    exported = load_file(out / "export" / "model.safetensors")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).state_dict()
    assert loaded.keys() == exported.keys()
    for key, tensor in exported.items():
        assert torch.equal(loaded[key], tensor), key
    calls = [(method, path) for method, path, _, _ in hub.requests]
    assert calls[0] == ("POST", "/api/repos/create") and calls[-1] == ("POST", "/api/models/me/smoke-test/commit/main")
    assert hub.requests[0][3] == {"name": "smoke-test", "organization": "me", "visibility": "private", "type": "model"}
    assert {auth for _, _, auth, _ in hub.requests} == {f"Bearer {TOKEN}"}
    assert main(["push", str(out / "export"), "--repo-id", "me/smoke-test"]) == 0  # exist_ok: a second push works
    printed = capsys.readouterr()
    # the repo's address on the Hub that was pushed to (HF_ENDPOINT), not always huggingface.co
    assert printed.out.splitlines()[-1] == f"pushed {out / 'export'} to {hub.endpoint}/me/smoke-test"
    assert TOKEN not in printed.out + printed.err


@pytest.mark.parametrize("status", [401, 403])
def test_a_hub_that_refuses_the_token_fails_the_push_in_one_line_and_stores_nothing(run, hub, monkeypatch, capsys,
                                                                                   status):
    """A refused token is bad input: one line naming the repo, the status and what would do (exit 2), never a
    traceback; nothing reaches the Hub."""
    out, _, _ = run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.handler.refuse = status
    with pytest.raises(UserError, match=f"me/smoke-test: the Hub refused the token \\({status}"):
        push(out / "export", "me/smoke-test")
    # create_repo(exist_ok=True) answered 401 asks whether the repo exists before it gives up
    assert [(method, path) for method, path, _, _ in hub.requests] == [("POST", "/api/repos/create"),
                                                                       ("GET", "/api/models/me/smoke-test")]
    assert not any(hub.root.iterdir())
    capsys.readouterr()
    assert main(["push", str(out / "export"), "--repo-id", "me/smoke-test"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err and "HF_TOKEN" in err and "write" in err and TOKEN not in err


def test_training_pushes_at_the_end_and_a_refused_push_exits_3(tiny_data, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{"export.repo_id": "me/trained", "export.private": True}))
    summary = train(recipe, tmp_path / "pushed", quiet=True)
    assert summary["pushed"] == "me/trained" and summary["exit_status"] == EXIT_FINISHED
    for name in ("README.md", "config.json", "model.safetensors"):
        assert (hub.root / "me/trained" / name).read_bytes() == (tmp_path / "pushed/export" / name).read_bytes()
    hub.handler.refuse = 401
    summary = train(recipe, tmp_path / "refused", quiet=True)
    assert summary["exit_status"] == EXIT_PUBLISH_FAILED and "401" in summary["push_error"]
    assert json.loads((tmp_path / "refused/summary.json").read_text())["push_error"] == summary["push_error"]


def test_a_hub_that_never_answers_the_push_ends_it_at_its_deadline_with_exit_3(tiny_data, hub, tmp_path,
                                                                               monkeypatch):
    """huggingface_hub's HTTP client has no timeout: a Hub that holds the commit would hold the run, and on an
    instance the bill, for ever. The push has export.push_timeout_s; past it the run ends 3 (released by the unit)
    with the command that retries the push."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.handler.delay_s = 60.0
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{"export.repo_id": "me/held", "export.push_timeout_s": 2}))
    started = time.monotonic()
    summary = train(recipe, tmp_path / "held", quiet=True)
    assert time.monotonic() - started < 45, "the run waited for the Hub's answer"
    assert summary["exit_status"] == EXIT_PUBLISH_FAILED and "push_timeout_s" in summary["push_error"], summary
    assert json.loads((tmp_path / "held/summary.json").read_text())["push_error"] == summary["push_error"]


def test_a_stop_during_the_push_exits_75_within_its_deadline_and_the_restart_pushes(tiny_data, hub, tmp_path,
                                                                                    monkeypatch):
    """SIGTERM (a spot notice, systemd's stop) while the Hub holds the push: the stop's deadline is not waited past
    for the Hub; the run exits 75 as stopped during the push, and the restart exports and pushes."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.handler.delay_s = 60.0
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{"export.repo_id": "me/stopped",
                                                             "checkpoint.stop_timeout_s": 5}))

    def signal_at_the_commit():
        while not any(path.endswith("/commit/main") for _, path, _, _ in list(hub.requests)):
            time.sleep(0.05)
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    signalled: list[float] = []
    threading.Thread(target=signal_at_the_commit, daemon=True).start()
    summary = train(recipe, tmp_path / "run", quiet=True)
    assert signalled and time.monotonic() - signalled[0] < 5, "the stop waited past its deadline for the Hub"
    assert summary["exit_status"] == EXIT_PREEMPTED and summary["during"] == "push", summary
    assert "pushed" not in summary and "push_error" not in summary
    hub.handler.delay_s = 0.0
    summary = train(recipe, tmp_path / "run", quiet=True)  # the unit's restart: --resume auto
    assert summary["exit_status"] == EXIT_FINISHED and summary["pushed"] == "me/stopped", summary
    assert (hub.root / "me/stopped/model.safetensors").read_bytes() == \
        (tmp_path / "run/export/model.safetensors").read_bytes()


def test_private_refuses_an_existing_public_repo_and_uploads_nothing(run, hub, monkeypatch, capsys):
    """create_repo(private=True, exist_ok=True) leaves an existing repo as it is: a public one would publish the
    weights. The push refuses it, in one line, before any upload; a private one, or a new one, is pushed."""
    out, _, _ = run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    HfApi(token=TOKEN).create_repo("me/public", repo_type="model")  # someone's existing public repo
    assert main(["push", str(out / "export"), "--repo-id", "me/public", "--private"]) == 2
    assert "--private: me/public exists and is public" in capsys.readouterr().err
    assert not any((hub.root / "me" / "public").iterdir()) and hub.handler.private["me/public"] is False
    assert not any(path.endswith("/commit/main") for _, path, _, _ in hub.requests)
    assert main(["push", str(out / "export"), "--repo-id", "me/new", "--private"]) == 0
    assert main(["push", str(out / "export"), "--repo-id", "me/new", "--private"]) == 0  # private already: pushed
    assert hub.handler.private["me/new"] is True and (hub.root / "me" / "new" / "model.safetensors").is_file()
