"""The journey as one piece: `aws launch` on the laptop to weights on the Hub, through the instance's user data,
its systemd unit, the trainer, S3 and the release, on the spot cloud of tests/journey.py. `make journey` runs
these alone and prints one line per scenario: its name, what it checked, and how long it took."""
import os
import shutil
import time

import boto3
import pytest
import torch
from helpers import last_step, start_hub
from journey import RESULTS, SCALE, SpotCloud, dependencies_dir
from safetensors.torch import load, load_file

from resnet50_recipe.cloud import api as cloud_api
from resnet50_recipe.cloud import instances, ship
from resnet50_recipe.cloud import launch as launcher
from resnet50_recipe.ec2 import INSTANCE_TYPES
from resnet50_recipe.errors import UserError

REGION = "us-east-1"
REPO = "journey-user/resnet-journey"

# The smoke recipe shrunk to 2 epochs of 16 steps at 32 px, deterministic on CPU (so that runs compare bitwise),
# with checkpoints every 2 steps and the trainer's stop deadline scaled as the unit's TimeoutStopSec is.
TINY = ["data.synthetic.classes=4", "data.synthetic.per_class=32", "data.synthetic.val_per_class=4",
        "data.synthetic.size=32", "data.workers=0", "train.epochs=2", "train.batch_size=8", "train.device=cpu",
        "train.deterministic=true", "augment.train_size=32", "augment.eval_size=32", "log.every_steps=1",
        "log.tensorboard=false", "checkpoint.every_steps=2", "checkpoint.every_epochs=1",
        f"checkpoint.stop_timeout_s={100 * SCALE:g}", "checkpoint.spot_poll_s=0.2"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return ship.build_wheel(ship._source(), tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def deps(tmp_path_factory):
    return dependencies_dir(tmp_path_factory.mktemp("deps") / "site")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    server, endpoint = start_hub(root)
    yield endpoint, root
    server.shutdown()


@pytest.fixture
def world(s3_endpoint, bucket, tmp_path, monkeypatch, deps, hub):
    """The laptop's AWS (moto through AWS_ENDPOINT_URL) and a SpotCloud for the run's instances."""
    if shutil.which("aws") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the AWS CLI is missing; .ci/run installs it from Debian")
        pytest.skip("the instance side needs the AWS CLI (apt-get install awscli, or pip install awscli)")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_journeytoken")
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=s3_endpoint)
    ami = ec2.register_image(Name="dlami-stand-in", RootDeviceName="/dev/sda1", Architecture="x86_64",
                             BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 8}}])["ImageId"]
    clouds = []

    def make(gpus=0):
        cloud = SpotCloud(tmp_path, s3_endpoint, REGION, ec2, deps, gpus, {"HF_ENDPOINT": hub[0]})
        clouds.append(cloud)
        return cloud

    yield {"ec2": ec2, "ami": ami, "bucket": bucket, "endpoint": s3_endpoint, "cloud": make, "hub": hub[1],
           "s3": boto3.client("s3", region_name=REGION, endpoint_url=s3_endpoint),
           "ssm": boto3.client("ssm", region_name=REGION, endpoint_url=s3_endpoint)}
    for cloud in clouds:
        cloud.close()


def launch(world, name, *extra, package=None, **kwargs):
    lines = []
    kwargs = {"ami": world["ami"], "region": REGION, "out": lines.append, "instance_type": "g4dn.xlarge",
              "push": REPO, **kwargs}
    result = launcher.launch("smoke", f"s3://{world['bucket']}/runs", name=name, overrides=[*TINY, *extra],
                             package=str(package) if package else None, **kwargs)
    return result, lines


def start(world, name, *extra, gpus=0, env=None, **kwargs):
    """`aws launch`, the persistent request EC2 opens for it, and the instance's first boot, on a machine whose
    nvidia-smi reports `gpus` GPUs (None: as many as the launched type has)."""
    cloud = world["cloud"]()
    cloud.instance_env.update(env or {})
    api = cloud_api.Api(REGION)
    # EC2 opens the persistent request within run_instances and names it in the answer, which aws launch records
    # for the instance's --end; moto opens none, so the answer gets the one Ec2.open_request opens.
    api.client("ec2").meta.events.register("after-call.ec2.RunInstances", lambda parsed, **_: [
        i.update(SpotInstanceRequestId=cloud.ec2.open_request(i["InstanceId"])) for i in parsed.get("Instances", [])])
    result, _ = launch(world, name, *extra, api=api, **kwargs)
    cloud.gpus = INSTANCE_TYPES[result["instance_type"]][1] if gpus is None else gpus
    return cloud, result, cloud.boot(result["instance_id"])


def run_until_down(cloud, machine, timeout=420):
    """Until the machine is halted or its unit stays down; the journal on failure."""
    done = {}

    def watch():
        machine.watch()
        done["ok"] = True

    import threading
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    thread.join(timeout)
    assert done.get("ok"), f"the run did not end in {timeout} s:\n{cloud.journal()[-4000:]}"


def status_text(name) -> str:
    lines = []
    instances.print_status(instances.run_status(name, REGION), out=lines.append)
    return "\n".join(lines)


def exits(machine) -> list[str]:
    return [s.get("exit_status") for s in machine.systemd.starts]


def record(name, checked, started):
    RESULTS.append((name, checked, time.time() - started))


def final_weights(world, name) -> dict:
    """The exported weights in S3."""
    got = world["s3"].get_object(Bucket=world["bucket"], Key=f"runs/{name}/export/model.safetensors")["Body"].read()
    return load(got)


def wait_for(condition, what, cloud, timeout=300):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"{what} did not happen in {timeout} s:\n{cloud.journal()[-3000:]}"
        time.sleep(0.2)


def run_dir(machine, name):
    return machine.disk / "data/runs" / name


def assert_same_as_happy(world, name):
    if not HAPPY:
        pytest.skip("compares with the happy path's weights: run the whole file (make journey)")
    weights = final_weights(world, name)
    assert weights.keys() == HAPPY.keys()
    different = [k for k in weights if not torch.equal(weights[k], HAPPY[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run's, e.g. {different[:3]}"


HAPPY: dict = {}


def test_happy_path_launch_train_export_push_release(world, wheel):
    started = time.time()
    cloud, result, machine = start(world, "happy")  # no --package: the checkout is built into a wheel and shipped
    run_until_down(cloud, machine)
    journal = cloud.journal()
    assert exits(machine) == ["0"], journal[-3000:]
    assert cloud.ec2.state(result["instance_id"]) in ("shutting-down", "terminated")
    assert cloud.ec2.open_requests("happy") == []
    params = world["ssm"].describe_parameters()["Parameters"]
    assert [p["Name"] for p in params if "hf-token" in p["Name"]] == [], "the Hub token outlived the run"
    assert world["s3"].head_object(Bucket=world["bucket"], Key="runs/happy/summary.json")
    assert "finished, nothing running, nothing billing except S3" in status_text("happy")
    pushed = world["hub"] / REPO
    weights = load_file(pushed / "model.safetensors")
    exported = final_weights(world, "happy")
    assert weights.keys() == exported.keys() and all(torch.equal(weights[k], exported[k]) for k in weights)
    import timm

    model = timm.create_model(f"local-dir:{pushed}", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    HAPPY.update(weights)
    record("happy path", "launch, set-up, train, export, push (weights load with timm), release; no instance, "
           "request or token left", started)


def test_a_spot_notice_mid_epoch_exits_75_in_time_and_the_same_instance_resumes_bitwise(world, wheel):
    started = time.time()
    cloud, result, machine = start(world, "notice", package=wheel)
    wait_for(lambda: last_step(run_dir(machine, "notice")) >= 3, "step 3", cloud)
    machine.systemd.pause()  # mid-epoch 1 of 16 steps, whatever the machine's speed
    deadline = cloud.interrupt(paused=True)
    first = machine.systemd.starts[0]
    assert first["exit_status"] == "75" and first["ended"] <= deadline, (first, deadline, cloud.journal()[-3000:])
    again = cloud.machine
    assert again.instance_id == machine.instance_id and again.disk == machine.disk
    run_until_down(cloud, again)
    assert exits(again) == ["0"], cloud.journal()[-3000:]
    assert_same_as_happy(world, "notice")
    record("spot notice", f"exit 75 {deadline - first['ended']:.1f} s before the notice's end; same instance and "
           "disk resume; final weights bitwise equal to the happy path's", started)


def test_a_lost_instance_is_replaced_by_an_empty_one_that_resumes_from_s3_bitwise(world, wheel):
    started = time.time()
    cloud, result, machine = start(world, "lost", package=wheel)

    def in_s3():
        listed = world["s3"].list_objects_v2(Bucket=world["bucket"], Prefix="runs/lost/checkpoints/")
        return last_step(run_dir(machine, "lost")) >= 5 and any(
            o["Key"].endswith(".pt") for o in listed.get("Contents", []))
    wait_for(in_s3, "a checkpoint in S3", cloud)
    machine.systemd.pause()  # before the run can end
    assert last_step(run_dir(machine, "lost")) < 31
    cloud.lose()
    fresh = cloud.machine
    assert fresh.instance_id != machine.instance_id and fresh.disk != machine.disk
    run_until_down(cloud, fresh)
    assert exits(fresh) == ["0"], cloud.journal()[-3000:]
    assert "resum" in cloud.journal().lower()
    assert_same_as_happy(world, "lost")
    record("lost instance", "a new instance with an empty disk resumes from S3 alone; final weights bitwise equal "
           "to the happy path's", started)


def test_a_crash_loop_ends_with_nothing_billing_but_s3_or_the_disk(world, wheel, tmp_path):
    started = time.time()
    broken = tmp_path / "broken"
    (broken / "timm").mkdir(parents=True)
    (broken / "timm" / "__init__.py").write_text("raise RuntimeError('a crash at every start')\n")
    # timm fails to import on this machine: every start of the trainer crashes with exit 1
    cloud, result, machine = start(world, "crash", package=wheel, env={"PYTHONPATH": str(broken)})
    run_until_down(cloud, machine)
    assert set(exits(machine)) == {"1"}, cloud.journal()[-3000:]
    state = cloud.ec2.state(result["instance_id"])
    assert state in ("stopping", "stopped", "shutting-down", "terminated"), \
        f"{len(exits(machine))} crashes, then the instance is still {state} (billing)"
    assert cloud.ec2.open_requests("crash") == [], "a persistent request would start the instance again"
    text = status_text("crash")
    assert ("powered off" in text) if state in ("stopping", "stopped") else ("nothing billing" in text), text
    assert [p for p in world["ssm"].describe_parameters()["Parameters"] if "crash" in p["Name"]] == []
    record("crash loop", f"{len(exits(machine))} starts exit 1, then the instance is {state} with its request "
           "cancelled; aws status says so", started)


@pytest.mark.parametrize("chosen", ["g4dn.12xlarge", "auto"])
def test_a_multi_gpu_type_runs_one_process_per_gpu(world, wheel, chosen):
    started = time.time()
    cloud, result, machine = start(world, f"multi-{chosen.split('.')[0]}", package=wheel, instance_type=chosen,
                                   gpus=None)
    wait_for(lambda: machine.systemd.starts and machine.systemd.starts[0]["argv"], "the trainer's start", cloud)
    argv = machine.systemd.starts[0]["argv"]
    machine.systemd.power_cut()
    gpus = cloud.gpus
    assert gpus > 1, f"auto chose {result['instance_type']}, a one-GPU type: pick a case that reaches several GPUs"
    assert argv[-2:] == ["--nproc-per-node", str(gpus)], argv
    record(f"{gpus}-GPU type ({chosen})", f"{result['instance_type']}, nvidia-smi lists {gpus}: the unit runs "
           f"`train ... --nproc-per-node {gpus}`", started)


@pytest.mark.parametrize("extra", [["export.repo_id=someone/model", "export.enabled=true"], ["log.wandb=true"]])
def test_a_recipe_that_could_only_fail_on_the_instance_is_refused_on_the_laptop(world, wheel, extra):
    started = time.time()
    with pytest.raises(UserError) as refused:
        launch(world, f"refused{len(extra[0])}", *extra, package=wheel, push=None)
    assert extra[0].split("=")[0] in str(refused.value)
    assert world["ec2"].describe_instances()["Reservations"] == [] or all(
        i["State"]["Name"] == "terminated" for r in world["ec2"].describe_instances()["Reservations"]
        for i in r["Instances"] if any(t["Value"].startswith("refused") for t in i.get("Tags", [])))
    listed = world["s3"].list_objects_v2(Bucket=world["bucket"], Prefix=f"runs/refused{len(extra[0])}/")
    assert listed.get("KeyCount", 0) == 0, "the refusal came after the launch had written to S3"
    record(f"refused: {extra[0].split('=')[0]}", f"aws launch refuses it before any AWS call: {refused.value}"[:110],
           started)


def test_the_budget_stops_the_run_with_exit_4_counting_every_starts_time_then_releases(world, wheel):
    started = time.time()
    # moto's spot price is $0.00001/h: a second of training costs ~3e-9 USD, so this budget ends the run after
    # its first epoch. (Through --set: `--budget-usd` would first refuse a budget below the estimate.)
    cloud, result, machine = start(world, "budget", "train.budget_usd=1e-10", package=wheel)
    wait_for(lambda: last_step(run_dir(machine, "budget")) >= 3, "step 3", cloud)
    machine.systemd.pause()
    cloud.interrupt(paused=True)  # a restart in the middle of the first epoch
    run_until_down(cloud, cloud.machine)
    assert exits(machine) == ["75"] and exits(cloud.machine) == ["4"], cloud.journal()[-3000:]
    assert cloud.ec2.state(result["instance_id"]) in ("shutting-down", "terminated")
    assert cloud.ec2.open_requests("budget") == []
    import json

    lines = world["s3"].get_object(Bucket=world["bucket"], Key="runs/budget/metrics.jsonl")["Body"].read()
    costs = [r["cost_usd"] for r in map(json.loads, lines.decode().splitlines()) if r.get("cost_usd") is not None]
    assert costs and all(b >= a for a, b in zip(costs, costs[1:])), f"the cost went back at a restart: {costs}"
    summary = json.loads(world["s3"].get_object(Bucket=world["bucket"], Key="runs/budget/summary.json")["Body"].read())
    assert summary["over_budget"] and summary["exit_status"] == 4
    record("budget", f"exit 4 after a restart, ${costs[-1]:.2e} counted without a step back; released", started)


def test_credentials_that_time_out_for_a_while_are_waited_for_not_taken_as_bad_input(world, wheel):
    from journey import Metadata

    started = time.time()
    cloud, result, machine = start(world, "creds", package=wheel)
    wait_for(lambda: machine.systemd.starts and machine.systemd.starts[0]["argv"], "the trainer's start", cloud)
    # From the trainer's start to the end, every credential fetch takes 3 s, where botocore's default gives up
    # after 1 s: the trainer's store and the end of the run (--end's AWS CLI) must both wait for them.
    Metadata.stall_credentials_until = time.time() + 3600
    run_until_down(cloud, machine)
    assert "2" not in exits(machine) and exits(machine)[-1] == "0", cloud.journal()[-3000:]
    assert cloud.ec2.state(result["instance_id"]) in ("shutting-down", "terminated")
    record("slow credentials", f"every fetch of the role's credentials takes 3 s: exits {', '.join(exits(machine))}, "
           "no exit 2; released", started)


def test_exit_2_mid_run_terminates_only_with_the_newest_checkpoint_in_s3(world, wheel, tmp_path):
    from helpers import jpeg_bytes

    started = time.time()
    s3, bucket = world["s3"], world["bucket"]
    for split, count in (("train", 32), ("val", 4)):
        for c in range(2):
            for i in range(count):
                s3.put_object(Bucket=bucket, Key=f"data/tiny/{split}/c{c}/{i}.jpg", Body=jpeg_bytes(c * 100 + i))
    # An image nobody can read, met by the first evaluation, after the epoch's checkpoints
    s3.put_object(Bucket=bucket, Key="data/tiny/val/c1/unreadable.jpg", Body=b"not a JPEG")
    cloud, result, machine = start(world, "bad", "data.synthetic=null", package=wheel,
                                   data=f"s3://{bucket}/data/tiny/")
    run_until_down(cloud, machine)
    assert exits(machine) == ["2"], cloud.journal()[-3000:]
    state = cloud.ec2.state(result["instance_id"])
    local = (run_dir(machine, "bad") / "checkpoints/latest.json").read_bytes()
    remote = s3.get_object(Bucket=bucket, Key="runs/bad/checkpoints/latest.json")["Body"].read()
    import json

    in_s3 = json.loads(local)["file"] == json.loads(remote)["file"]
    assert (state in ("shutting-down", "terminated")) == in_s3, (state, local, remote)
    assert state in ("shutting-down", "terminated", "stopping", "stopped") and cloud.ec2.open_requests("bad") == []
    assert s3.head_object(Bucket=bucket, Key="runs/bad/logs/train-exit-2.log")
    record("exit 2 mid-run", f"unreadable image after checkpoints: newest checkpoint in S3 {in_s3}, instance "
           f"{state}, request cancelled, log in S3", started)
