# The `run` section of a `resnet50-recipe sky` job (cloud/sky_job.py), on every machine: `train --nproc-per-node`
# from SkyPilot's variables (one process per GPU, the rendezvous on the first machine, SkyPilot's node rank), on
# what the setup (user-data.sh --setup) left under ROOT. Each machine exits with the run's own status (75 after a
# stop), which the job's recover_on_exit_codes reads.
#
# Exits 2 (bad input), 3 (trained; the export or push failed) and 4 (the budget: a retry would train one more epoch
# past it) are final, but SkyPilot retries every exit outside recover_on_exit_codes, max_restarts_on_errors times:
# the first machine notes such an exit in the run's logs/end.json with the job's SKYPILOT_TASK_ID (kept across
# recoveries, new for a new job), and every later start of this job's setup and run ends at once with it.
ROOT="$HOME/resnet50-recipe"
HOME_DIR="$ROOT/opt/resnet50-recipe"
export PATH="$HOME_DIR/venv/bin:$PATH"
AWS=$(command -v aws || echo "$HOME_DIR/awscli/bin/aws")
if ended=$("$AWS" s3 cp --only-show-errors "$REMOTE/logs/end.json" - 2> /dev/null) \
    && [[ "$ended" == *"\"job\": \"$SKYPILOT_TASK_ID\""* ]]; then
    echo "resnet50-recipe: this job's run has ended for good, not retried: $ended"
    exit "$(echo "$ended" | python3 -c 'import json, sys; print(json.load(sys.stdin)["exit_status"])')"
fi
gpus=${SKYPILOT_NUM_GPUS_PER_NODE:-0}
[ "$gpus" -ge 1 ] || gpus=1  # a machine without GPUs trains one process
data=()
[ -e "$ROOT/data/dataset" ] && data=(--data "$ROOT/data/dataset")  # the setup's copy of DATA
# In the background, so that a SIGTERM or SIGINT to this shell reaches the trainer (the traps) and the shell still
# reads the trainer's status after it.
resnet50-recipe train "$HOME_DIR/recipe.yaml" "${data[@]}" --output "$ROOT/data/runs/$RUN" --remote "$REMOTE" \
    --resume auto --nproc-per-node "$gpus" --nnodes "$SKYPILOT_NUM_NODES" --node-rank "$SKYPILOT_NODE_RANK" \
    --master-addr "$(echo "$SKYPILOT_NODE_IPS" | head -n1)" --master-port "$MASTER_PORT" &
trainer=$!
trap 'kill -TERM "$trainer" 2> /dev/null' TERM
trap 'kill -INT "$trainer" 2> /dev/null' INT
status=0
wait "$trainer" || status=$?
while kill -0 "$trainer" 2> /dev/null; do  # a trap ended the wait: wait again, for the trainer's own status
    status=0
    wait "$trainer" || status=$?
done
if { [ "$status" = 2 ] || [ "$status" = 3 ] || [ "$status" = 4 ]; } && [ "$SKYPILOT_NODE_RANK" = 0 ]; then
    printf '{"state": "ended", "reason": "exit %s is final", "exit_status": "%s", "job": "%s"}\n' \
        "$status" "$status" "$SKYPILOT_TASK_ID" | "$AWS" s3 cp --only-show-errors - "$REMOTE/logs/end.json" \
        || echo "resnet50-recipe: could not put $REMOTE/logs/end.json"
fi
exit "$status"
