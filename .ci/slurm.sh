#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (Debian 12, run as root) with accounting, for the
# sweep tests (tests/integration/test_sweep.py, marker `slurm`).
#
# Idempotent: installs the packages only when missing, rewrites /etc/slurm/slurm.conf and
# slurmdbd.conf, (re)starts munged, MariaDB, slurmdbd, slurmctld and slurmd only when they are not
# running or their config changed, and waits until the node takes jobs.
#
# Accounting (slurmdbd on MariaDB) is there because submitit, behind hydra's submitit launcher,
# learns a job's state only from `sacct`: without it a job that dies without writing its result
# (killed, out of memory, past its time limit) leaves the launcher waiting forever.
set -euo pipefail

CONF=/etc/slurm/slurm.conf # where Debian's slurm-wlm 22.05 looks (compiled-in default)
DBD_CONF=/etc/slurm/slurmdbd.conf
LOG_DIR=/var/log/slurm
CLUSTER=refusal-lab-ci
WAIT_S=${SLURM_WAIT_S:-90}

die() {
    echo "slurm.sh: $*" >&2
    exit 1
}

# Polls `$@` every 0.5 s for up to $1 seconds.
wait_for() {
    local seconds=$1
    shift
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts the SLURM daemons)"

# --- packages ---
missing=0
for tool in slurmctld slurmd slurmdbd sinfo sacct munged mysqld_safe; do
    command -v "$tool" >/dev/null || missing=1
done
if ((missing)); then
    echo "slurm.sh: installing slurm-wlm, slurmdbd, munge and mariadb-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q slurm-wlm slurmdbd munge mariadb-server
fi

# --- munge: key, dirs, daemon (as the munge user, like the packaged service) ---
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
munge_ok() { munge -n | unmunge; }
if ! munge_ok >/dev/null 2>&1; then
    echo "slurm.sh: starting munged"
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munge_ok || die "munged does not answer; see /var/log/munge/munged.log"
fi

# --- MariaDB for slurmdbd (Debian's package initialises the data dir; root logs in by unix socket) ---
if ! mysqladmin ping >/dev/null 2>&1; then
    echo "slurm.sh: starting MariaDB"
    /etc/init.d/mariadb start >/dev/null || die "MariaDB failed to start; see /var/log/mysql/error.log"
    wait_for 30 mysqladmin ping || die "MariaDB does not answer after 30 s"
fi
DB_PASS=slurm-ci # a database reachable only from this machine
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

# --- config files ---
NODE=$(hostname -s)
# Twice the cores, declared with SlurmdParameters=config_overrides: test_sweep's sharded test has SAE tasks that
# wait (holding their allocation) for a shard task that is requeued behind them; with CPUs=$(nproc) on a 2-core
# machine the two waiting SAE tasks could take both CPUs and the requeued shard never start (seen in CI: a hang).
# The tests' jobs are tiny, so oversubscribing the cores costs nothing but time slices.
CPUS=$(($(nproc) * 2))
MEM_MB=$(free -m | awk '/^Mem:/ {print $2}')
install -d -m 0755 /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

cat >"$TMP/slurmdbd.conf" <<EOF
# Written by .ci/slurm.sh.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
SlurmUser=root
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
EOF

cat >"$TMP/slurm.conf" <<EOF
# Written by .ci/slurm.sh: a single-node cluster for refusal_lab's sweep tests.
ClusterName=${CLUSTER}
# The node talks to itself over loopback, so no DNS entry for the hostname is needed.
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
# No cgroups: containers and VMs without systemd rarely delegate them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs that ask for no memory get 1 GB per CPU, not the whole node.
DefMemPerCPU=1024
SchedulerType=sched/backfill
# Test pending jobs every 2 s instead of 60 s, so a requeued job restarts as soon as it may.
SchedulerParameters=sched_interval=2
# A requeued job may start again cred_expire + 1 s after its requeue (default 120 s); cred_expire is
# also a step credential's lifetime, which on one node is used within a second of its creation.
AuthInfo=cred_expire=15
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued.
KillWait=5
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmdParameters=config_overrides
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {
    local pidfile=$1 pid
    running "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    wait_for 15 bash -c "! kill -0 $pid" || die "daemon $pid ($pidfile) did not stop within 15 s"
}

if ! cmp -s "$TMP/slurmdbd.conf" "$DBD_CONF"; then
    echo "slurm.sh: writing $DBD_CONF"
    install -m 0600 "$TMP/slurmdbd.conf" "$DBD_CONF" # slurmdbd refuses a config others can read
    stop_daemon /run/slurmdbd.pid
fi
if ! cmp -s "$TMP/slurm.conf" "$CONF"; then
    echo "slurm.sh: writing $CONF"
    install -m 0644 "$TMP/slurm.conf" "$CONF"
    # Node definitions only take effect on restart.
    stop_daemon /run/slurmd.pid
    stop_daemon /run/slurmctld.pid
fi

# --- daemons: slurmdbd first, so slurmctld registers the cluster with it ---
if ! running /run/slurmdbd.pid; then
    echo "slurm.sh: starting slurmdbd"
    slurmdbd || die "slurmdbd failed to start; see $LOG_DIR/slurmdbd.log"
    wait_for 30 sacctmgr -n show cluster || die "slurmdbd does not answer after 30 s; see $LOG_DIR/slurmdbd.log"
fi
if ! running /run/slurmctld.pid; then
    echo "slurm.sh: starting slurmctld"
    slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
fi
if ! running /run/slurmd.pid; then
    echo "slurm.sh: starting slurmd"
    slurmd || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
fi

# --- wait until the node takes jobs and the cluster is known to accounting ---
deadline=$((SECONDS + WAIT_S))
state=""
while ((SECONDS < deadline)); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in
    idle | mixed | allocated) break ;; # mixed/allocated: a rerun while jobs still run
    drained* | draining | down*)
        # e.g. drained by an earlier configuration; ReturnToService=2 covers plain restarts.
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
    sleep 1
done
case "$state" in
idle | mixed | allocated) ;;
*)
    sinfo -R >&2 || true
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $NODE is not idle after ${WAIT_S}s (sinfo state: '${state:-no answer}'); logs above"
    ;;
esac
cluster_known() { sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; }
wait_for 30 cluster_known || die "cluster $CLUSTER is not registered with slurmdbd; see $LOG_DIR/slurmctld.log"
sinfo
