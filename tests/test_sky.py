"""`resnet50-recipe sky`: the managed job's YAML read by SkyPilot's own parser, its `run` section run on localhost
as two machines (stopped, resumed, bitwise the uninterrupted run), and `--launch` at SkyPilot's API boundary. No
test reaches a cloud: SkyPilot parses the task offline, and sky.jobs.launch is replaced by a recorder."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest
import yaml
from helpers import args_for, assert_same_tree, final_state, free_port, output_of, worker_pids

from resnet50_recipe import load_recipe
from resnet50_recipe.cli import main
from resnet50_recipe.cloud import sky_job
from resnet50_recipe.data.synthetic import generate
from resnet50_recipe.errors import EXIT_PREEMPTED


def skypilot():
    """SkyPilot, which the [sky] extra installs, in a venv of its own (setup.cfg says why): .ci/run's sky pass runs
    these tests there with RESNET50_RECIPE_SKY_PASS=1, which makes a missing SkyPilot a failure; elsewhere they skip."""
    try:
        import sky
    except ImportError:
        if os.environ.get("RESNET50_RECIPE_SKY_PASS") == "1":
            pytest.fail("SkyPilot is missing from the sky pass's venv (.ci/run sky_pass installs the [sky] extra)")
        pytest.skip("SkyPilot is not installed here: .ci/run's sky pass runs this test (bash .ci/run sky)")
    return sky


RELEASE = "resnet50-recipe[aws]==0.1"  # --package: a spec, so that no test builds a wheel


@pytest.mark.parametrize("nodes", [1, 4])
def test_skypilots_own_parser_reads_the_task_for_one_machine_and_four(nodes, tmp_path, monkeypatch):
    sky = skypilot()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # SkyPilot's state (~/.sky) in the test's folder
    clouds = "aws" if nodes == 1 else "aws,gcp"
    task, notes = sky_job.sky_job("imagenet-100ep", "s3://my-bucket/runs", nodes=nodes, gpus="T4:1,A10G:1",
                                  clouds=clouds, data="s3://my-bucket/imagenet/", package=RELEASE,
                                  push="me/r50" if nodes == 4 else None, files=tmp_path / "files")
    config = yaml.safe_load(sky_job.to_text(task, notes))
    assert config == task
    parsed = sky.Task.from_yaml_config(copy.deepcopy(config))  # SkyPilot's schema validation included

    assert parsed.num_nodes == nodes
    resources = list(parsed.resources)
    assert len(resources) == 2 * len(clouds.split(","))
    assert {r.cloud.canonical_name() for r in resources} == set(clouds.split(","))
    assert {tuple(r.accelerators.items()) for r in resources} == {(("T4", 1),), (("A10G", 1),)}
    assert all(r.use_spot and r.disk_size == 300 for r in resources)
    assert {json.dumps(r.job_recovery, sort_keys=True) for r in resources} == {json.dumps(
        {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 3, "recover_on_exit_codes": [75, 74]},
        sort_keys=True)}
    # any_of, cheapest estimated cost to finish first (cost.finish on the cheapest EC2 type of each)
    recipe = load_recipe("imagenet-100ep")
    costs = {g: sky_job.cost_to_finish(recipe, g, 1, nodes)["usd"] for g in ("T4", "A10G")}
    assert [c["accelerators"] for c in config["resources"]["any_of"]][:1] == [f"{min(costs, key=costs.get)}:1"]
    assert costs["T4"] != costs["A10G"]
    assert parsed.envs == {"RUN": "imagenet-100ep", "REMOTE": "s3://my-bucket/runs/imagenet-100ep",
                           "MASTER_PORT": "29400"}
    refs = {ref.name for ref in parsed._managed_secret_refs}  # no value: given at launch, never in the YAML
    assert refs == (set() if nodes == 1 else {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
    assert parsed.file_mounts == {sky_job.LAUNCH_FILES: str(tmp_path / "files")}
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["recipe.yaml", "setup.sh"]
    assert "bash setup.sh --setup" in parsed.setup and "--nnodes \"$SKYPILOT_NUM_NODES\"" in parsed.run
    assert f'ROOT="{sky_job.ROOT}"' in parsed.run  # where setup leaves the package, the recipe and the data
    setup = (tmp_path / "files" / "setup.sh").read_text()
    assert f"PACKAGE='{RELEASE}'" in setup and "LAUNCH_FILES=.\n" in setup and "DATA=s3://my-bucket/imagenet/" in setup
    assert any(n.startswith("estimated cost to finish on the first candidate") for n in notes), notes
    assert any("sky-jobs-controller" in n for n in notes), notes


def test_a_budget_the_trainer_cannot_price_is_said_and_one_it_can_goes_into_the_recipe(tmp_path):
    _, notes = sky_job.sky_job("imagenet-100ep", "s3://b/runs", nodes=2, clouds="aws,gcp", data="s3://b/in/",
                               package=RELEASE, budget_usd=1000, files=tmp_path / "a")
    assert any("checked against the estimate only" in n and "another cloud" in n for n in notes), notes
    assert "budget_usd: null" in (tmp_path / "a" / "recipe.yaml").read_text()
    for nodes in (1, 4):  # on AWS the trainer prices its instance times the machines (budget.InstanceCost)
        _, notes = sky_job.sky_job("imagenet-100ep", "s3://b/runs", nodes=nodes, data="s3://b/in/", package=RELEASE,
                                   budget_usd=1000, files=tmp_path / f"b{nodes}")
        assert "budget_usd: 1000" in (tmp_path / f"b{nodes}" / "recipe.yaml").read_text()
        assert any(f"priced on EC2 for {nodes} machine" in n for n in notes), notes
    with pytest.raises(sky_job.UserError, match="--budget-usd 5: the estimate"):
        sky_job.sky_job("imagenet-100ep", "s3://b/runs", data="s3://b/in/", package=RELEASE, budget_usd=5,
                        files=tmp_path / "c")


def test_candidates_with_different_gpu_counts_are_refused_before_anything_is_written(tmp_path, capsys):
    """A recovery onto a candidate with another GPU count would change the global batch, which a resume refuses
    (exit 2, final): the job would end unfinished at its first such recovery. Refused in one line at once."""
    with pytest.raises(sky_job.UserError, match=r"--gpus A10G:4,T4:1: .*4 and 1 GPUs per machine"):
        sky_job.parse_gpus("A10G:4,T4:1")
    assert main(["sky", "smoke", "--bucket", "s3://b/runs", "--gpus", "A10G:4,T4:1", "--package", RELEASE,
                 "--out", str(tmp_path / "job.yaml")]) == 2
    assert "4 and 1 GPUs per machine" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert sky_job.parse_gpus("A10G:4,L4:4, T4:4") == [("A10G", 4), ("L4", 4), ("T4", 4)]


def test_launch_submits_the_task_through_sky_jobs_launch_with_the_token_as_a_secret(tmp_path, monkeypatch, capsys):
    sky = skypilot()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
    submitted = []
    monkeypatch.setattr(sky.jobs, "launch", lambda task, name=None, **kw: submitted.append((task, name)) or "req-1")
    out = tmp_path / "job.yaml"
    code = main(["sky", "smoke", "--bucket", "s3://my-bucket/runs", "--nodes", "2", "--gpus", "A10G:1",
                 "--push", "me/smoke", "--package", RELEASE, "--out", str(out), "--launch"])
    assert code == 0
    [(task, name)] = submitted
    assert name == "smoke" and isinstance(task, sky.Task) and task.num_nodes == 2
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == {"HF_TOKEN": "hf_stand_in_token"}
    assert "hf_stand_in_token" not in out.read_text() and "HF_TOKEN: null" in out.read_text()
    assert [(r.use_spot, r.accelerators) for r in task.resources] == [(True, {"A10G": 1})]
    assert task.run == yaml.safe_load(out.read_text())["run"]
    assert "request req-1" in capsys.readouterr().out


def test_launch_without_skypilot_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sky", None)  # as if not installed
    code = main(["sky", "smoke", "--bucket", "s3://b/runs", "--package", RELEASE, "--out", str(tmp_path / "j.yaml"),
                 "--launch"])
    assert code == 2
    assert "--launch needs SkyPilot: pip install 'resnet50-recipe[sky]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The run section on two "machines" of localhost


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "shapes", classes=4, per_class=48, val_per_class=7, size=32)


def machines(data, root, bucket, endpoint, run: str, job: str = "sky-managed-1_job") -> list[subprocess.Popen]:
    """The generated job's `run` section started as SkyPilot starts it on two machines: bash, with the task's envs
    and SkyPilot's variables (`job`: SKYPILOT_TASK_ID, which a managed job keeps across recoveries), each machine
    with its own home folder that holds what setup leaves there (the recipe, the dataset, the package's command).
    The AWS CLI (the run's logs/end.json) talks to moto's server."""
    settings = args_for(data, "unused", 2, **{"checkpoint.endpoint_url": endpoint})[4:]
    overrides = [settings[i + 1] for i in range(0, len(settings), 2)]
    task, _ = sky_job.sky_job("smoke", f"s3://{bucket}/runs", name=run, overrides=overrides, nodes=2,
                              data=f"s3://{bucket}/data/", package=RELEASE, files=root / "files")
    port, nodes = free_port(), []
    for rank in (0, 1):
        home = root / f"node{rank}"
        opt = home / "resnet50-recipe" / "opt" / "resnet50-recipe"
        (opt / "venv" / "bin").mkdir(parents=True, exist_ok=True)
        (opt / "recipe.yaml").write_text((root / "files" / "recipe.yaml").read_text())
        command = opt / "venv" / "bin" / "resnet50-recipe"
        command.write_text(f'#!/bin/sh\nexec {sys.executable} -m resnet50_recipe "$@"\n')
        command.chmod(0o755)
        dataset = home / "resnet50-recipe" / "data" / "dataset"
        if not dataset.exists():
            dataset.parent.mkdir(parents=True, exist_ok=True)
            dataset.symlink_to(data)
        env = {**os.environ, **task["envs"], "MASTER_PORT": str(port), "HOME": str(home),
               "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",
               "SKYPILOT_NUM_GPUS_PER_NODE": "1", "SKYPILOT_TASK_ID": job, "AWS_ENDPOINT_URL": endpoint}
        nodes.append(subprocess.Popen(["bash", "-c", task["run"]], cwd=home, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return nodes


def run_dir(root, run):
    return root / "node0" / "resnet50-recipe" / "data" / "runs" / run


def test_the_run_section_on_two_machines_stops_on_sigterm_and_resumes_bitwise(data, s3_endpoint, bucket, tmp_path):
    reference = machines(data, tmp_path / "reference", bucket, s3_endpoint, "reference")
    logs = [output_of(node, 600) for node in reference]
    assert [node.returncode for node in reference] == [0, 0], logs

    root = tmp_path / "stopped"
    nodes = machines(data, root, bucket, s3_endpoint, "stopped")
    metrics, deadline = run_dir(root, "stopped") / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 14):
        time.sleep(0.02)
    ranks = worker_pids(nodes[1].pid)
    assert set(ranks) == {1}, ranks
    os.kill(ranks[1], signal.SIGTERM)  # the second machine's rank: the ranks agree on the stop
    logs = [output_of(node, 120) for node in nodes]
    # Both machines exit 75, which the job's recover_on_exit_codes reads: SkyPilot relaunches, not fails.
    assert [node.returncode for node in nodes] == [EXIT_PREEMPTED] * 2, logs
    stopped = final_state(run_dir(root, "stopped"))
    assert 10 < stopped["global_step"] < 20 and stopped["step_in_epoch"] > 0, logs

    # SkyPilot's relaunch runs the same section again, on fresh machines: the run resumes from S3
    resumed = machines(data, tmp_path / "relaunched", bucket, s3_endpoint, "stopped")
    logs = [output_of(node, 600) for node in resumed]
    assert [node.returncode for node in resumed] == [0, 0], logs
    assert "resuming from" in logs[0]
    a, b = (final_state(run_dir(tmp_path / "reference", "reference")),
            final_state(run_dir(tmp_path / "relaunched", "stopped")))
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "loop", "rng", "best", "global_step"):
        assert_same_tree(a[key], b[key], key)


def test_exit_2_ends_the_job_for_good_and_a_new_job_of_the_run_starts_again(data, s3_endpoint, bucket, tmp_path):
    """SkyPilot retries every exit outside recover_on_exit_codes: the run section makes 2 and 3 final for the job
    (logs/end.json with its SKYPILOT_TASK_ID), and a new job (a new id) of the same run trains again."""
    empty = tmp_path / "empty"  # a dataset folder without train/ and val/: exit 2, on both machines
    empty.mkdir()
    first = machines(empty, tmp_path / "first", bucket, s3_endpoint, "bad")
    logs = [output_of(node, 300) for node in first]
    assert [node.returncode for node in first] == [2, 2], logs
    ended = json.loads(boto3.client("s3", endpoint_url=s3_endpoint).get_object(
        Bucket=bucket, Key="runs/bad/logs/end.json")["Body"].read())
    assert ended == {"state": "ended", "reason": "exit 2 is final", "exit_status": "2", "job": "sky-managed-1_job"}

    retried = machines(empty, tmp_path / "retried", bucket, s3_endpoint, "bad")  # SkyPilot's retry of the job
    logs = [output_of(node, 60) for node in retried]
    assert [node.returncode for node in retried] == [2, 2], logs
    assert all("this job's run has ended for good, not retried" in log and "lineage" not in log for log in logs), logs

    again = machines(empty, tmp_path / "again", bucket, s3_endpoint, "bad", job="sky-managed-2_job")
    logs = [output_of(node, 300) for node in again]
    assert [node.returncode for node in again] == [2, 2] and "ended for good" not in logs[0], logs
