#!/usr/bin/env bash
# The workflow on a real single-node SLURM cluster (`make slurm-test`).
#
# Sets up a throw-away cluster from nothing (Debian's slurmctld, slurmd and munge; installed
# with apt-get when missing), runs the workflow on the simulated `test` night with
# `--profile profiles/slurm`, runs it again locally (--cores 2) into another folder, and checks
# that both wrote the same APDB and the same alerts. The daemons are stopped by their PIDs and
# the folder removed at the end, also when a step fails (KEEP=1 keeps the folder).
# Everything lives in the work folder except a link /etc/slurm/slurm.conf to its slurm.conf,
# made only where the machine has no slurm.conf and removed at the end: `srun` inside a job
# (the executor's job steps) runs without SLURM_CONF, so it must find the default file.
#
# Needs root (the daemons run as root, munged as the munge user) and the venv with the SLURM
# executor plugin (`make slurm-test` installs it). Settings (environment):
#   SLURM_TEST_DIR      work folder (default /tmp/apsnake-slurm-test; emptied first)
#   SLURM_TEST_PROFILE  the profile under test (default profiles/slurm; relative to the repository)
#   SLURM_TEST_TIMEOUT  seconds allowed to each workflow run (default 1200)
#   SLURM_TEST_LOCAL=0  skip the local run and the comparison
#   KEEP=1              keep the work folder (logs, both runs, slurm.conf)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
WORK=${SLURM_TEST_DIR:-/tmp/apsnake-slurm-test}
PROFILE=${SLURM_TEST_PROFILE:-profiles/slurm}
TIMEOUT=${SLURM_TEST_TIMEOUT:-1200}
CLUSTER=$WORK/cluster
export SLURM_CONF=$CLUSTER/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
RUN_PID=
START=$SECONDS

say() { printf 'slurm-test [%3ds] %s\n' $((SECONDS - START)) "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root: it starts slurmctld and slurmd as root"
[[ "$WORK" == /tmp/* && "$WORK" != */../* ]] || fail "SLURM_TEST_DIR must be under /tmp (it is emptied): $WORK"
[ -x "$PY" ] || fail "no Python at $PY (run make venv, or set PYTHON)"
# profiles/slurm needs the plugin's squeue status (working from 2.x; tested with 2.8.0)
"$PY" -c 'import importlib.metadata as m, sys; v = m.version("snakemake-executor-plugin-slurm"); sys.exit(tuple(map(int, v.split(".")[:2])) < (2, 8))' 2>/dev/null \
    || fail "snakemake-executor-plugin-slurm >= 2.8 is missing: $PY -m pip install -e '.[slurm]'"

# --- stop the daemons that this script started, by the PIDs in their pid files ----------------
stop_daemon() { # name pidfile
    local pid
    [ -s "$2" ] || return 0
    pid=$(cat "$2")
    if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$1" ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [ -e /proc/"$pid" ] || break; sleep 0.2; done
        [ -e /proc/"$pid" ] && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$2"
}

stop_cluster() {
    if [ -s "$CLUSTER/run/slurmctld.pid" ] && [ -e /proc/"$(cat "$CLUSTER/run/slurmctld.pid")" ]; then
        # jobs left by a failed run: cancel them before the daemons go
        ids=$(squeue -h -o %i 2>/dev/null || true)
        [ -z "$ids" ] || { scancel $ids 2>/dev/null || true; sleep 1; }
    fi
    stop_daemon slurmd "$CLUSTER/run/slurmd.pid"
    stop_daemon slurmctld "$CLUSTER/run/slurmctld.pid"
    stop_daemon munged "$CLUSTER/munge/munged.pid"
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$SLURM_CONF" ]; then rm -f "$ETC_CONF"; fi
}

stop_run() { # a workflow run still going (interrupted): TERM, 60 s to cancel its jobs, then KILL
    [ -n "$RUN_PID" ] && [ -e /proc/"$RUN_PID" ] || return 0
    kill "$RUN_PID" 2>/dev/null || true
    for _ in $(seq 60); do [ -e /proc/"$RUN_PID" ] || break; sleep 1; done
    if [ -e /proc/"$RUN_PID" ]; then pkill -KILL -P "$RUN_PID" 2>/dev/null || true; kill -9 "$RUN_PID" 2>/dev/null || true; fi
    RUN_PID=
}

finish() {
    local rc=$?
    trap - EXIT INT TERM
    stop_run
    stop_cluster
    if [ "$rc" != 0 ]; then
        for log in "$CLUSTER"/log/*.log; do
            [ -s "$log" ] && { echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; }
        done
        [ "${KEEP:-0}" = 1 ] || echo "(KEEP=1 keeps $WORK for a closer look)" >&2
    fi
    if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}

# A previous run that was killed may have left daemons and files: stop them, start afresh.
stop_cluster
rm -rf "$WORK"
trap finish EXIT
trap 'exit 130' INT TERM
mkdir -p "$CLUSTER"/{run,log,state,spool,munge}

# --- packages --------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "slurmctld, slurmd, munge are missing and there is no apt-get"
    say "installing slurmctld, slurmd, munge (apt-get)"
    { apt-get install -y -q slurmctld slurmd munge || { apt-get update -q && apt-get install -y -q slurmctld slurmd munge; }; } \
        >"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; fail "apt-get install slurmctld slurmd munge"; }
fi
id munge >/dev/null 2>&1 || fail "no munge user (the munge package creates it)"

# --- munge: own key and socket, run as the munge user -----------------------------------------
# (munged wants the key private and the socket's folder open to all)
MUNGE=$CLUSTER/munge
mkdir -p "$MUNGE/key"
head -c 1024 /dev/urandom >"$MUNGE/key/munge.key"
chown -R munge:munge "$MUNGE"
chmod 0755 "$MUNGE"
chmod 0700 "$MUNGE/key"
chmod 0400 "$MUNGE/key/munge.key"
runuser -u munge -- munged --key-file="$MUNGE/key/munge.key" --socket="$MUNGE/munge.socket" \
    --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" \
    || { cat "$MUNGE/munged.log" >&2 2>/dev/null; fail "munged did not start"; }

# --- slurm.conf: one node, this host, addressed as 127.0.0.1 ---------------------------------
HOST=$(hostname -s)
NODE=$(slurmd -C | head -n 1)
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE")
[ -n "$CPUS" ] && [ -n "$MEM" ] || fail "cannot read CPUs and RealMemory from slurmd -C: $NODE"
cat >"$SLURM_CONF" <<EOF
# Written by tests/slurm/run_slurm_test.sh: a throw-away single-node cluster.
ClusterName=apsnake
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket
CredType=cred/munge
StateSaveLocation=$CLUSTER/state
SlurmdSpoolDir=$CLUSTER/spool
SlurmctldPidFile=$CLUSTER/run/slurmctld.pid
SlurmdPidFile=$CLUSTER/run/slurmd.pid
SlurmctldLogFile=$CLUSTER/log/slurmctld.log
SlurmdLogFile=$CLUSTER/log/slurmd.log
# no cgroups, no accounting (so no sacct: the profile polls with squeue)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# jobs share the node by CPU and memory
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
# squeue must still list a finished job at the executor's next poll (it waits up to 180 s)
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# a dangling link is one that an earlier, killed run of this script left
if [ -L "$ETC_CONF" ] && [ ! -e "$ETC_CONF" ]; then rm -f "$ETC_CONF"; fi
if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
    fail "$ETC_CONF exists: this machine has its own SLURM configuration, which this test would clash with"
fi
mkdir -p "$(dirname "$ETC_CONF")"
ln -s "$SLURM_CONF" "$ETC_CONF"

# --- daemons ----------------------------------------------------------------------------------
slurmctld -c -i || fail "slurmctld did not start (log: $CLUSTER/log/slurmctld.log)"
slurmd || fail "slurmd did not start (log: $CLUSTER/log/slurmd.log)"
for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 1
done
[ "$state" = idle ] || fail "the node is not idle after 60 s (sinfo says '${state:-nothing}')"
say "cluster up: node $HOST, $CPUS CPUs, $MEM MB, $(sinfo -V)"

# --- the night and the two runs ---------------------------------------------------------------
"$PY" "$REPO/tests/slurm/night.py" prepare "$WORK" >"$WORK/prepare.log" 2>&1 \
    || { tail -n 20 "$WORK/prepare.log" >&2; fail "simulating the test night"; }
say "simulated the test night"

run_workflow() { # name, extra snakemake arguments...
    local name=$1 t0=$SECONDS rc=0
    shift
    # in the background, so that a signal reaches the trap at once (finish stops the run)
    (cd "$WORK/$name" && PYTHONWARNINGS=ignore exec timeout "$TIMEOUT" "$PY" -m snakemake --snakefile "$REPO/Snakefile" \
        --configfile config.yaml "$@") >"$WORK/$name.log" 2>&1 &
    RUN_PID=$!
    wait "$RUN_PID" || rc=$?
    RUN_PID=
    if [ "$rc" != 0 ]; then
        tail -n 40 "$WORK/$name.log" >&2
        [ "$rc" = 124 ] && fail "the $name run did not finish in $TIMEOUT s (log: $WORK/$name.log)"
        fail "the $name run failed with status $rc (log: $WORK/$name.log)"
    fi
    say "$name run done in $((SECONDS - t0)) s"
}

say "running the workflow with --profile $PROFILE"
[[ "$PROFILE" == /* ]] || PROFILE=$REPO/$PROFILE
run_workflow slurm --profile "$PROFILE"
submitted=$(grep -c 'Job .* has been submitted with SLURM jobid' "$WORK/slurm.log" || true)
[ "$submitted" -gt 0 ] || fail "no job was submitted to SLURM (log: $WORK/slurm.log)"
say "$submitted SLURM submissions"

if [ "${SLURM_TEST_LOCAL:-1}" = 1 ]; then
    say "running the workflow locally (--cores 2)"
    run_workflow local --cores 2
    "$PY" "$REPO/tests/slurm/night.py" compare "$WORK/slurm/out" "$WORK/local/out" >"$WORK/compare.log" 2>&1 \
        || { cat "$WORK/compare.log" >&2; fail "the APDB of the SLURM run differs from the local one"; }
    say "$(tail -n 1 "$WORK/compare.log")"
fi
say "passed"
