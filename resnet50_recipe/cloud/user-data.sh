#!/bin/bash
# User data for a resnet50-recipe spot instance (Ubuntu: the AWS Deep Learning Base AMI).
#
# First boot (cloud-init runs this once): copy this script to /opt/resnet50-recipe/setup.sh, write a systemd
# unit for the training run, enable and start it. Before every start of the unit (every boot: a persistent spot
# request restarts a stopped instance) `setup.sh --setup` runs; its steps leave markers, so a setup interrupted
# by a preemption continues where it was, and a finished one costs seconds. The unit runs
# `resnet50-recipe train ... --resume auto --remote s3://...` and restarts on exit 75 (stopped with a
# checkpoint) and 74 (not yet all in S3). On 0 (finished), 3 (finished, export or push failed), 4 (stopped by
# train.budget_usd) or 2 (bad input) `setup.sh --end STATUS` runs: it checks that the run's files are in S3 (for
# 2: puts the log there first), then cancels the instance's own persistent spot request and terminates it, so
# that nothing is left billing but S3. With KEEP_INSTANCE=yes (`aws launch --keep-instance`) it powers off instead.
#
# `resnet50-recipe aws launch` fills in the settings below; the rest is this file as it is.

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
# --- end of settings ---

set -euo pipefail

# The fixed paths below sit under RESNET50_RECIPE_ROOT, which only the tests set (tests/journey.py runs this
# script in a temporary root); on an instance it is empty and the paths are the ones shown.
ROOT=${RESNET50_RECIPE_ROOT:-}
HOME_DIR=$ROOT/opt/resnet50-recipe
VENV=$HOME_DIR/venv
DATA_DIR=$ROOT/data/dataset
RUN_DIR=$ROOT/data/runs/$RUN
UNIT_DIR=$ROOT/etc/systemd/system
# The instance metadata service (a stand-in's address in the tests; the variable is botocore's and the trainer's).
IMDS=${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}
export AWS_DEFAULT_REGION=$REGION

say() { echo "resnet50-recipe: $*"; }

if [ "${1:-}" = "--end" ]; then
    status=${2:-}
    AWS=$(command -v aws || echo "$HOME_DIR/awscli/bin/aws")
    # Whatever fails here, the machine must not keep running: power off (it then costs only its disk).
    trap 'say "ending the run failed at line $LINENO: powering off (aws stop deletes the instance)"; systemctl poweroff; exit 1' ERR
    # The numbers are resnet50_recipe/errors.py's: 0 EXIT_FINISHED, 3 EXIT_PUBLISH_FAILED, 4 EXIT_BUDGET,
    # 2 EXIT_BAD_INPUT.
    case "$status" in
        0 | 3 | 4) ;;
        2)  # EXIT_BAD_INPUT: the log goes to S3 first, since the machine it is on is about to go
            { journalctl -u resnet50-recipe-train.service --no-pager -o cat 2> /dev/null || true; } \
                | "$AWS" s3 cp --only-show-errors - "$REMOTE/logs/train-exit-2.log" ;;
        *) exit 0 ;;  # a crash or a stop: the unit decides about restarts; nothing to end
    esac
    if [ -n "$KEEP_INSTANCE" ]; then
        say "exit $status: powering off (--keep-instance); resnet50-recipe aws stop $RUN deletes the instance"
        systemctl poweroff
        exit 0
    fi
    # The run's files must be in S3 before the disk that also holds them goes away (2: EXIT_BAD_INPUT, none yet).
    if [ "$status" != 2 ] && ! "$AWS" s3 ls "$REMOTE/summary.json" > /dev/null; then
        say "exit $status but $REMOTE/summary.json is not in S3: powering off instead of terminating"
        systemctl poweroff
        exit 0
    fi
    token=$(curl -sf -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" "$IMDS/latest/api/token")
    instance=$(curl -sf -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/instance-id")
    # The run's own requests, by the tag EC2 copied onto them from the launch (what `aws stop` also cancels).
    requests=$("$AWS" ec2 describe-spot-instance-requests --output text \
        --filters "Name=tag:resnet50-recipe:run,Values=$RUN" "Name=state,Values=open,active,disabled" \
        --query 'SpotInstanceRequests[].SpotInstanceRequestId')
    # The requests first: a persistent request whose instance is terminated would start a new one.
    for request in $requests; do
        "$AWS" ec2 cancel-spot-instance-requests --spot-instance-request-ids "$request" > /dev/null
    done
    say "exit $status: run files in $REMOTE; cancelled spot request(s) ${requests:-none}, terminating $instance"
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
    # The shape of README's unit (Preemption section): 75 restarts, other exits do not loop forever.
    mkdir -p "$UNIT_DIR"
    cat > "$UNIT_DIR/resnet50-recipe-train.service" <<EOF
[Unit]
Description=resnet50-recipe training run $RUN ($EPOCHS_NOTE)
Wants=network-online.target
After=network-online.target
# A failure that repeats 4 times within an hour stops the retries; the instance stays up for aws logs.
StartLimitIntervalSec=3600
StartLimitBurst=4

[Service]
Environment=PYTHONUNBUFFERED=1 AWS_DEFAULT_REGION=$REGION
$hub_env
WorkingDirectory=$HOME_DIR
# Setup before every start: finished steps are skipped, a failed one (the network, say) is retried with the unit.
ExecStartPre=$HOME_DIR/setup.sh --setup
TimeoutStartSec=infinity
ExecStart=$VENV/bin/resnet50-recipe train $HOME_DIR/recipe.yaml $data_arg --output $RUN_DIR --remote $REMOTE --resume auto
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
# Finished (0 EXIT_FINISHED), finished with a failed export or push (3 EXIT_PUBLISH_FAILED), over budget
# (4 EXIT_BUDGET) or bad input (2 EXIT_BAD_INPUT): release the instance and its spot request (or power off with
# --keep-instance). (a doubled dollar sign is systemd's escape for one, left for the shell to expand)
ExecStopPost=/bin/sh -c '$HOME_DIR/setup.sh --end "\$\$EXIT_STATUS"'
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
    say "installing python3-venv and the AWS CLI"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-venv
    python3 -m venv "$HOME_DIR/awscli"
    "$HOME_DIR/awscli/bin/pip" install --quiet awscli
fi
AWS=$(command -v aws || echo "$HOME_DIR/awscli/bin/aws")

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

# The recipe, resolved and validated on the launching machine.
"$AWS" s3 cp --only-show-errors "$REMOTE/launch/recipe.yaml" "$HOME_DIR/recipe.yaml"

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
say "ready: $(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null || echo 'no GPU visible')"
