"""DDP where the ranks do not share everything: rank 0 working alone for longer than the process group's timeout
while the others wait for it, and two machines (two torchrun nodes on localhost), each with its own run directory,
resuming after a stop."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
import torch
from helpers import (
    MetadataStandIn,
    args_for,
    assert_same_tree,
    final_state,
    free_port,
    output_of,
    remote_args,
    worker_pids,
)

from resnet50_recipe.data.synthetic import generate
from resnet50_recipe.errors import EXIT_PREEMPTED


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "shapes", classes=4, per_class=48, val_per_class=7, size=32)


# torch's default process-group timeout (10 minutes) made short, so that a test can outlast it: the trainer
# started under torchrun through this script sees torch with a default of argv[1] seconds.
SHORT_DEFAULT = """
import sys
from datetime import timedelta
import torch.distributed.distributed_c10d as c10d
c10d.default_pg_timeout = timedelta(seconds=float(sys.argv[1]))
from resnet50_recipe.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_ranks_wait_out_a_push_longer_than_the_process_groups_timeout(data, hub, tmp_path, monkeypatch):
    # The Hub answers the push's commit after 30 s, past the (shortened) 20 s default: rank 1 waits in the finish's
    # collective all that time, and must neither time out nor get rank 0 killed in the middle of the push.
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
    hub.handler.delay_s = 30.0
    script = tmp_path / "short_default.py"
    script.write_text(SHORT_DEFAULT)
    out = tmp_path / "run"
    settings = {"train.epochs": 1, "export.enabled": "true", "export.repo_id": "me/slow", "log.tensorboard": "false"}
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                "2", str(script), "20", *args_for(data, out, 2, **settings)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = output_of(process, 600)
    assert process.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pushed"] == "me/slow" and summary["exit_status"] == 0, summary
    assert (hub.root / "me/slow/model.safetensors").read_bytes() == (out / "export/model.safetensors").read_bytes()


def two_nodes(data, root, remote: dict, envs: tuple[dict, dict] = ({}, {})) -> list[subprocess.Popen]:
    """Two torchrun nodes of one process each on localhost, node N in its own working directory root/nodeN with
    the same relative --output and environment envs[N], as on two machines: neither sees the other's run
    directory."""
    port, nodes = free_port(), []
    for node in (0, 1):
        cwd = root / f"node{node}"
        cwd.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "-m", "resnet50_recipe", *args_for(data, "run", 2, **remote)]
        nodes.append(subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, env={**os.environ, **envs[node]}))
    return nodes


def outputs(nodes, timeout=600) -> list[str]:
    return [output_of(node, timeout) for node in nodes]


def test_two_machines_with_their_own_output_resume_bitwise_the_uninterrupted_run(data, s3_endpoint, bucket, tmp_path):
    reference = two_nodes(data, tmp_path / "reference", remote_args(bucket, s3_endpoint, "reference"))
    logs = outputs(reference)
    assert [node.returncode for node in reference] == [0, 0], logs

    root, remote = tmp_path / "stopped", remote_args(bucket, s3_endpoint, "stopped")
    nodes = two_nodes(data, root, remote)
    metrics, deadline = root / "node0/run/metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 14):
        time.sleep(0.02)
    ranks = worker_pids(nodes[1].pid)
    assert set(ranks) == {1}, ranks
    os.kill(ranks[1], signal.SIGTERM)  # rank 1, on the second machine: the ranks agree on the stop
    logs = outputs(nodes, 120)
    assert json.loads((root / "node0/run/summary.json").read_text())["exit_status"] == EXIT_PREEMPTED, logs
    stopped = final_state(root / "node0/run")
    assert 10 < stopped["global_step"] < 20 and stopped["step_in_epoch"] > 0, logs  # mid-epoch 2
    assert len(stopped["rng"]) == 2 and not torch.equal(stopped["rng"][0]["torch"], stopped["rng"][1]["torch"])

    resumed = two_nodes(data, root, remote)
    logs = outputs(resumed)
    assert [node.returncode for node in resumed] == [0, 0], logs
    assert "resuming from" in logs[0] and "RNG states of" not in logs[0]
    a, b = final_state(tmp_path / "reference/node0/run"), final_state(root / "node0/run")
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "loop", "rng", "best", "global_step"):
        assert_same_tree(a[key], b[key], key)
    # The second machine writes nothing, and so has nothing to fight the first over in S3: no lock, no metrics.
    assert not any((root / "node1").iterdir()) and not any((tmp_path / "reference/node1").iterdir())


class Kept(MetadataStandIn):  # the first machine's metadata service: no notice
    notice = rebalance = None
    requests = []


class Reclaimed(MetadataStandIn):  # the second machine's: the notice comes here only
    notice = rebalance = None
    requests = []


def test_a_spot_notice_that_reaches_only_the_second_machine_stops_every_rank_with_one_checkpoint(data, tmp_path):
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (Kept, Reclaimed)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        envs = tuple({"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{s.server_port}"} for s in servers)
        nodes = two_nodes(data, tmp_path, {"checkpoint.spot_notice": "on", "checkpoint.spot_poll_s": 0.2,
                                           "train.epochs": 20}, envs)
        metrics, deadline = tmp_path / "node0/run/metrics.jsonl", time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 3):
            time.sleep(0.02)
        Reclaimed.notice = {"action": "terminate", "time": "2099-01-01T00:00:00Z"}
        logs = outputs(nodes, 120)
    finally:
        for server in servers:
            server.shutdown()
    assert any("spot/instance-action" in r for r in Reclaimed.requests), Reclaimed.requests  # watched on node 1
    summary = json.loads((tmp_path / "node0/run/summary.json").read_text())
    assert summary["exit_status"] == EXIT_PREEMPTED and summary["global_step"] < 20 * 10, (summary, logs)
    assert [node.returncode for node in nodes] == [1, 1], logs  # plain torchrun: a worker's 75 reads as 1


AGREE = """
import json, sys, time
import torch, torch.distributed as dist
from resnet50_recipe.trainer.runtime import Runtime
from resnet50_recipe.trainer.step import agreed_stop
from resnet50_recipe.trainer.stop import StopControl
dist.init_process_group("gloo")
rank = dist.get_rank()
rt = Runtime(torch.device("cpu"), None, rank, dist.get_world_size())
control = StopControl(timeout_s=100.0)
if rank == 1:  # the spot notice, on this machine only: the instance goes in 7 s
    control.request_stop("EC2 spot interruption notice", time.time() + 7)
stopped = agreed_stop(rt, control)
first = control.stop_deadline()
time.sleep(1.5)
print(json.dumps({"rank": rank, "stopped": stopped, "reason": control.reason, "left": first - time.time() + 1.5,
                  "same": control.stop_deadline() == first}), flush=True)
"""


def test_a_stop_agreed_from_another_machine_has_that_machines_deadline_once(tmp_path):
    """A notice on the second machine is every rank's stop, and its deadline too: rank 0 stops by the notice's time
    (sent as seconds left, since the machines' clocks differ), fixed once, not `stop_timeout_s` from each wait."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script)], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stdout + process.stderr
    ranks = {r["rank"]: r for r in (json.loads(line) for line in process.stdout.splitlines() if line.startswith("{"))}
    assert ranks[0]["stopped"] and ranks[1]["stopped"], ranks
    assert 5 < ranks[0]["left"] <= 7.0 and ranks[0]["same"], ranks[0]
    assert "another" in ranks[0]["reason"] and ranks[1]["reason"] == "EC2 spot interruption notice", ranks
