#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the Slurm launcher and for its tests.
#
#   bash scripts/local_slurm.sh up       install (apt, when missing) and start munge, MariaDB, slurmdbd,
#                                        slurmctld and slurmd; wait until the node is idle (a second `up` is a no-op)
#   bash scripts/local_slurm.sh status   what runs, `sinfo`
#   bash scripts/local_slurm.sh down     stop the daemons this script started (by the PIDs it recorded)
#
# Needs root (Debian/Ubuntu; no systemd: the daemons are started directly). One node with this machine's CPUs
# and memory, partition `debug`, accounting through slurmdbd (so `sacct` works), process tracking without
# cgroups (proctrack/linuxproc). Everything it writes lives under $NEMO_VIPER_SLURM_DIR
# (default /var/tmp/nemo_viper_slurm); the Slurm commands find the config through /etc/slurm/slurm.conf, which
# `up` writes only when no other slurm.conf is there.
set -euo pipefail

STATE=${NEMO_VIPER_SLURM_DIR:-/var/tmp/nemo_viper_slurm}
CLUSTER=nemoviper
PARTITION=debug
DB_PORT=3307                 # a private MariaDB (own datadir and port): a system one is left alone
SLURM_CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; `down` stops them in reverse

log() { echo "local_slurm: $*" >&2; }
pidfile() { echo "$STATE/pids/$1.pid"; }
running() { local f; f=$(pidfile "$1"); [[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq "$((seconds * 4))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    log "timed out after ${seconds}s waiting for $what (logs: $STATE/log)"; return 1
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_configs() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # 10 % left to the OS
    mkdir -p "$STATE"/{pids,log,ctld,spool,munge,db} /etc/slurm
    cat >"$STATE/slurm.conf" <<EOF
# written by scripts/local_slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( mem_mb / cpus ))
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$STATE/slurmdbd.conf" <<EOF
# written by scripts/local_slurm.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/slurmdbd.conf"
    # The Slurm commands and daemons read /etc/slurm: link ours there unless the machine has its own.
    for name in slurm.conf slurmdbd.conf; do
        local target=/etc/slurm/$name
        if [[ -e $target && ! -L $target ]] && ! grep -q "written by scripts/local_slurm.sh" "$target"; then
            log "$target exists and is not ours: refusing to replace it"; exit 2
        fi
        ln -sfn "$STATE/$name" "$target"
    done
}

start_munge() {
    running munged && return 0
    mkdir -p /run/munge && chown munge:munge /run/munge "$STATE/munge"
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
    runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    wait_for 10 munged test -s "$STATE/munge/munged.pid"
    cp "$STATE/munge/munged.pid" "$(pidfile munged)"
}

mysql() { mariadb --socket="$STATE/db/mysqld.sock" -uroot "$@"; }

start_mariadb() {
    running mariadbd && return 0
    local data=$STATE/db/data
    if [[ ! -d $data/mysql ]]; then
        mkdir -p "$data" && chown mysql:mysql "$data" "$STATE/db"
        mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1
    fi
    chown mysql:mysql "$STATE/db"
    mariadbd --user=mysql --datadir="$data" --socket="$STATE/db/mysqld.sock" --port=$DB_PORT \
        --bind-address=127.0.0.1 --pid-file="$STATE/db/mariadbd.pid" --log-error="$STATE/db/mariadb.log" \
        --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
    wait_for 60 "MariaDB" mysql -e "SELECT 1"
    cp "$STATE/db/mariadbd.pid" "$(pidfile mariadbd)"
    mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurm() {
    if ! running slurmdbd; then
        slurmdbd
        wait_for 60 "slurmdbd" sacctmgr -n show cluster
    fi
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    # Accounts the tests and the README's example submit with (-A); root is the user jobs run as here.
    for account in nemo_viper; do
        sacctmgr -n -P show account "$account" | grep -q . || sacctmgr -i add account "$account" cluster="$CLUSTER" >/dev/null
        for user in root ${SUDO_USER:-}; do
            sacctmgr -n -P show assoc where account="$account" user="$user" | grep -q . \
                || sacctmgr -i add user "$user" account="$account" cluster="$CLUSTER" >/dev/null
        done
    done
    running slurmctld || slurmctld
    wait_for 60 "slurmctld" scontrol ping
    running slurmd || slurmd
    wait_for 90 "node $NODE idle" node_idle
}

node_idle() {
    local state
    state=$(sinfo -h -n "$NODE" -o %T)
    [[ $state == idle* || $state == mixed* || $state == allocated* ]] && return 0
    [[ $state == down* || $state == drain* ]] && scontrol update nodename="$NODE" state=resume 2>/dev/null
    return 1
}

up() {
    [[ $(id -u) == 0 ]] || { log "needs root (apt-get, daemons)"; exit 2; }
    if all_running && node_idle; then log "already up"; sinfo; return 0; fi
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurm
    log "up: partition $PARTITION, account nemo_viper, state in $STATE"
    sinfo
}

all_running() { local d; for d in "${DAEMONS[@]}"; do running "$d" || return 1; done; }

down() {
    local i d pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        running "$d" || { rm -f "$(pidfile "$d")"; continue; }
        pid=$(cat "$(pidfile "$d")")
        kill "$pid"
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        rm -f "$(pidfile "$d")"
        log "stopped $d ($pid)"
    done
}

status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        if running "$d"; then echo "$d: running (pid $(cat "$(pidfile "$d")"))"; else echo "$d: not running"; rc=1; fi
    done
    ((rc)) || sinfo
    return $rc
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
