#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests and for trying profiles/slurm without a real cluster.
#
#     bash scripts/local-slurm.sh start     # install slurm-wlm + munge if missing (apt, as root), configure, start
#     bash scripts/local-slurm.sh status    # exit 0 when the node is up and idle/allocated
#     eval "$(bash scripts/local-slurm.sh env)"   # SLURM_CONF and PATH for sbatch/squeue/scancel/snakemake
#     bash scripts/local-slurm.sh stop      # stop the three daemons started here (by their pid files)
#
# Everything it writes (slurm.conf, munge key and socket, state, spool, logs, pid files) lives under one folder,
# $SCPT_SLURM_DIR (default /tmp/scpt-slurm); the system's /etc/slurm and /etc/munge are not touched, and `stop`
# followed by `rm -rf $SCPT_SLURM_DIR` removes every trace but the packages. Every command is idempotent: `start`
# on a running cluster only checks it, `stop` on a stopped one does nothing.
#
# The cluster: this host as one node with all its CPUs and its memory less 1 GB, one default partition `local`,
# daemons running as root, no accounting database (so Snakemake's SLURM executor must read job states with
# `--slurm-status-command squeue`; docs/cluster.md), MinJobAge=600 so that finished jobs stay visible to
# squeue/scontrol for an hour. Ports: SCPT_SLURM_PORTS="ctld slurmd" (default "6817 6818").
# Client wrappers: Snakemake's SLURM job step removes every SLURM_* variable (SLURM_CONF included) before it calls
# srun inside a job, which would then look for /etc/slurm/slurm.conf. $SCPT_SLURM_DIR/bin holds wrappers of the
# client commands that set SLURM_CONF to this cluster's file; `env` puts that folder first on PATH, and jobs
# inherit PATH (sbatch --export=ALL).
# Exit codes: 0 done, 1 failed (the log named in the message says why), 3 cannot start here (not root, no apt).
set -euo pipefail

BASE="${SCPT_SLURM_DIR:-/tmp/scpt-slurm}"
read -r CTLD_PORT SLURMD_PORT <<< "${SCPT_SLURM_PORTS:-6817 6818}"
CONF="$BASE/slurm.conf"
NODE="$(hostname -s)"
export SLURM_CONF="$CONF"

die() { echo "local-slurm: $1" >&2; exit "${2:-1}"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root: cannot install them \
(run as root, or install the packages slurm-wlm and munge)" 3
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get here" 3
    echo "local-slurm: installing slurm-wlm and munge with apt-get (about a minute)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$BASE/log/apt.log" 2>&1 \
        || { apt-get update -q >>"$BASE/log/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$BASE/log/apt.log" 2>&1; } \
        || die "apt-get install slurm-wlm munge failed; see $BASE/log/apt.log" 3
    # The packages start their own munge/slurm services with the system's config where systemd runs; this
    # cluster uses its own daemons and files only.
}

write_config() {
    local cpus mem_mb
    cpus="$(nproc)"
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    mkdir -p "$BASE"/{state,spool,log,munge}
    chmod 700 "$BASE/munge"
    if [ ! -s "$BASE/munge/munge.key" ]; then
        (umask 077; head -c 1024 /dev/urandom > "$BASE/munge/munge.key")
    fi
    cat > "$CONF.tmp" <<EOF
# Written by scripts/local-slurm.sh: a one-node cluster, everything under $BASE.
ClusterName=scpt-local
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.socket
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    mkdir -p "$BASE/bin"
    local cmd
    for cmd in srun sbatch squeue scancel scontrol sinfo sacct; do
        printf '#!/bin/sh\n# scripts/local-slurm.sh: this cluster'"'"'s config, also where SLURM_CONF was removed\n'\
'SLURM_CONF=%s exec %s "$@"\n' "$CONF" "$(real_command "$cmd")" > "$BASE/bin/$cmd"
        chmod +x "$BASE/bin/$cmd"
    done
}

real_command() {
    # the installed client, not a wrapper of ours that may already be on PATH
    PATH="$(printf %s "$PATH" | tr ':' '\n' | grep -vxF "$BASE/bin" | paste -sd:)" command -v "$1"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_up() {
    # the node answers and is usable (idle, mixed or allocated; not down/drained)
    local state
    state="$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1)" || return 1
    case "$state" in idle*|mix*|alloc*|completing*) return 0 ;; *) return 1 ;; esac
}

start() {
    mkdir -p "$BASE/log"
    if pid_alive "$BASE/slurmctld.pid" && pid_alive "$BASE/slurmd.pid" && node_up; then
        echo "local-slurm: running (SLURM_CONF=$CONF)"
        return
    fi
    [ "$(id -u)" = 0 ] || die "not root: the local cluster's daemons (munged, slurmctld, slurmd) run as root; \
run this script as root" 3
    install_packages
    write_config
    if ! pid_alive "$BASE/munged.pid"; then
        munged --force --key-file="$BASE/munge/munge.key" --socket="$BASE/munge/munge.socket" \
            --pid-file="$BASE/munged.pid" --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munge.seed" \
            || die "munged did not start; see $BASE/log/munged.log"
    fi
    if ! pid_alive "$BASE/slurmctld.pid"; then
        slurmctld -f "$CONF" || die "slurmctld did not start; see $BASE/log/slurmctld.log"
    fi
    if ! pid_alive "$BASE/slurmd.pid"; then
        slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start; see $BASE/log/slurmd.log"
    fi
    for _ in $(seq 1 60); do
        if node_up; then
            echo "local-slurm: running (SLURM_CONF=$CONF)"
            return
        fi
        sleep 1
    done
    # a node that registered as down after an unclean stop: tell the controller it is back
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    sleep 2
    node_up || die "the node did not come up within 60 s; see $BASE/log/slurmctld.log and slurmd.log"
    echo "local-slurm: running (SLURM_CONF=$CONF)"
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        if pid_alive "$BASE/$name.pid"; then
            pid="$(cat "$BASE/$name.pid")"
            kill "$pid"
            for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$BASE/$name.pid"
    done
    echo "local-slurm: stopped"
}

status() {
    if pid_alive "$BASE/slurmctld.pid" && pid_alive "$BASE/slurmd.pid" && node_up; then
        echo "local-slurm: running (SLURM_CONF=$CONF)"
        sinfo
        return 0
    fi
    echo "local-slurm: not running"
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF PATH=$BASE/bin:\$PATH" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
