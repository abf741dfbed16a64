#!/usr/bin/env bash
# A single-node Slurm on this machine, for `make test-slurm` and for trying the Slurm sweeps without a cluster.
#   sudo scripts/slurm_local.sh up      # installs Debian's slurm-wlm + munge when missing, starts munged,
#                                       # slurmctld and slurmd on localhost with this machine's CPUs and memory
#   sudo scripts/slurm_local.sh down    # stops the three daemons by the pids recorded at `up`
#   scripts/slurm_local.sh status       # sinfo of the local node
# Needs root (apt-get, slurmd). Writes /etc/slurm/slurm.conf (where sbatch/srun/scontrol look for it) only when
# it is absent or was written by this script: a machine with a real Slurm configuration is left alone.
# State, logs and pid files live in $SKRR_SLURM_DIR (default /var/tmp/skrr-slurm).
set -euo pipefail

DIR=${SKRR_SLURM_DIR:-/var/tmp/skrr-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by skrr scripts/slurm_local.sh"
DAEMONS=(slurmd slurmctld munged)   # stopped in this order

die() { echo "slurm_local: $*" >&2; exit 2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
            && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null \
        || die "slurm-wlm and munge are missing and this is not a Debian/Ubuntu machine; install them yourself"
    echo "slurm_local: installing slurm-wlm and munge (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script (a real Slurm?); use that Slurm, or move the file away"
    fi
    local cpus mem
    cpus=$(nproc)
    # Leave 1 GiB to the system; jobs of the test ask for 1 GB each.
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
    mkdir -p "$(dirname "$CONF")" "$DIR/ctld" "$DIR/spool"
    cat > "$CONF" <<EOF
$MARK: a single node on localhost; \`scripts/slurm_local.sh down\` stops it.
ClusterName=skrr-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# A requeued job may start again cred_expire seconds after its requeue (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups: containers and CI runners often do not delegate them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (defaults 60 s and 30 s): a requeued job restarts soon after it may.
SchedulerParameters=sched_interval=3,bf_interval=3
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
# A requeued or cancelled job is killed 2 s after its SIGTERM (submitit ignores SIGTERM).
KillWait=2
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {  # start NAME COMMAND...: run a daemon in the foreground, in the background, record its pid
    local name=$1; shift
    "$@" >>"$DIR/$name.out" 2>&1 &
    echo $! > "$DIR/$name.pid"
}

alive() { [[ -f $DIR/$1.pid ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

up() {
    [[ $(id -u) == 0 ]] || die "needs root (installs packages, runs slurmd); run it with sudo"
    for d in "${DAEMONS[@]}"; do
        alive "$d" && die "$d is already running (pid $(cat "$DIR/$d.pid")); run \`$0 down\` first"
    done
    install_packages
    mkdir -p "$DIR"
    write_conf
    # munged: the key comes with the package; the socket folder does not exist in a fresh container.
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --force >/dev/null 2>&1 \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge /var/log/munge /var/lib/munge
    start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    for _ in $(seq 50); do [[ -S /run/munge/munge.socket.2 ]] && break; sleep 0.1; done
    [[ -S /run/munge/munge.socket.2 ]] || die "munged did not start; see $DIR/munged.out"
    start slurmctld /usr/sbin/slurmctld -D -i
    start slurmd /usr/sbin/slurmd -D -N localhost
    for _ in $(seq 300); do
        if sinfo -h -N -o %t 2>/dev/null | grep -qx idle; then
            echo "slurm_local: up ($(nproc) CPUs on localhost; pids in $DIR/*.pid, logs in $DIR)"
            return
        fi
        for d in slurmctld slurmd; do
            alive "$d" || die "$d exited; see $DIR/$d.out and $DIR/$d.log"
        done
        sleep 0.2
    done
    die "the node did not become idle in 60 s; see $DIR/slurmctld.log and $DIR/slurmd.log"
}

down() {
    local d pid
    # Jobs still queued or running would outlive slurmd (their slurmstepd): cancel them first.
    if alive slurmctld; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        # shellcheck disable=SC2086
        [[ -z $jobs ]] || { scancel $jobs; sleep 3; }   # KillWait=2
    fi
    for d in "${DAEMONS[@]}"; do
        [[ -f $DIR/$d.pid ]] || continue
        pid=$(cat "$DIR/$d.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$DIR/$d.pid"
    done
    echo "slurm_local: down"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) sinfo -N -l ;;
    *) die "usage: $0 up|down|status" ;;
esac
