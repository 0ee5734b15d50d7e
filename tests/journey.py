"""A spot cloud on one machine, for tests/test_journey.py (`make journey`): `aws launch` on the laptop, then the
instance side as it runs on EC2, every link a real part where one exists.

- AWS is one moto server (EC2, IAM, SSM, STS, S3) over HTTP; the launcher's boto3, the instance's AWS CLI and the
  trainer's boto3 all talk to it. moto opens no spot request for run_instances' spot options, so `Ec2.open_request`
  records the persistent request EC2 would open, bound to the launched instance.
- The instance's metadata service (IMDSv2) is `Metadata`: token, identity, placement, the role's credentials,
  and the spot notice and rebalance recommendation that the scenario posts.
- The instance runs the rendered user data under bash as cloud-init runs it (first boot only), in a temporary
  root (RESNET50_RECIPE_ROOT); `systemctl` is a stand-in that records its calls, and `Systemd` runs the unit file
  it wrote by the directives systemd documents. A stopped instance keeps its root; a lost one gets a new, empty one.
- The package arrives as `aws launch` ships it (the wheel through the run's prefix) and is pip-installed into the
  instance's venv with no index: its dependencies (torch, timm, ...) are not downloaded, the venv sees this test
  venv's site-packages, minus this package, through a .pth file that the `python3` stand-in adds to each venv.

Times are systemd's and EC2's, times SCALE: RestartSec=120 becomes 6 s, a two-minute spot notice 6 s.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path

from helpers import MetadataStandIn

SCALE = 1 / 20
UNIT_NAME = "resnet50-recipe-train.service"
ACCOUNT = "123456789012"  # moto's default account
# (scenario, what it checked, seconds): conftest.py's pytest_terminal_summary prints one line each (`make journey`)
RESULTS: list[tuple[str, str, float]] = []


# ---------------------------------------------------------------------------------------------------------
# systemd


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as (key, value) lists, in order, with continuation lines joined (systemd.syntax(7))."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current, pending = None, ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def timespan(value: str) -> float:
    """systemd.time(7) spans: "120" (seconds), "5min", "2h 30s", "infinity"."""
    if value == "infinity":
        return float("inf")
    units = {"": 1, "s": 1, "sec": 1, "ms": 1e-3, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)\s*([a-z]*)", value))


def expand(line: str, env: dict) -> tuple[list[str], str]:
    """An Exec*= line as systemd.service(5) reads it: its prefixes ("-" ignores failure), then words split with
    quotes, where "$$" is a literal "$", "${NAME}" is replaced inside a word, and a word that is "$NAME" alone
    becomes the value's whitespace-separated words."""
    prefixes = re.match(r"[-@:+!]*", line).group(0)
    words = []
    for word in shlex.split(line[len(prefixes):]):
        word = word.replace("$$", "\0")
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            words += env.get(alone.group(1), "").split()
            continue
        word = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word)
        words.append(word.replace("\0", "$"))
    return words, prefixes


class Systemd:
    """One service unit run by its own directives, read from the unit file (systemd.service(5), systemd.unit(5),
    systemd.kill(5)): ConditionPathExists, ExecStartPre, ExecStart, Environment/EnvironmentFile, WorkingDirectory,
    Restart= with SuccessExitStatus, RestartForceExitStatus and RestartPreventExitStatus, RestartSec, the start
    limit and StartLimitAction, ExecStopPost with $EXIT_CODE/$EXIT_STATUS/$SERVICE_RESULT, and on a stop KillMode=mixed:
    KillSignal to the main process, SIGKILL to the rest after TimeoutStopSec. Processes of one start share a
    process group, the stand-in for the unit's cgroup. `manager_env` is the manager's DefaultEnvironment=."""

    CLEAN_SIGNALS = {"SIGHUP", "SIGINT", "SIGTERM", "SIGPIPE"}

    def __init__(self, unit_path: Path, manager_env: dict, log, on_action=None):
        self.unit = parse_unit(unit_path.read_text())
        self.manager_env, self.log = manager_env, log
        self.on_action = on_action or (lambda action: None)  # StartLimitAction=, for the machine to carry out
        self.main: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.cut = threading.Event()  # the power is gone: no ExecStopPost, no restart
        self.starts: list[dict] = []  # per start: argv of ExecStart, exit, result
        self.result: str | None = None  # the unit's final result, once it stays down
        self.thread: threading.Thread | None = None

    def values(self, section: str, key: str) -> list[str]:
        found = []
        for k, v in self.unit.get(section, []):
            if k == key:
                found = [] if v == "" else found + [v]  # an empty assignment resets the list
        return found

    def value(self, section: str, key: str, default: str | None = None) -> str | None:
        found = self.values(section, key)
        return found[-1] if found else default

    def statuses(self, key: str) -> set[str]:
        return {w for v in self.values("Service", key) for w in v.split()}

    def environment(self) -> dict:
        env = dict(self.manager_env)
        for value in self.values("Service", "Environment"):
            env.update(w.split("=", 1) for w in shlex.split(value))
        for value in self.values("Service", "EnvironmentFile"):
            path = Path(value.lstrip("-"))
            if not path.exists():
                if value.startswith("-"):
                    continue
                raise FileNotFoundError(f"EnvironmentFile={value}")
            for line in path.read_text().splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    key, _, val = line.partition("=")
                    env[key.strip()] = val.strip().strip('"')
        return env

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="systemd", daemon=True)
        self.thread.start()

    def run(self) -> None:
        interval = timespan(self.value("Unit", "StartLimitIntervalSec", "10")) * SCALE
        burst = int(self.value("Unit", "StartLimitBurst", "5"))
        started: deque = deque()
        while not self.stopping.is_set():
            now = time.monotonic()
            while started and now - started[0] > interval:
                started.popleft()
            if interval > 0 and burst > 0 and len(started) >= burst:
                self.result = "start-limit-hit"
                self.log(f"systemd: {UNIT_NAME}: start request repeated too quickly (start-limit-hit)")
                self.on_action(self.value("Unit", "StartLimitAction", "none"))
                return
            unmet = self.unmet_condition()
            if unmet:  # systemd.unit(5): a failed condition skips the start, without failing the unit
                self.result = "condition"
                self.log(f"systemd: {UNIT_NAME}: start condition unmet ({unmet}), skipped")
                return
            started.append(now)
            code, status, result = self.run_once()
            if self.cut.is_set():
                return  # the machine is gone: nothing runs after
            restart = self.should_restart(code, status, result)
            self.starts[-1].update(exit_code=code, exit_status=status, result=result, restart=restart,
                                   ended=time.time())
            self.stop_post(code, status, result)
            if not restart:
                self.result = result
                return
            self.stopping.wait(timespan(self.value("Service", "RestartSec", "0.1")) * SCALE)

    def unmet_condition(self) -> str | None:
        """The first ConditionPathExists= that does not hold ("!" negates), or None."""
        for value in self.values("Unit", "ConditionPathExists"):
            negated = value.startswith("!")
            if Path(value.lstrip("!")).exists() == negated:
                return f"ConditionPathExists={value}"
        return None

    def run_once(self) -> tuple[str, str, str]:
        """ExecStartPre then ExecStart; (EXIT_CODE, EXIT_STATUS, SERVICE_RESULT)."""
        self.starts.append({"argv": None})
        cwd = self.value("Service", "WorkingDirectory")
        for line in self.values("Service", "ExecStartPre"):
            # EnvironmentFile= is read again before each state's processes (systemd.exec(5)): a file that
            # ExecStartPre writes is in ExecStart's environment.
            env = self.environment()
            argv, prefixes = expand(line, env)
            done = self.spawn(argv, env, cwd)
            if done.returncode != 0 and "-" not in prefixes:
                return self.outcome(done.returncode)
        env = self.environment()
        argv, _ = expand(self.value("Service", "ExecStart"), env)
        self.starts[-1]["argv"] = argv
        return self.outcome(self.spawn(argv, env, cwd).returncode)

    def spawn(self, argv: list[str], env: dict, cwd: str | None) -> subprocess.Popen:
        with open(self.manager_env["JOURNAL"], "ab") as journal:
            self.main = subprocess.Popen(argv, env=env, cwd=cwd, stdout=journal, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.main.wait()
        return self.main

    def outcome(self, returncode: int) -> tuple[str, str, str]:
        if returncode < 0:
            name = signal.Signals(-returncode).name
            clean = name in self.CLEAN_SIGNALS | self.statuses("SuccessExitStatus")
            return "killed", name.removeprefix("SIG"), "success" if clean else "signal"
        clean = returncode == 0 or str(returncode) in self.statuses("SuccessExitStatus")
        return "exited", str(returncode), "success" if clean else "exit-code"

    def should_restart(self, code: str, status: str, result: str) -> bool:
        """systemd.service(5), Restart=: the prevent list wins, then the force list, then the policy."""
        if self.stopping.is_set() or status in self.statuses("RestartPreventExitStatus"):
            return False
        if status in self.statuses("RestartForceExitStatus"):
            return True
        policy = self.value("Service", "Restart", "no")
        return {"always": True, "on-failure": result != "success", "on-abnormal": code == "killed",
                "on-abort": result == "signal", "on-success": result == "success"}.get(policy, False)

    def stop_post(self, code: str, status: str, result: str) -> None:
        env = {**self.environment(), "EXIT_CODE": code, "EXIT_STATUS": status, "SERVICE_RESULT": result}
        for line in self.values("Service", "ExecStopPost"):
            argv, _ = expand(line, env)
            self.spawn(argv, env, self.value("Service", "WorkingDirectory"))

    def stop(self) -> None:
        """`systemctl stop` (and a shutdown): KillSignal to the main process (KillMode=mixed), SIGKILL to the whole
        group after TimeoutStopSec, then ExecStopPost (run by the loop), and no restart."""
        self.stopping.set()
        main = self.main
        if main is None or main.poll() is not None:
            return
        kill_signal = getattr(signal, self.value("Service", "KillSignal", "SIGTERM"))
        mode = self.value("Service", "KillMode", "control-group")
        try:
            if mode == "mixed":
                os.kill(main.pid, kill_signal)
            else:
                os.killpg(main.pid, kill_signal)
        except ProcessLookupError:
            return
        try:
            main.wait(timespan(self.value("Service", "TimeoutStopSec", "90")) * SCALE)
        except subprocess.TimeoutExpired:
            self.log(f"systemd: {UNIT_NAME}: stop timed out; killing")
        self.kill_all()

    def pause(self, paused: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the running processes: lets a scenario act at a step of its choosing."""
        if self.main is not None and self.main.poll() is None:
            os.killpg(self.main.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def power_cut(self) -> None:
        self.cut.set()
        self.stopping.set()
        self.kill_all()

    def kill_all(self) -> None:
        if self.main is not None:
            try:
                os.killpg(self.main.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


# ---------------------------------------------------------------------------------------------------------
# The instance metadata service


class Metadata(MetadataStandIn):
    """IMDSv2 of the instance that runs now: its id, type, placement, lifecycle, the run role's credentials (which
    a scenario may stall past botocore's timeout), the spot notice and the rebalance recommendation."""
    instance: dict = {}
    role = ""
    stall_credentials_until = 0.0

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._send(401, "")
        prefix = "/latest/meta-data/"
        path = self.path[len(prefix):] if self.path.startswith(prefix) else None
        i = type(self).instance
        values = {"instance-id": i.get("id"), "instance-type": i.get("type"), "instance-life-cycle": "spot",
                  "placement/availability-zone": i.get("az"), "placement/region": i.get("region"),
                  "iam/security-credentials/": type(self).role}
        if path == f"iam/security-credentials/{type(self).role}":
            if time.time() < type(self).stall_credentials_until:
                time.sleep(3)  # past botocore's 1 s timeout: the fetch fails, as a slow metadata service makes it
            expires = (datetime.now(timezone.utc) + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
            return self._send(200, json.dumps({"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "testing",
                                               "SecretAccessKey": "testing", "Token": "testing", "Expiration": expires,
                                               "LastUpdated": expires}))
        if values.get(path):
            return self._send(200, str(values[path]))
        return super().do_GET()


def start_metadata() -> tuple[ThreadingHTTPServer, str]:
    Metadata.requests, Metadata.notice, Metadata.rebalance = [], None, None
    Metadata.stall_credentials_until = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


# ---------------------------------------------------------------------------------------------------------
# EC2's side: the persistent request, stops and starts, a lost instance


class Ec2:
    """What EC2 does that moto does not: the persistent spot request of run_instances' spot options, and the
    instance it starts again (with its disk) after a stop, or anew (with an empty disk) after a loss."""

    def __init__(self, client, region: str):
        from moto.backends import get_backend

        self.client, self.region = client, region
        self.backend = get_backend("ec2")[ACCOUNT][region]

    def describe(self, instance_id: str) -> dict:
        return self.client.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    def state(self, instance_id: str) -> str:
        return self.describe(instance_id)["State"]["Name"]

    def open_request(self, instance_id: str) -> str:
        """The request EC2 opens with run_instances' persistent spot options, tagged from its TagSpecifications."""
        from unittest import mock

        from moto.ec2.models.spot_requests import SpotInstanceRequest

        instance = self.backend.get_instance(instance_id)
        tags = {"spot-instances-request": {t["Key"]: t["Value"] for t in self.describe(instance_id)["Tags"]}}
        with mock.patch.object(SpotInstanceRequest, "launch_instance", lambda request: instance):
            (request,) = self.backend.request_spot_instances(
                price="", image_id=instance.image_id, count=1, spot_instance_type="persistent", valid_from=None,
                valid_until=None, launch_group=None, availability_zone_group=None, key_name="", security_groups=[],
                user_data=instance.user_data, instance_type=instance.instance_type, placement=None, kernel_id=None,
                ramdisk_id=None, monitoring_enabled=False, subnet_id=instance.subnet_id, tags=tags,
                instance_interruption_behaviour="stop")
        return request.id

    def open_requests(self, run: str) -> list[dict]:
        """The run's requests that EC2 would still fulfil (moto's state is shared by the session's tests)."""
        return [r for r in self.client.describe_spot_instance_requests()["SpotInstanceRequests"]
                if r["State"] in ("open", "active", "disabled")
                and {"Key": "resnet50-recipe:run", "Value": run} in r.get("Tags", [])]

    def replace(self, instance_id: str) -> str:
        """A lost instance: terminated, and the persistent request starts a new one with the same user data."""
        self.client.terminate_instances(InstanceIds=[instance_id])
        for request in self.backend.spot_instance_requests.values():
            if request.instance.id == instance_id:
                request.instance = request.launch_instance()
                return request.instance.id
        raise AssertionError(f"no spot request holds {instance_id}")


# ---------------------------------------------------------------------------------------------------------
# The instance


def dependencies_dir(into: Path) -> Path:
    """This venv's site-packages, less this package: what PyPI would give the instance's pip."""
    site = Path(sysconfig.get_paths()["purelib"])
    into.mkdir(parents=True, exist_ok=True)
    for entry in site.iterdir():
        if entry.name.startswith(("resnet50_recipe", "__editable__", "_resnet50_recipe")) or entry.suffix == ".pth":
            continue
        link = into / entry.name
        if not link.exists():
            link.symlink_to(entry)
    return into


def write_stand_ins(bin_dir: Path, calls: Path, deps: Path, gpus: int) -> None:
    """systemctl (records its calls), python3 (the real one; a venv it makes sees `deps`), journalctl (the unit's
    output), nvidia-smi (`gpus` GPUs; none: it fails, as on a machine without a driver)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    scripts = {
        "systemctl": f'#!/bin/sh\necho "$*" >> {calls}\n',
        "python3": (f'#!/bin/sh\n{base} "$@" || exit $?\n'
                    'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
                    '    for target; do :; done\n'
                    '    site=$("$target/bin/python" -c '
                    '"import sysconfig; print(sysconfig.get_paths()[\'purelib\'])")\n'
                    # ensurepip's older setuptools would shadow the one torch asks for
                    '    rm -rf "$site"/setuptools* "$site"/pkg_resources "$site"/_distutils_hack '
                    '"$site"/distutils-precedence.pth\n'
                    f'    echo {deps} > "$site/journey-deps.pth"\n'
                    'fi\n'),
        "journalctl": '#!/bin/sh\ncat "$JOURNAL"\n',  # the unit's output, which Systemd writes to $JOURNAL
        "nvidia-smi": ("#!/bin/sh\n" + "".join(f'echo "GPU {i}: NVIDIA T4 (UUID: GPU-{i})"\n' for i in range(gpus))
                       if gpus else "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n"),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


class Machine:
    """One instance: its disk (a root folder), its boots, its unit. `boot` runs cloud-init's user data on the first
    boot of this instance id only, then systemd starts the enabled unit, as on every boot."""

    def __init__(self, cloud: "SpotCloud", instance_id: str, disk: Path):
        self.cloud, self.instance_id, self.disk = cloud, instance_id, disk
        self.systemd: Systemd | None = None
        self.calls = disk / "systemctl.calls"
        self.halted = threading.Event()

    @property
    def env(self) -> dict:
        return {**self.cloud.instance_env, "RESNET50_RECIPE_ROOT": str(self.disk), "HOME": str(self.disk / "root"),
                "JOURNAL": str(self.disk / "journal.log"),
                "PATH": f"{self.disk / 'bin'}:{self.cloud.instance_env['PATH']}"}

    def boot(self) -> None:
        cloud = self.cloud
        instance = cloud.ec2.describe(self.instance_id)
        Metadata.instance = {"id": self.instance_id, "type": instance["InstanceType"], "region": cloud.region,
                             "az": instance["Placement"]["AvailabilityZone"]}
        # The profile's role, by the launcher's naming: the profile and its role share the name.
        # (moto starts a persistent request's next instance without the profile; EC2 gives it the request's.)
        Metadata.role = instance.get("IamInstanceProfile", {}).get("Arn", "/").rsplit("/", 1)[-1] or Metadata.role
        (self.disk / "root").mkdir(parents=True, exist_ok=True)
        write_stand_ins(self.disk / "bin", self.calls, cloud.deps, cloud.gpus)
        marker = self.disk / "var/lib/cloud" / self.instance_id
        if not marker.exists():  # cloud-init runs user data once per instance
            import base64

            data = cloud.ec2.client.describe_instance_attribute(InstanceId=self.instance_id, Attribute="userData")
            script = self.disk / "var/lib/cloud/user-data"
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_bytes(base64.b64decode(data["UserData"]["Value"]))
            done = subprocess.run(["bash", str(script)], env=self.env, capture_output=True, text=True, timeout=120)
            cloud.log(f"cloud-init: user data exited {done.returncode} {done.stderr.strip()[-300:]}")
            assert done.returncode == 0, done.stdout + done.stderr
            marker.touch()
        unit = self.disk / "etc/systemd/system" / UNIT_NAME
        self.systemd = Systemd(unit, self.env, cloud.log, self.start_limit_action)
        self.systemd.start()

    def start_limit_action(self, action: str) -> None:
        if action in ("poweroff", "poweroff-force", "poweroff-immediate"):
            self.poweroff()

    def poweroff(self) -> None:
        self.cloud.log(f"{self.instance_id}: powering off")
        self.cloud.ec2.client.stop_instances(InstanceIds=[self.instance_id])
        self.halted.set()

    def watch(self) -> None:
        """What the machine does between the unit's runs: a `systemctl poweroff` powers it off; a terminated
        instance is gone."""
        while not self.halted.is_set():
            if self.calls.exists() and "poweroff" in self.calls.read_text().split():
                self.systemd.stopping.set()
                self.systemd.join(60)
                return self.poweroff()
            if self.cloud.ec2.state(self.instance_id) in ("shutting-down", "terminated"):
                self.systemd.stop()
                self.halted.set()
                return
            if self.systemd.result is not None:
                return  # the unit stays down; the machine idles (and bills)
            time.sleep(0.2)

    def shutdown(self, kill_after: float) -> None:
        """An interruption with stop behaviour: the OS stops the unit, and the machine is cut off `kill_after`
        seconds later whatever is still running."""
        threading.Timer(kill_after, self.systemd.power_cut).start()
        self.systemd.stop()
        self.systemd.join(kill_after + 30)
        self.halted.set()


class SpotCloud:
    """The journey's world: moto, the metadata service, the instance(s) of one run, and its log."""

    def __init__(self, root: Path, endpoint: str, region: str, ec2_client, deps: Path, gpus: int = 0,
                 extra_env: dict | None = None):
        self.root, self.region, self.deps, self.gpus = root, region, deps, gpus
        self.ec2 = Ec2(ec2_client, region)
        self.server, self.imds = start_metadata()
        self.lines: list[str] = []
        self.disks = 0
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_", "PIP_", "PYTEST", "COV_"))}
        # The machine's environment (systemd's DefaultEnvironment=): where AWS and the metadata service are. No
        # credentials: the instance reads its role's from the metadata service, as on EC2.
        self.instance_env = {**base, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds,
                             "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                             "PIP_CONFIG_FILE": os.devnull, **(extra_env or {})}
        self.machine: Machine | None = None

    def log(self, text: str) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S')} {text}")

    def new_disk(self) -> Path:
        self.disks += 1
        return self.root / f"disk{self.disks}"

    def boot(self, instance_id: str, disk: Path | None = None) -> Machine:
        self.machine = Machine(self, instance_id, disk or self.new_disk())
        self.machine.boot()
        return self.machine

    def interrupt(self, notice_s: float = 120 * SCALE, paused: bool = False) -> float:
        """A spot interruption with stop behaviour: the notice in the metadata, the OS's SIGTERM to the unit a
        quarter of the notice before its end, the power cut at its end; then EC2 starts the same instance again
        with its disk. `paused`: the unit's processes were paused, and go on once the notice is posted. Returns the
        notice's deadline (epoch seconds)."""
        machine = self.machine
        deadline = time.time() + notice_s
        Metadata.notice = {"action": "stop",
                           "time": datetime.fromtimestamp(deadline, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if paused:
            machine.systemd.pause(False)
        # The notice's time has whole seconds: the deadline the trainer reads is the floor.
        deadline = float(int(deadline))
        time.sleep(max(0.0, deadline - time.time() - notice_s / 4))
        machine.shutdown(kill_after=max(0.0, deadline - time.time()))
        self.ec2.client.stop_instances(InstanceIds=[machine.instance_id])
        Metadata.notice = None
        self.ec2.client.start_instances(InstanceIds=[machine.instance_id])
        self.log(f"{machine.instance_id}: interrupted (stop), started again with its disk")
        self.boot(machine.instance_id, machine.disk)
        return deadline

    def lose(self) -> None:
        """The instance is lost with no notice: power cut; the persistent request starts a new instance, empty disk."""
        machine = self.machine
        machine.systemd.power_cut()
        machine.halted.set()
        new = self.ec2.replace(machine.instance_id)
        self.log(f"{machine.instance_id}: lost; the request started {new}")
        self.boot(new)

    def journal(self) -> str:
        return "\n".join((self.root / p).read_text(errors="replace") for p in sorted(
            str(j.relative_to(self.root)) for j in self.root.glob("disk*/journal.log")))

    def close(self) -> None:
        if self.machine is not None and self.machine.systemd is not None:
            self.machine.systemd.stop()
        self.server.shutdown()
