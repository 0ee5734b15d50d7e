"""What a dollar buys: `aws price --recipes` (recipes x instance types, hours and dollars to finish) against moto's
spot price history and as a dry run at list prices, the throughput table's sources, and `--from-run`, which puts
what a run measured in place of an estimate. EC2 through mock_aws, S3 through the moto server. Never AWS."""
import json
import os
import re
from pathlib import Path

import boto3
import pytest
from helpers import remote_args, tiny_overlay
from moto import mock_aws

from resnet50_recipe import ec2 as ec2_facts
from resnet50_recipe import load_recipe, train
from resnet50_recipe.cli import main
from resnet50_recipe.cloud import cost
from resnet50_recipe.cloud.api import Api
from resnet50_recipe.data.pipeline import train_size_at
from resnet50_recipe.errors import UserError
from resnet50_recipe.trainer.runlog import read_metrics

REGION = "us-east-1"
FAST = [f"imagenet-fast-{n}" for n in (16, 24, 32, 40, 56, 88)]


@pytest.fixture
def ec2(monkeypatch):
    """mock_aws: moto's spot price history (every offered type at $0.00001/h in several AZs)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield Api(REGION)


def test_every_gpu_of_the_instance_table_has_a_throughput_that_says_measured_or_estimated_and_from_what():
    for itype, (gpu, gpus, vcpus, price) in ec2_facts.INSTANCE_TYPES.items():
        figure = cost.THROUGHPUT_224[gpu]
        assert figure.kind in ("measured", "estimated") and figure.img_per_s > 0 and len(figure.source) > 40, itype
        assert gpus >= 1 and vcpus >= 4 and (price is None or price > 0), itype
    # No GPU has measured this trainer (BENCHMARKS.md#gpu): every figure is an estimate, each derived from a
    # published one, and the derived ones say by which ratio.
    assert {f.kind for f in cost.THROUGHPUT_224.values()} == {"estimated"}
    assert cost.THROUGHPUT_224["V100"].img_per_s == 1200 and cost.THROUGHPUT_224["A100"].img_per_s == 2470
    for gpu in ("T4", "A10G", "L4", "L40S", "H100"):
        tflops, bandwidth, _ = cost.GPU_SPECS[gpu]
        ratio = min(tflops / 125, bandwidth / 900)
        assert cost.THROUGHPUT_224[gpu].img_per_s == round(1200 * ratio)
        assert f"x {ratio:.3f}" in cost.THROUGHPUT_224[gpu].source
    assert {"g6.xlarge", "g6.12xlarge", "g6e.xlarge", "g6e.12xlarge", "g5.12xlarge", "p3.8xlarge"} <= set(
        ec2_facts.INSTANCE_TYPES)
    # torch.cuda.get_device_name's names on the instance types, as a run records them
    names = {"Tesla T4": "T4", "NVIDIA A10G": "A10G", "NVIDIA L4": "L4", "NVIDIA L40S": "L40S", "NVIDIA H200": None,
             "Tesla V100-SXM2-16GB": "V100", "NVIDIA A100-SXM4-40GB": "A100", "NVIDIA H100 80GB HBM3": "H100"}
    assert {name: cost.gpu_kind(name) for name in names} == names


def test_hours_follow_the_resolution_ramp_and_a_few_vcpus_cap_what_the_gpus_get():
    recipe = load_recipe("imagenet-fast-56")
    t4 = cost.THROUGHPUT_224["T4"].img_per_s
    sizes = [train_size_at(recipe.augment, e) for e in range(56)]
    assert set(sizes) == {160, 192}
    on_gpus = sum(1_281_167 / (4 * t4 * (224 / s) ** 2) for s in sizes) / 3600
    roomy = cost.finish(recipe, "g4dn.12xlarge", 2.0, disk_gb=300)  # 48 vCPUs decode faster than 4 T4s train
    assert roomy["hours"] == pytest.approx(on_gpus) and roomy["loader_bound_epochs"] == 0
    assert roomy["usd"] == pytest.approx(on_gpus * 2.0 + ec2_facts.ebs_cost(300, on_gpus))
    # g6e.xlarge: an L40S fed by 3 vCPUs at 245 img/s each: the loader sets the pace at every epoch.
    fed = cost.finish(recipe, "g6e.xlarge", None)
    assert fed["usd"] is None and fed["loader_bound_epochs"] == 56
    assert fed["hours"] == pytest.approx(56 * 1_281_167 / (3 * 245) / 3600)
    assert cost.finish(recipe, "g6e.4xlarge", 1.0)["loader_bound_epochs"] == 0


def test_the_recipe_table_prices_each_recipe_on_each_type_at_the_spot_price_and_marks_the_cheapest(ec2, capsys):
    """`aws price --recipes 'imagenet-fast-*' --budget-usd 12` against moto's spot price history."""
    assert main(["aws", "price", "--recipes", "imagenet-fast-*", "--budget-usd", "12", "--region", REGION]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == FAST  # every shipped recipe the glob matches, in epoch order
    assert lines[1].split() == ["epochs", "16", "24", "32", "40", "56", "88"]
    assert re.sub(r"\s+", " ", lines[2]).startswith("published top-1 [6] 73.8 % 75.6 % 76.6 % 77.2 % 78.0 % 78.4 %")
    assert lines[3].split()[2:] == ["256", "px,", "flip"] * 6
    recipes = [load_recipe(name) for name in FAST]
    for itype in ec2_facts.TABLE_TYPES:
        row = next(line for line in lines if line.startswith(itype + " "))
        spot = next(iter(ec2_facts.spot_prices(ec2, itype).values()), None)
        cells = re.findall(r"(\d+\.\d)h \$(\S+?)(\*?)(\+?)(?=\s|$)", row)
        assert len(cells) == 6, row
        for recipe, (hours, usd, cheapest, fits) in zip(recipes, cells):
            expected = cost.finish(recipe, itype, spot)
            assert hours == f"{expected['hours']:.1f}"
            if spot is None:  # moto offers no spot p3.8xlarge
                assert usd == "?" and not fits
            else:
                assert usd == f"{expected['usd']:.2f}" and fits == "+"  # moto's $0.00001/h fits any budget
    # The cheapest type per recipe: at moto's uniform price, the one that finishes first.
    for i, recipe in enumerate(recipes):
        priced = {t: cost.finish(recipe, t, next(iter(ec2_facts.spot_prices(ec2, t).values()), None))
                  for t in ec2_facts.TABLE_TYPES}
        best = min((f["usd"], t) for t, f in priced.items() if f["usd"] is not None)[1]
        rows = {line.split()[0]: re.findall(r"\d+\.\dh \$\S+", line) for line in lines if line[:1].isalpha()}
        marked = [t for t in priced if rows[t][i].endswith(("*", "*+"))]
        assert marked == [best], recipe.name
    # Every figure is footnoted: each GPU's throughput (kind and source), the published top-1, the price, the hours.
    for i, gpu in enumerate(["T4", "A10G", "L4", "L40S", "V100"]):
        figure = cost.THROUGHPUT_224[gpu]
        assert f"[{i + 1}] {gpu}: {figure.img_per_s:g} img/s per GPU at 224 px, estimated: {figure.source}" in lines
    assert "[6] published, not measured by this trainer: " + ", ".join(FAST) + " at 256 px, flip TTA: FFCV's" in out
    assert f"[7] spot price now in the cheapest availability zone of {REGION}" in out
    assert "[8] estimates, not quotes" in out
    offered = sum(bool(ec2_facts.spot_prices(ec2, t)) for t in ec2_facts.TABLE_TYPES)  # moto offers no spot p3
    assert f"+ within --budget-usd 12: {FAST[0]} on {offered} of 10 types" in out and 0 < offered < 10


def test_a_glob_matches_the_shipped_names_quoted_or_expanded_by_the_shell():
    assert cost.match_recipes(["imagenet-fast-*"]) == FAST
    in_recipes_folder = [f"{name}.yaml" for name in FAST]  # `imagenet-fast-*` expanded by a shell in recipes/
    assert [load_recipe(n).name for n in cost.match_recipes(in_recipes_folder)] == FAST
    assert cost.match_recipes(["imagenet-fast-1*,imagenet-100ep", "imagenet-fast-16"]) == [
        "imagenet-fast-16", "imagenet-100ep"]
    with pytest.raises(UserError, match="matches none of the shipped recipes"):
        cost.match_recipes(["imagenet-slow-*"])


@pytest.mark.parametrize("page, command", [
    ("README.md", "resnet50-recipe aws price --recipes imagenet-fast-24 imagenet-fast-56 imagenet-100ep "
                  "--instance-types g4dn.2xlarge,g5.2xlarge,g6.2xlarge,g6e.4xlarge --budget-usd 12 --dry-run"),
    ("docs/aws.md", "resnet50-recipe aws price --recipes 'imagenet-fast-*' --budget-usd 12 --dry-run")])
def test_the_tables_in_readme_and_docs_aws_md_are_what_the_dry_run_prints(page, command, capsys, monkeypatch):
    """README shows a few recipes and types, docs/aws.md all of them: each block is the command's own output."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # a dry run makes no call: any would fail
    assert main([word.strip("'") for word in command.split()[1:]]) == 0
    printed = capsys.readouterr().out.rstrip()
    assert "on-demand list price, us-east-1" in printed
    path = Path(__file__).parent.parent / page
    before, rest = path.read_text().split(f"$ {command}\n", 1)
    shown, after = rest.split("```", 1)
    shown = shown.rstrip("\n")
    if os.environ.get("REGENERATE_README") == "1":  # REGENERATE_README=1 pytest -k readme rewrites the blocks
        path.write_text(f"{before}$ {command}\n{printed}\n```{after}")
        shown = printed
    assert shown == printed


def test_auto_can_pick_the_l4_and_l40s_types(capsys, monkeypatch):
    """A dry run of `aws launch --instance-type auto` ranks every type of the table by its cost to finish at the list
    price (cost.finish, the disk included), g6 and g6e among them, and tries the cheapest first."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    assert main(["aws", "launch", "imagenet-fast-56", "--bucket", "s3://b/runs", "--data", "s3://b/in/",
                 "--instance-type", "auto", "--region", REGION, "--dry-run"]) == 0
    ranking = next(line for line in capsys.readouterr().out.splitlines() if "instance types by estimated cost" in line)
    ranked = [item.split()[0] for item in ranking.split(": ", 1)[1].split(", ")]
    assert {t for t in ranked if t.startswith(("g6.", "g6e."))} == {
        t for t in ec2_facts.INSTANCE_TYPES if t.startswith(("g6.", "g6e."))}
    costs = {t: cost.finish(load_recipe("imagenet-fast-56"), t, ec2_facts.INSTANCE_TYPES[t][3], disk_gb=300)
             for t in ec2_facts.INSTANCE_TYPES}
    assert ranked[0] == min((c["usd"], t) for t, c in costs.items() if c["usd"] is not None)[1]


def test_a_runs_measured_rate_replaces_its_gpus_estimate_from_a_local_run_and_from_s3(
        tiny_data, tmp_path, s3_endpoint, bucket, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "r1"),
                                               **{"export.enabled": "false", "train.steps_per_epoch": 3}))
    run = tmp_path / "r1"
    train(recipe, run, quiet=True)
    records = read_metrics(run / "metrics.jsonl")
    start = next(r for r in records if r["kind"] == "start")
    steps = [r for r in records if r["kind"] == "step"]
    # What the trainer records for this: the device and its GPUs in the start line, img/s and resolution per step.
    assert start["device"] == "cpu" and start["gpus"] == [] and start["world_size"] == 1
    assert {r["train_size"] for r in steps} == {32} and all(r["img_per_s"] > 0 for r in steps)
    with pytest.raises(UserError, match="no step record from a GPU"):
        cost.measured_rates(str(run))  # a CPU run measures no GPU
    # The same lines as a process on an L4 writes them (CUDA device, the GPU's name): the only difference a GPU
    # makes to metrics.jsonl. In the run directory, and in its copy in S3 (the trainer synced the run there).
    lines = [json.dumps({**r, "device": "cuda:0", "gpus": ["NVIDIA L4"]} if r["kind"] == "start" else r)
             for r in records]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    remote = f"s3://{bucket}/runs/r1"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    assert s3.head_object(Bucket=bucket, Key="runs/r1/metrics.jsonl")
    s3.put_object(Bucket=bucket, Key="runs/r1/metrics.jsonl", Body=(run / "metrics.jsonl").read_bytes())
    median = sorted(r["img_per_s"] for r in steps)[1]  # of 3
    fast56 = load_recipe("imagenet-fast-56")
    for source in (str(run), remote):
        measured = cost.measured_rates(source)
        assert set(measured) == {"L4"} and measured["L4"].kind == "measured"
        assert measured["L4"].by_size == ((32, pytest.approx(median)),)
        assert measured["L4"].at(160) == pytest.approx(median * (32 / 160) ** 2)
        assert main(["aws", "price", "--recipes", "imagenet-fast-56", "--instance-types", "g6.2xlarge,g4dn.2xlarge",
                     "--from-run", source, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"[1] L4: {measured['L4'].img_per_s:g} img/s per GPU at 224 px, measured: measured by {source}: " \
               f"median img/s per GPU of 3 step records at 32 px ({median:.0f}) (replaces the estimate, 400 img/s)" \
               in out, out
        assert "[2] T4: 427 img/s per GPU at 224 px, estimated" in out  # a GPU the run did not measure keeps its own
        hours = cost.finish(fast56, "g6.2xlarge", None, rates=measured)["hours"]
        assert hours == pytest.approx(sum(1_281_167 / measured["L4"].at(train_size_at(fast56.augment, e))
                                          for e in range(56)) / 3600)
        assert f"{hours:.1f}h $" in next(line for line in out.splitlines() if line.startswith("g6.2xlarge"))
