#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying sweeps through sbatch and for the tests.
#
#   sudo apt-get install -y slurm-wlm munge          # Debian/Ubuntu packages (once)
#   eval "$(scripts/local_slurm.sh start)"           # starts munged, slurmctld, slurmd; exports SLURM_CONF
#   python run.py -m hydra/launcher=slurm cluster@hydra.launcher=local_slurm loss=suponly,ablation_viii ...
#   scripts/local_slurm.sh status                    # sinfo + squeue
#   scripts/local_slurm.sh stop                      # stops the three daemons (by their pid files)
#
# Everything (slurm.conf, munge key and socket, state, spool, pid and log files) lives in one
# directory: $DCC_SLURM_DIR, default /tmp/dcc-slurm-$USER. Ports: $DCC_SLURM_PORT (slurmctld, default
# 6817) and that + 1 (slurmd). The daemons run as root (slurmd must), so start it as root. `start`
# prints the `export SLURM_CONF=...` line that points sbatch/squeue/scontrol at this cluster; a
# second `start` of a running cluster only prints it again.
set -euo pipefail

cmd="${1:-start}"
dir="${DCC_SLURM_DIR:-/tmp/dcc-slurm-${USER:-$(id -un)}}"
port="${DCC_SLURM_PORT:-6817}"
host="$(hostname -s)"
conf="$dir/slurm.conf"

say() { echo "local_slurm: $*" >&2; }
die() { say "$*"; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop one daemon that this script started, by its pid file
    local f="$1" pid i
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

write_conf() {
    local cpus mem
    cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc alone reports OMP_NUM_THREADS when it is set
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    cat > "$conf" <<CONF
# Written by scripts/local_slurm.sh: a one-node cluster for trying sweeps; not for production.
ClusterName=dcc-local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=60
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        || die "slurmctld, slurmd or munged not found: apt-get install -y slurm-wlm munge"
    [[ "$(id -u)" == 0 ]] || die "slurmd must run as root: start this script as root"
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 755 "$dir" "$dir/munge"  # munged wants a socket directory everyone can traverse
    export SLURM_CONF="$conf"
    if pid_alive "$dir/slurmctld.pid" && pid_alive "$dir/slurmd.pid" && pid_alive "$dir/munge/munged.pid"; then
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    stop_all
    write_conf
    if [[ ! -s "$dir/munge/munge.key" ]]; then
        (umask 077; head -c 1024 /dev/urandom > "$dir/munge/munge.key")
    fi
    munged --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" --force \
        || die "munged did not start (see $dir/log/munged.log)"
    slurmctld -f "$conf" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
    slurmd -f "$conf" || die "slurmd did not start (see $dir/log/slurmd.log)"
    local i state=""
    for i in $(seq 120); do
        state="$(sinfo -h -N -n "$host" -o %T 2>/dev/null | head -n1 || true)"
        case "$state" in
            idle*|mixed*|allocated*) break ;;
            down*|drain*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    case "$state" in
        idle*|mixed*|allocated*) ;;
        *) die "node $host is '${state:-unknown}' after 60 s (logs in $dir/log)" ;;
    esac
    say "SLURM cluster on $host is up (state $state, config $conf)"
    echo "export SLURM_CONF=$conf"
}

stop_all() {
    if pid_alive "$dir/slurmctld.pid"; then  # cancel the cluster's jobs first, or their processes outlive slurmd
        export SLURM_CONF="$conf"
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
        local i
        for i in $(seq 60); do
            [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
}

case "$cmd" in
    start) start ;;
    stop) stop_all; say "stopped (state kept in $dir)" ;;
    status)
        export SLURM_CONF="$conf"
        if ! pid_alive "$dir/slurmctld.pid"; then  # sinfo would wait a minute for a controller that is not there
            die "the local cluster is not running (no slurmctld for $conf): start it with $0 start"
        fi
        sinfo && squeue ;;
    *) die "usage: $0 start|stop|status" ;;
esac
