#!/usr/bin/env bash
# A real single-node SLURM cluster (slurmctld + slurmd + munge, Debian packages) for the
# launcher tests (tests/test_slurm.py). Needs root and apt. Idempotent: when this node is
# already up and idle it changes nothing; when the daemons are down it (re)starts them.
#
#   sudo .ci/slurm-up.sh          # then: sinfo; sbatch ...
#
# Settings that matter for the tests:
#   AuthInfo=cred_expire=10  a requeued job may start again after ~10 s (default ~140 s)
#   SchedulerParameters      a pending job is looked at every 2 s, not every 30-60 s: a
#                            requeued job restarts as soon as its begin time passes
#   ReturnToService=2        a node that went down comes back by itself when slurmd returns
#   SlurmUser=root           jobs run as the caller (root in CI)
#   127.0.0.1 addresses      no dependence on how (or whether) the host name resolves
#   PreemptMode=CANCEL       a job in partition `urgent` preempts the default partition's
#                            jobs the way most clusters do: SIGTERM, no warning signal
set -euo pipefail

STATE=${ORGANTRAIN_SLURM_STATE:-/var/tmp/organtrain-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

log() { echo "slurm-up: $*"; }

if [[ $(id -u) != 0 ]]; then
    echo "slurm-up: must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

# Packages (about 10 s on Debian/Ubuntu).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: a key (1024 random bytes, munge:munge 0400) and a running daemon.
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- munged --force
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null
fi

# slurm.conf for this one node: all its CPUs, its memory less 1 GiB for the system.
mkdir -p "$STATE"/{ctld,d,log} /etc/slurm
memory_mib=$(awk '/^MemTotal:/ {print int($2 / 1024) - 1024}' /proc/meminfo)
wanted=$(cat <<EOF
# Written by organtrain .ci/slurm-up.sh: a single-node test cluster.
ClusterName=organtrain
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=30
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory_mib State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=urgent Nodes=$HOST PriorityTier=2 MaxTime=INFINITE State=UP
EOF
)
restart=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$wanted" ]]; then
    log "writing $CONF"
    printf '%s\n' "$wanted" >"$CONF"
    restart=1
fi

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ((restart)); then
    # AuthInfo is read at start-up only, so a changed file means restarting the daemons.
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in $(seq 50); do running "$pidfile" || break; sleep 0.2; done
        fi
    done
fi
if ! running "$STATE/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld
fi
if ! running "$STATE/slurmd.pid"; then
    log "starting slurmd"
    slurmd
fi

# Wait until the node takes jobs; resume it if a former run left it down or drained.
for i in $(seq 60); do
    node_state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null || true)
    case $node_state in
        idle* | mixed* | allocated* | completing*)
            log "node $HOST is $node_state ($(nproc) CPUs, $memory_mib MiB)"
            exit 0
            ;;
        down* | drain* | fail*)
            if ((i % 10 == 5)); then
                scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
            fi
            ;;
    esac
    sleep 0.5
done
echo "slurm-up: node $HOST did not become idle (state: ${node_state:-unknown});" \
    "see $STATE/log/slurmctld.log and slurmd.log" >&2
exit 1
