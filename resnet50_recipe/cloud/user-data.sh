#!/bin/bash
# User data for a resnet50-recipe spot instance (Ubuntu: the AWS Deep Learning Base AMI).
#
# First boot (cloud-init runs this once): copy this script to /opt/resnet50-recipe/setup.sh, write a systemd
# unit for the training run, enable and start it. Before every start of the unit (every boot: a persistent spot
# request restarts a stopped instance) `setup.sh --setup` runs; its steps leave markers, so a setup interrupted
# by a preemption continues where it was, and a finished one costs seconds. It also counts the GPUs: the unit
# runs `resnet50-recipe train ... --resume auto --remote s3://...`, with `--nproc-per-node N` on N > 1 GPUs.
# After every stop of the unit `setup.sh --end STATUS RESULT` runs. 75 (stopped with a checkpoint) and 74 (not yet
# all in S3) are restarted and end nothing. 0 (finished), 3 (finished, export or push failed), 4 (stopped by
# train.budget_usd), 2 (bad input) and the last of MAX_CRASHES crashes in a row (exit 1, a signal, a failed
# setup, with no new checkpoint between them) end the run: the log goes to S3 (2 and crashes), the Hub token's
# SSM parameter is deleted, and if the run's files are in S3 (the summary for 0, 3, 4; the newest checkpoint for
# 2 and crashes) the instance cancels its own persistent spot request and terminates, so that nothing is left
# billing but S3; if not, it cancels the request and powers off, keeping the disk (`aws stop` deletes it). With
# KEEP_INSTANCE=yes (`aws launch --keep-instance`) it powers off. A step of the end that fails powers off too
# (end.json: powered-off, end-failed). logs/end.json in S3 says which (`aws status`).
#
# `resnet50-recipe aws launch` fills in the settings below; the rest is this file as it is. `resnet50-recipe sky`
# runs `--setup` alone on each machine of a SkyPilot job (cloud/sky_job.py), with LAUNCH_FILES naming the folder,
# relative to where it runs, that holds the recipe (and the wheel PACKAGE names), under RESNET50_RECIPE_ROOT.

# --- settings: written by `resnet50-recipe aws launch` ---
RUN=example
REMOTE=s3://my-bucket/runs/example
REGION=us-east-1
PACKAGE='resnet50-recipe[aws]'
DATA=s3://my-bucket/datasets/imagenette2-320/
VOLUME=
EPOCHS_NOTE='20 epochs'
HUB_TOKEN_PARAMETER=
KEEP_INSTANCE=
LAUNCH_FILES=
# --- end of settings ---

set -euo pipefail

# The fixed paths below sit under RESNET50_RECIPE_ROOT: empty on an aws launch instance, where the paths are the
# ones shown; the home folder of a SkyPilot machine's user (`resnet50-recipe sky`); a temporary root in the tests
# (tests/journey.py).
ROOT=${RESNET50_RECIPE_ROOT:-}
HOME_DIR=$ROOT/opt/resnet50-recipe
VENV=$HOME_DIR/venv
DATA_DIR=$ROOT/data/dataset
RUN_DIR=$ROOT/data/runs/$RUN
UNIT_DIR=$ROOT/etc/systemd/system
# The instance metadata service (a stand-in's address in the tests; the variable is botocore's and the trainer's).
IMDS=${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}
export AWS_DEFAULT_REGION=$REGION
# The AWS CLI reads the instance role's credentials from the metadata service with botocore's defaults, 1 s and one
# attempt: a slow answer would read as "no credentials", and --end would take the run's files for missing in S3.
export AWS_METADATA_SERVICE_TIMEOUT=5 AWS_METADATA_SERVICE_NUM_ATTEMPTS=3

say() { echo "resnet50-recipe: $*"; }

# How many crashes in a row, with no new checkpoint between them, end the run (see --end).
MAX_CRASHES=5

if [ "${1:-}" = "--end" ]; then
    # The unit's ExecStopPost, after every stop of the unit: $EXIT_STATUS and $SERVICE_RESULT.
    status=${2:-}
    result=${3:-}
    AWS=$(command -v aws || echo "$HOME_DIR/awscli/bin/aws")
    # end.json in S3 says how the instance ended, for `aws status` (cloud/instances.py); a failed put is only said.
    note() {
        printf '{"state": "%s", "reason": "%s", "exit_status": "%s", "crashes": %s, "max_crashes": %s, "checkpoint": "%s"}\n' \
            "$1" "${2:-}" "$status" "${crashes:-0}" "$MAX_CRASHES" "${newest:-}" \
            | "$AWS" s3 cp --only-show-errors - "$REMOTE/logs/end.json" \
            || say "could not put $REMOTE/logs/end.json"
    }
    # Whatever fails here, the machine must not keep running: power off (it then costs only its disk), saying so in
    # end.json first if S3 can be reached.
    trap 'say "ending the run failed at line $LINENO: powering off (aws stop deletes the instance)"; note powered-off end-failed; systemctl poweroff; exit 1' ERR
    # EXIT_STATUS is the trainer's; when the setup (ExecStartPre) failed there was no trainer, and it is unset or
    # a previous start's. SERVICE_RESULT tells: "success" for 0 and the SuccessExitStatus= 74 75 only.
    case "$status" in
        "" | 0 | 74 | 75) if [ -n "$result" ] && [ "$result" != success ]; then status=setup-failed; fi ;;
    esac
    # The last checkpoint on this disk (the name latest.json gives, store/checkpoints.py), or nothing.
    local_manifest=$RUN_DIR/checkpoints/latest.json
    newest=""
    if [ -s "$local_manifest" ]; then
        # (an unreadable one is a checkpoint that cannot be shown to be in S3: the disk is kept)
        newest=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("file") or "")' \
            "$local_manifest") || newest="$local_manifest (unreadable)"
    fi
    # The numbers are resnet50_recipe/errors.py's: 0 EXIT_FINISHED, 3 EXIT_PUBLISH_FAILED, 4 EXIT_BUDGET,
    # 2 EXIT_BAD_INPUT, 74 EXIT_INCOMPLETE, 75 EXIT_PREEMPTED, 1 EXIT_BUG.
    case "$status" in
        0 | 3 | 4 | 2) ;;
        "" | 74 | 75) exit 0 ;;  # a stop with a checkpoint, or one not yet in S3: the unit restarts it, never counted
        *)  # a crash: exit 1, a signal (KILL: the OOM killer), a timeout, the setup failing
            if [ "$(systemctl is-system-running 2> /dev/null || true)" = stopping ]; then
                exit 0  # killed by the shutdown (a spot stop): not the run's fault
            fi
            # Crashes in a row with no new checkpoint between them; one after a new checkpoint counts from 1.
            crashes=0
            last=""
            if [ -s "$HOME_DIR/crashes" ]; then
                { read -r crashes last || true; } < "$HOME_DIR/crashes"
            fi
            [ "$newest" = "$last" ] || crashes=0
            crashes=$((crashes + 1))
            # A count that cannot be written (a full disk) would count every crash as the first, forever: the run
            # ends now, as the last crash ends it.
            if ! echo "$crashes $newest" > "$HOME_DIR/crashes"; then
                say "could not write the crash count to $HOME_DIR/crashes (a full disk?)"
                crashes=$MAX_CRASHES
            fi
            if [ "$crashes" -lt "$MAX_CRASHES" ]; then
                say "exit $status ($result): crash $crashes of $MAX_CRASHES in a row without a new checkpoint; the unit restarts it"
                note crash-looping
                exit 0
            fi
            say "exit $status: $crashes crashes in a row without a new checkpoint: ending the run"
            ;;
    esac
    # From here the run has ended for good. The unit's ConditionPathExists=! on this file keeps systemd from
    # starting it again: no restart after a crash, nothing on a later boot.
    touch "$HOME_DIR/ended" || say "could not write $HOME_DIR/ended (a full disk?): the run ends all the same"
    case "$status" in
        0 | 3 | 4) ;;
        2) log=train-exit-2.log ;;
        *) log=train-crash-loop.log ;;
    esac
    if [ -n "${log:-}" ]; then  # the log goes to S3 first, since the machine it is on is about to go
        { journalctl -u resnet50-recipe-train.service --no-pager -o cat 2> /dev/null || true; } \
            | "$AWS" s3 cp --only-show-errors - "$REMOTE/logs/$log" || say "could not put the log in $REMOTE/logs/$log"
    fi
    # The Hub token is needed no more: its SSM parameter goes (the run role may delete that one alone), and so
    # does the copy on this disk, which a powered-off instance keeps.
    if [ -n "$HUB_TOKEN_PARAMETER" ]; then
        "$AWS" ssm delete-parameter --name "$HUB_TOKEN_PARAMETER" \
            || say "could not delete the SSM parameter $HUB_TOKEN_PARAMETER (resnet50-recipe aws stop $RUN deletes it)"
        rm -f "$HOME_DIR/hub.env"
    fi
    if [ -n "$KEEP_INSTANCE" ]; then
        say "exit $status: powering off (--keep-instance); resnet50-recipe aws stop $RUN deletes the instance"
        note powered-off keep-instance
        systemctl poweroff
        exit 0
    fi
    # The run's files must be in S3 before the disk that also holds them goes away: for 0, 3 and 4 the summary,
    # the trainer's last upload; for 2 and a crash loop the newest checkpoint on this disk, which is in S3 when
    # the remote pointer (checkpoints/latest.json, store/uploader.py) names the same file with the same sha256.
    # A run that wrote no checkpoint (bad input at start-up) has nothing to lose.
    missing=""
    case "$status" in
        0 | 3 | 4) "$AWS" s3 ls "$REMOTE/summary.json" > /dev/null || missing=$REMOTE/summary.json ;;
        *)
            if [ -n "$newest" ]; then
                remote_manifest=$("$AWS" s3 cp --only-show-errors "$REMOTE/checkpoints/latest.json" - 2> /dev/null || true)
                python3 -c 'import json, sys
local, remote = json.load(open(sys.argv[1])), json.loads(sys.argv[2] or "{}")
sys.exit(0 if (remote.get("file"), remote.get("sha256")) == (local["file"], local.get("sha256")) else 1)' \
                    "$local_manifest" "$remote_manifest" || missing="the newest checkpoint, $newest,"
            fi
            ;;
    esac
    # The run's own request, first: a persistent request whose instance is terminated would start a new one. Its
    # id is the one `aws launch` wrote under the run's prefix (launch.py's SPOT_REQUEST): the role may not describe
    # spot requests, which would show it every request's user data. It may cancel only one tagged with the run.
    requests=$("$AWS" s3 cp --only-show-errors "$REMOTE/launch/spot-request" - 2> /dev/null || true)
    if [[ "$requests" =~ ^sir-[0-9a-z]+$ ]]; then
        "$AWS" ec2 cancel-spot-instance-requests --spot-instance-request-ids "$requests" > /dev/null
    else
        requests=""
        # Without its request cancelled, a terminated instance would be replaced: power off instead.
        [ -n "$missing" ] || missing="the id of its spot request ($REMOTE/launch/spot-request)"
    fi
    if [ -n "$missing" ]; then
        say "exit $status but $missing is not in S3: cancelled spot request(s) ${requests:-none} and powering off" \
            "instead of terminating; the disk is kept and bills until resnet50-recipe aws stop $RUN deletes it"
        note powered-off not-in-s3
        systemctl poweroff
        exit 0
    fi
    token=$(curl -sf -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" "$IMDS/latest/api/token")
    instance=$(curl -sf -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/instance-id")
    say "exit $status: run files in $REMOTE; cancelled spot request(s) ${requests:-none}, terminating $instance"
    note released
    "$AWS" ec2 terminate-instances --instance-ids "$instance" > /dev/null
    exit 0
fi

if [ "${1:-}" != "--setup" ]; then
    install -D -m 0755 "$0" "$HOME_DIR/setup.sh"
    data_arg=""
    if [ -n "$DATA" ] || [ -n "$VOLUME" ]; then
        data_arg="--data $DATA_DIR"
    fi
    hub_env=""
    if [ -n "$HUB_TOKEN_PARAMETER" ]; then
        # HF_TOKEN for the push at the end, from a file only root reads: never in the unit, the log or S3.
        hub_env="EnvironmentFile=-$HOME_DIR/hub.env"
    fi
    # The shape of docs/preemption.md's unit: 74 and 75 restart, a crash loop ends (--end), other exits end.
    mkdir -p "$UNIT_DIR"
    cat > "$UNIT_DIR/resnet50-recipe-train.service" <<EOF
[Unit]
Description=resnet50-recipe training run $RUN ($EPOCHS_NOTE)
Wants=network-online.target
After=network-online.target
# systemd's own start limit is off: it counts every start, the restarts after 74 and 75 included, and once it is
# hit the unit is left failed with nothing released, the GPU billing by the hour. setup.sh --end counts the
# crashes instead (MAX_CRASHES in a row without a new checkpoint) and ends the run on the last; RestartSec
# spaces the tries.
StartLimitIntervalSec=0
# Written by setup.sh --end once the run has ended for good: a restart already queued, or a later boot of a
# powered-off instance, then starts nothing.
ConditionPathExists=!$HOME_DIR/ended

[Service]
Environment=PYTHONUNBUFFERED=1 AWS_DEFAULT_REGION=$REGION TRAIN_PROCESSES=
$hub_env
# TRAIN_PROCESSES, written by setup.sh --setup, which counts the GPUs: "--nproc-per-node N" for N GPUs (one
# process per GPU, as aws launch's estimate assumes), empty for one GPU or none (one plain process). An env file
# is read before each command of the unit, so ExecStart sees what ExecStartPre wrote.
EnvironmentFile=-$HOME_DIR/train.env
WorkingDirectory=$HOME_DIR
# Setup before every start: finished steps are skipped, a failed one (the network, say) is retried with the unit.
ExecStartPre=$HOME_DIR/setup.sh --setup
TimeoutStartSec=infinity
ExecStart=$VENV/bin/resnet50-recipe train $HOME_DIR/recipe.yaml $data_arg --output $RUN_DIR --remote $REMOTE --resume auto \$TRAIN_PROCESSES
# (\$TRAIN_PROCESSES, unbraced and a word of its own: split at whitespace into zero or more arguments.)
# The numbers are resnet50_recipe/errors.py's EXIT_* constants (README, "Exit codes").
# 75 EXIT_PREEMPTED: stopped with a checkpoint (a signal, the spot notice); 74 EXIT_INCOMPLETE: a checkpoint or
# the run's files had not reached S3 by the deadline. Neither is a failure, and both are restarted; after a spot
# notice the machine stops within two minutes, so the restart waits that long instead of starting to be killed.
SuccessExitStatus=74 75
RestartForceExitStatus=74 75
Restart=on-failure
# 2 EXIT_BAD_INPUT: bad input; 3 EXIT_PUBLISH_FAILED: trained and synced, but the export or the Hub push failed;
# 4 EXIT_BUDGET: stopped by train.budget_usd (README, "Exit codes").
RestartPreventExitStatus=2 3 4
RestartSec=120
# The trainer alone gets SIGTERM (its loader workers and torchrun's ranks hear it from their parent), within
# the trainer's own stop deadline (checkpoint.stop_timeout_s, 100 s) before the SIGKILL.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=110
# After every stop: finished (0 EXIT_FINISHED), finished with a failed export or push (3 EXIT_PUBLISH_FAILED),
# over budget (4 EXIT_BUDGET), bad input (2 EXIT_BAD_INPUT) or the last of MAX_CRASHES crashes in a row: the run
# has ended; release the instance and its spot request, or power off (--keep-instance, or a checkpoint not yet
# in S3). 74 and 75 end nothing. (a doubled dollar sign is systemd's escape for one, left for the shell)
ExecStopPost=/bin/sh -c '$HOME_DIR/setup.sh --end "\$\$EXIT_STATUS" "\$\$SERVICE_RESULT"'
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable resnet50-recipe-train.service
    systemctl start --no-block resnet50-recipe-train.service
    exit 0
fi

# Any failure exits 1 (EXIT_BUG's number), which the unit retries (tar's 2 must not read as the trainer's
# EXIT_BAD_INPUT).
trap 'say "failed at line $LINENO"; exit 1' ERR

# The AWS CLI for S3 transfers: the AMI's, or one in its own virtualenv (never mixed with the training one).
if ! [ -x "$HOME_DIR/awscli/bin/aws" ] && ! command -v aws > /dev/null; then
    say "installing the AWS CLI"
    # python3-venv from apt only where the Python lacks venv (Ubuntu's): a SkyPilot machine's user has no root.
    python3 -m venv "$HOME_DIR/awscli" 2> /dev/null || {
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-venv
        python3 -m venv "$HOME_DIR/awscli"; }
    "$HOME_DIR/awscli/bin/pip" install --quiet awscli
fi
AWS=$(command -v aws || echo "$HOME_DIR/awscli/bin/aws")

# A SkyPilot job whose run ended for good (exit 2, 3 or 4: its run section notes it in logs/end.json with the job's
# SKYPILOT_TASK_ID, which SkyPilot keeps across recoveries) is not set up again: SkyPilot retries every exit but 75
# and 74, and this ends each retry within seconds, before the data is copied.
if [ -n "${LAUNCH_FILES:-}" ] && [ -n "${SKYPILOT_TASK_ID:-}" ] \
    && ended=$("$AWS" s3 cp --only-show-errors "$REMOTE/logs/end.json" - 2> /dev/null) \
    && [[ "$ended" == *"\"job\": \"$SKYPILOT_TASK_ID\""* ]]; then
    say "this job's run has ended for good, not set up again: $ended"
    exit 2
fi

# The package, once per package spec.
marker="$HOME_DIR/.installed-$(echo "$PACKAGE" | md5sum | cut -c1-12)"
if ! [ -e "$marker" ]; then
    say "installing $PACKAGE"
    [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV" || {
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-venv && python3 -m venv "$VENV"; }
    spec=$PACKAGE
    case "$PACKAGE" in
        s3://*)
            wheel="$HOME_DIR/wheels/$(basename "$PACKAGE")"
            mkdir -p "$HOME_DIR/wheels"
            "$AWS" s3 cp --only-show-errors "$PACKAGE" "$wheel"
            spec="${wheel}[aws]"
            ;;
    esac
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "$spec"
    touch "$marker"
fi

# The Hugging Face token (aws launch --push), from its SSM SecureString into a root-only file.
if [ -n "$HUB_TOKEN_PARAMETER" ] && ! [ -s "$HOME_DIR/hub.env" ]; then
    # An assignment, so that a failed read fails the setup (and is retried) instead of writing an empty token.
    hub_token=$("$AWS" ssm get-parameter --name "$HUB_TOKEN_PARAMETER" --with-decryption \
        --query Parameter.Value --output text)
    umask 077
    printf 'HF_TOKEN=%s\n' "$hub_token" > "$HOME_DIR/hub.env"
    umask 022
    unset hub_token
fi

# The recipe, resolved and validated on the launching machine: from the run's prefix, or the launch files.
if [ -n "${LAUNCH_FILES:-}" ]; then
    install -m 0644 "$LAUNCH_FILES/recipe.yaml" "$HOME_DIR/recipe.yaml"
else
    "$AWS" s3 cp --only-show-errors "$REMOTE/launch/recipe.yaml" "$HOME_DIR/recipe.yaml"
fi

# The data: an EBS volume made from a snapshot (mounted on every boot), or a copy from S3 (once).
if [ -n "$VOLUME" ] && ! mountpoint -q "$DATA_DIR"; then
    root_disk=$(lsblk -no PKNAME "$(findmnt -no SOURCE /)")
    device=""
    for name in $(lsblk -dno NAME,MODEL | awk '/Elastic Block Store/ {print $1}'); do
        if [ "$name" != "$root_disk" ]; then
            # The filesystem is on the disk itself or on its first partition.
            device=/dev/$(lsblk -lno NAME,FSTYPE "/dev/$name" | awk 'NF == 2 {print $1; exit}')
        fi
    done
    if [ -z "$device" ] || [ "$device" = /dev/ ]; then
        say "no EBS volume with a filesystem found besides the root disk" >&2
        exit 1
    fi
    mkdir -p "$DATA_DIR"
    mount "$device" "$DATA_DIR"
    say "mounted $device on $DATA_DIR (a volume restored from a snapshot reads slowly until each block is touched once)"
elif [ -n "$DATA" ] && ! [ -e "$DATA_DIR/.complete" ]; then
    mkdir -p "$DATA_DIR"
    case "$DATA" in
        *.tar) say "extracting $DATA"; "$AWS" s3 cp --only-show-errors "$DATA" - | tar -x -C "$DATA_DIR" ;;
        *.tar.gz | *.tgz) say "extracting $DATA"; "$AWS" s3 cp --only-show-errors "$DATA" - | tar -xz -C "$DATA_DIR" ;;
        *) say "copying $DATA"; "$AWS" s3 sync --only-show-errors "$DATA" "$DATA_DIR" ;;
    esac
    # An archive of one folder holding train/ and val/: use that folder.
    if ! [ -d "$DATA_DIR/train" ]; then
        inner=$(find "$DATA_DIR" -mindepth 2 -maxdepth 2 -type d -name train -print -quit)
        if [ -n "$inner" ]; then
            mv "$(dirname "$inner")"/* "$DATA_DIR"/
        fi
    fi
    touch "$DATA_DIR/.complete"
fi
mkdir -p "$RUN_DIR"
# One training process per GPU (nvidia-smi -L lists one line per GPU; none visible: one process). The instance
# type is known only here: aws launch may try several types with this same script.
gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
processes=1
train_processes=""
if [ "${gpus:-0}" -gt 1 ]; then
    processes=$gpus
    train_processes="--nproc-per-node $gpus"
fi
printf 'TRAIN_PROCESSES="%s"\n' "$train_processes" > "$HOME_DIR/train.env"
say "${gpus:-0} GPU(s) visible: $processes training process(es)"
say "ready: $(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null || echo 'no GPU visible')"
