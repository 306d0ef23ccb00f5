# The body of the batch script `sweeps/slurm.py` writes (after its #SBATCH lines and the settings NAME, SWEEP,
# NODES, RAY_MODE, ...). Slurm runs it on the allocation's first node, which becomes Ray's head and runs the sweep
# driver; the other nodes join as Ray workers. Ray stays up until the driver has saved:
#   - the time limit: Slurm sends USR1 to this shell alone (--signal=B:USR1@lead), which passes SIGINT to the
#     driver only; the driver saves as on Ctrl-C or SIGTERM (a driver still starting just exits), then this script
#     stops Ray and requeues the job, whose next run continues the sweep (--resume);
#   - `scancel --batch --signal=USR2 JOB`: the same save, then no requeue (the resubmission is printed);
#   - `scancel JOB`, preemption: Slurm sends SIGTERM to every process of the job at once (Ray's too); the driver saves
#     what it still can (Tune's state is at most a few seconds old, every epoch is checkpointed) and the next run
#     continues from there.
set -u
set -m  # each background command in its own process group, with SIGINT not ignored (the driver stops by SIGINT)

say() { echo "slurm: $*"; }

export PATH="$(dirname "$PYTHON"):$PATH" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}  # nothing to drain
export RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT=${RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT:-300}
JOB_TMP="${UHKD_JOB_TMP:-/tmp}/uhkd-$SLURM_JOB_ID"  # short: Ray's socket paths must stay under 108 characters
rm -rf "$JOB_TMP" && mkdir -p "$JOB_TMP"

# Ray's token authentication (on unless RAY_AUTH_MODE=disabled): this node's token (~/.ray/auth_token, created when
# missing, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) goes to every node in the environment srun passes on.
if [ "${RAY_AUTH_MODE:-token}" != disabled ]; then
    export RAY_AUTH_MODE=token
    RAY_AUTH_TOKEN=$(ray get-auth-token --generate 2>/dev/null) || { say "cannot read or create a Ray token"; exit 1; }
    export RAY_AUTH_TOKEN
fi

# Ports: a band of 250 per node from PORT_BASE (the head's GCS port). By default one of 50 slots in 20000-32499,
# below Linux's ephemeral ports and above Ray's default worker ports, chosen by the job id, so two jobs sharing a
# node rarely meet; a site that hands out port ranges: sweeps/slurm.py --port-base.
if [ -z "$PORT_BASE" ]; then
    PORT_BASE=$(( 20000 + (SLURM_JOB_ID % (50 / NODES)) * 250 * NODES ))
fi
ray_ports() {  # the ray start flags for the ports of node $1 (0 = head)
    local b=$(( PORT_BASE + 250 * $1 ))
    echo "--ray-client-server-port=$((b + 1)) --node-manager-port=$((b + 2)) --object-manager-port=$((b + 3))" \
         "--dashboard-agent-listen-port=$((b + 4)) --dashboard-agent-grpc-port=$((b + 5))" \
         "--runtime-env-agent-port=$((b + 6)) --metrics-export-port=$((b + 7)) --dashboard-port=$((b + 8))" \
         "--min-worker-port=$((b + 10)) --max-worker-port=$((b + 249))"
}
node_resources() {  # the ray start flags that keep a node's Ray inside its Slurm allocation
    local flags="--num-cpus=$SLURM_CPUS_ON_NODE --num-gpus=${SLURM_GPUS_ON_NODE:-0}"
    [ -n "${SLURM_MEM_PER_NODE:-}" ] && flags="$flags --memory=$(( SLURM_MEM_PER_NODE * 1024 * 1024 ))"
    echo "$flags"
}
export -f ray_ports node_resources
export PORT_BASE NODES RAY_START_ARGS
HEAD_IP=$("$PYTHON" -c 'import ray.util; print(ray.util.get_node_ip_address())')
export RAY_ADDRESS="$HEAD_IP:$PORT_BASE"
say "job $SLURM_JOB_ID (run $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on $SLURM_JOB_NODELIST: Ray head $RAY_ADDRESS ($RAY_MODE)," \
    "token authentication ${RAY_AUTH_MODE/token/on}"

sweep_cmd=$(printf '%q ' "${SWEEP[@]}")
if "$PYTHON" "$REPO/sweeps/slurm.py" started "$RESULTS" "$NAME"; then
    SWEEP+=(--resume)
    say "continuing sweep $NAME"
fi

stop=""  # why the driver was told to stop: requeue (time limit, USR1), hold (USR2), cancel (SIGTERM to the job)
tell_driver() {
    [ -n "$stop" ] && return  # once: a second SIGINT would make Tune skip its final save
    stop=$1
    say "$(date +%T) $2"
    [ "$1" = cancel ] && return  # the driver got Slurm's SIGTERM itself
    touch "$JOB_TMP/driver.pid.stop"  # a driver not started yet does not start
    local pid
    pid=$(cat "$JOB_TMP/driver.pid" 2>/dev/null) && kill -INT "$pid" 2>/dev/null
}
trap 'tell_driver requeue "the time limit is near: the sweep saves, then the job requeues"' USR1
trap 'tell_driver hold "asked to stop: the sweep saves"' USR2
trap 'tell_driver cancel "cancelled or preempted: every process got SIGTERM from Slurm"' TERM

wait_exit() {  # wait for background process $1 (through the traps above) and return its exit status
    while kill -0 "$1" 2>/dev/null; do wait "$1"; done
    wait "$1"
}
stop_after() {  # SIGTERM process group $2 after $1 seconds unless it has ended, SIGKILL 30 s later
    local i
    for (( i = 0; i < $1 * 2; i++ )); do kill -0 "$2" 2>/dev/null || return 0; sleep 0.5; done
    kill -TERM -- "-$2" 2>/dev/null
    for (( i = 0; i < 60; i++ )); do kill -0 "$2" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL -- "-$2" 2>/dev/null
}
workers="" ran=""
start_workers() {  # $1: the command each other node runs (one srun task per node, each node's own settings)
    [ "$NODES" -gt 1 ] || return 0
    srun --nodes=$(( NODES - 1 )) --ntasks=$(( NODES - 1 )) --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" \
        --kill-on-bad-exit=0 --open-mode=append --output="$LOG_DIR/$NAME-%j-ray-%N.log" bash -c "$1" &
    workers=$!
}
driver=("$JOB_TMP/driver.pid" "${SWEEP[@]}")
# the driver records its pid for the traps (exec keeps it), and does not start once a stop was asked for
record_pid='echo $$ > "$0"; [ -e "$0.stop" ] && exit 130; touch "$0.ran"; exec "$@"'

if [ "$RAY_MODE" = symmetric ]; then
    # Ray's recommended way (whole nodes): `ray symmetric-run` on every node starts the head here, the workers there,
    # waits for all NODES, runs the sweep on the head and stops Ray (`ray stop`: every Ray process of yours on the node)
    start_workers 'exec ray symmetric-run --address "$RAY_ADDRESS" --min-nodes "$NODES" $(node_resources) $(ray_ports 0) $RAY_START_ARGS -- true'
    ray symmetric-run --address "$RAY_ADDRESS" --min-nodes "$NODES" $(node_resources) $(ray_ports 0) $RAY_START_ARGS \
        -- bash -c "$record_pid" "${driver[@]}" &
    wait_exit $!
    status=$?
    ran=$([ -e "$JOB_TMP/driver.pid.ran" ] && echo yes)
    [ -s "$JOB_TMP/driver.pid" ] || { say "Ray did not start (above); the sweep did not run"; status=1; }
    [ -n "$workers" ] && stop_after 0 "$workers"
else
    # The manual start (shared nodes, several users): each node's Ray in this job's own temp folder and port band
    ray start --block --head --node-ip-address="$HEAD_IP" --port="$PORT_BASE" --ray-client-server-port=$(( PORT_BASE + 1 )) \
        --temp-dir="$JOB_TMP/ray" $(ray_ports 0) $(node_resources) $RAY_START_ARGS \
        > "$LOG_DIR/$NAME-$SLURM_JOB_ID-ray-$SLURMD_NODENAME.log" 2>&1 &
    ray_head=$!
    start_workers 'exec ray start --block --address="$RAY_ADDRESS" --temp-dir="$JOB_TMP/ray" $(ray_ports $(( SLURM_PROCID + 1 ))) $(node_resources) $RAY_START_ARGS'
    if "$PYTHON" "$REPO/sweeps/slurm.py" nodes "$NODES" 300; then
        bash -c "$record_pid" "${driver[@]}" &
        wait_exit $!
        status=$?
        ran=$([ -e "$JOB_TMP/driver.pid.ran" ] && echo yes)
    else
        status=1
    fi
    stop_after 0 "$ray_head"
    if [ -n "$workers" ]; then
        stop_after 0 "$workers"
        srun --nodes=$(( NODES - 1 )) --ntasks=$(( NODES - 1 )) --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" \
            rm -rf "$JOB_TMP"
    fi
fi
rm -rf "$JOB_TMP"

case "$status" in
    0) say "sweep $NAME finished"; exit 0 ;;
    2) say "the sweep refused its input (the error line above)"; exit 2 ;;
esac
if [ "$stop" = requeue ] && [ -z "$ran" ]; then
    say "the time limit came before the sweep could start: not requeued (give the job a longer --time)"
elif [ "$stop" = requeue ]; then
    say "requeueing job $SLURM_JOB_ID: its next run continues sweep $NAME"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    say "Slurm refused the requeue"
fi
say "sweep $NAME stopped (exit $status); continue it with: sbatch $SCRIPT"
say "  (or without Slurm: ${sweep_cmd}--resume)"
exit "$status"
