#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, with accounting, for the SLURM tests and CI.
#
#   tools/local_slurm.sh start    install what is missing (Debian, root), start the daemons, smoke-test;
#                                 prints `export SLURM_CONF=...` on stdout (progress goes to stderr), so
#                                 `eval "$(tools/local_slurm.sh start)"` points a shell at the cluster
#   tools/local_slurm.sh stop     cancel the cluster's jobs, stop the daemons `start` started
#   tools/local_slurm.sh status   print what runs; exit 0 only when the cluster is usable
#   start --started FILE          also append `<daemon> <pid>` to FILE for every daemon this start spawns, as it
#                                 spawns it (so FILE is right even when start fails midway)
#   stop --started FILE           stop only the daemons listed in FILE that still run with the listed pid
#                                 (and cancel jobs only when that includes slurmctld): `.ci/run` and the test
#                                 fixture stop exactly what they started, and leave a cluster they found running
#
# Daemons: munged (only when no working munge is there already), a private mariadbd, slurmdbd, slurmctld and
# slurmd (node `localhost`, partition `debug`). Everything lives under one directory, default
# /var/tmp/normscale-slurm (NORMSCALE_SLURM_DIR): etc/ (slurm.conf, slurmdbd.conf), log/, pids/ (the pids
# this script started), state/, mysql/, run/. `stop` keeps it, so job ids and accounting survive a restart.
# /etc/slurm/slurm.conf is made a link to etc/slurm.conf when it is absent (or already that link), so plain
# `sbatch`, `sacct`, ... work without SLURM_CONF; a real file there is never touched.
set -euo pipefail

DIR=${NORMSCALE_SLURM_DIR:-/var/tmp/normscale-slurm}
CLUSTER=normscale
PARTITION=debug
NODE=localhost
CONF=$DIR/etc/slurm.conf
DBD_CONF=$DIR/etc/slurmdbd.conf
PIDS=$DIR/pids
LOG=$DIR/log
MYSQL_SOCK=$DIR/run/mysql.sock
CTLD_PORT=6817 SLURMD_PORT=6818 DBD_PORT=6819
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
MUNGE_KEY=/etc/munge/munge.key
ETC_LINK=/etc/slurm/slurm.conf

# Every slurm command below (and slurmdbd, which reads slurmdbd.conf next to slurm.conf) uses our config.
export SLURM_CONF=$CONF

say() { echo "local_slurm: $*" >&2; }
HINT=
die() { say "ERROR: $*"; [[ -z $HINT ]] || say "$HINT"; exit 1; }

# $1 did not come up: name it, point at its log(s) and show their ends.
fail_daemon() {
    local what=$1; shift
    say "ERROR: $what did not start; see $*"
    local f
    for f in "$@"; do [[ -s $f ]] && { echo "----- tail $f" >&2; tail -n 20 "$f" >&2; }; done
    [[ -z $HINT ]] || say "$HINT"
    exit 1
}

# ---------------------------------------------------------------------------------------------- processes

# pid recorded for daemon $1, or nothing.
recorded_pid() { [[ -s $PIDS/$1.pid ]] && cat "$PIDS/$1.pid" || true; }

# True when the pid recorded for $1 is a live process named $1 (not a zombie, not a recycled pid).
alive() {
    local pid stat state
    pid=$(recorded_pid "$1")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
    state=${stat##*) }; state=${state%% *}
    [[ $state != [ZX] ]]
}

# spawn NAME OUTFILE CMD...: run CMD (a foreground daemon named NAME) in its own session, detached from our
# stdin/stdout/stderr and from the lock (fd 9), and record its pid. setsid execs CMD, so $! is the daemon.
spawn() {
    local name=$1 out=$2; shift 2
    setsid "$@" </dev/null >>"$out" 2>&1 9>&- &
    echo $! >"$PIDS/$name.pid"
    [[ -z $STARTED_FILE ]] || echo "$name $!" >>"$STARTED_FILE"
    STARTED=1
}

# wait_until SECONDS DAEMON WHAT LOGS -- CMD...: poll CMD until it succeeds; fail when DAEMON dies or time is up.
wait_until() {
    local secs=$1 daemon=$2 what=$3 logs=() deadline
    shift 3
    while [[ $1 != -- ]]; do logs+=("$1"); shift; done
    shift
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [[ -z $daemon ]] || alive "$daemon" || fail_daemon "$what (process exited)" "${logs[@]}"
        ((SECONDS < deadline)) || fail_daemon "$what (not ready after ${secs}s)" "${logs[@]}"
        sleep 0.3
    done
}

# Stop daemon $1 (TERM, then KILL after 30 s) if it is the one we recorded; forget its pid.
stop_daemon() {
    local name=$1 pid i
    if alive "$name"; then
        pid=$(recorded_pid "$name")
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do alive "$name" || break; sleep 0.2; done
        if alive "$name"; then
            say "$name ignored SIGTERM for 30s, killing it"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do alive "$name" || break; sleep 0.2; done
            alive "$name" && die "could not stop $name (pid $pid)"
        fi
    fi
    rm -f "$PIDS/$name.pid"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Before starting anything: fail clearly when a port a stopped daemon of ours needs is held by something else.
check_ports() {
    local d port
    for d in slurmdbd:$DBD_PORT slurmctld:$CTLD_PORT slurmd:$SLURMD_PORT; do
        port=${d#*:} d=${d%:*}
        if ! alive "$d" && port_in_use "$port"; then
            die "port $port ($d) is in use by a process this script did not start (another SLURM?)"
        fi
    done
}

# ---------------------------------------------------------------------------------------------- packages

ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return
    say "installing ${missing[*]} (apt-get; log $LOG/apt.log)"
    # Package scripts must not start the system's own munge/mariadb/slurm services: policy-rc.d says no
    # (only when there is none already; ours is removed afterwards).
    local policy=/usr/sbin/policy-rc.d ours=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    } >"$LOG/apt.log" 2>&1 9>&- || rc=$?
    if [[ -n $ours ]]; then rm -f "$policy"; trap - EXIT; fi
    ((rc == 0)) || { tail -n 20 "$LOG/apt.log" >&2; die "apt-get install ${missing[*]} failed (see $LOG/apt.log)"; }
}

# ---------------------------------------------------------------------------------------------- config

# write_if_changed FILE MODE: write stdin to FILE; return 0 when the content changed (1 when it is the same).
write_if_changed() {
    local file=$1 mode=$2 tmp
    tmp=$(mktemp "$file.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
    mv -f "$tmp" "$file"
}

render_slurm_conf() {
    local cpus mem_mib real_mib
    cpus=$(nproc)
    mem_mib=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    real_mib=$((mem_mib * 95 / 100)) # slurmd drains the node if RealMemory exceeds what it measures
    cat <<EOF
# Written by tools/local_slurm.sh (normscale); edits are overwritten by the next start.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((real_mib / cpus))
SchedulerType=sched/backfill
# Backfill every second (arrays start fast); the main loop every 2 s starts jobs whose begin time just passed
# (requeued ones), which backfill alone leaves until its next state change.
SchedulerParameters=bf_interval=1,sched_interval=2
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
MaxArraySize=1001
MaxJobCount=20000
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=60
InactiveLimit=0
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/state/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mib State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

render_slurmdbd_conf() {
    cat <<EOF
# Written by tools/local_slurm.sh (normscale); edits are overwritten by the next start.
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/state/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$1
StorageUser=slurm
StoragePass=$2
StorageLoc=slurm_acct_db
EOF
}

# Point /etc/slurm/slurm.conf at our config when that path is free, already ours, or a dangling link.
link_etc_conf() {
    if [[ -L $ETC_LINK ]]; then
        [[ $(readlink "$ETC_LINK") == "$CONF" ]] && return
        [[ -e $ETC_LINK ]] || { ln -sfn "$CONF" "$ETC_LINK"; return; }
    elif [[ ! -e $ETC_LINK ]]; then
        mkdir -p "$(dirname "$ETC_LINK")"
        ln -s "$CONF" "$ETC_LINK"
        return
    fi
    say "note: $ETC_LINK belongs to another setup; left alone (set SLURM_CONF=$CONF)"
}

# ---------------------------------------------------------------------------------------------- daemons

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if alive munged; then
        munge_works && { say "munged running (pid $(recorded_pid munged))"; return; }
        stop_daemon munged
    elif munge_works; then
        say "munge already works (munged not started by this script; left alone)"
        return
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        say "creating $MUNGE_KEY"
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY" && chmod 0400 "$MUNGE_KEY"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    say "starting munged"
    spawn munged "$LOG/munged.out" setpriv --reuid=munge --regid=munge --init-groups -- /usr/sbin/munged -F
    wait_until 30 munged munged "$LOG/munged.out" /var/log/munge/munged.log -- munge_works
}

mysql() { mariadb --no-defaults --socket="$MYSQL_SOCK" -u root "$@"; }

# The port our mariadbd listens on: the recorded one while it runs, else the recorded one if still free,
# else the first free one from 3307.
mysql_port() {
    local f=$DIR/etc/mysql.port p
    p=$(cat "$f" 2>/dev/null || true)
    if [[ $p =~ ^[0-9]+$ ]] && { alive mariadbd || ! port_in_use "$p"; }; then echo "$p"; return; fi
    for ((p = 3307; p < 3400; p++)); do port_in_use "$p" || { echo "$p" >"$f"; echo "$p"; return; }; done
    die "no free port for mariadbd in 3307-3399"
}

start_mariadb() {
    local port=$1 args changed=
    args=(--no-defaults --user=root --datadir="$DIR/mysql" --socket="$MYSQL_SOCK" --port="$port"
        --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/state/mariadbd.pid"
        --log-error="$LOG/mariadb.log" --performance-schema=OFF --innodb-flush-log-at-trx-commit=2
        --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900) # the last two: what slurmdbd asks for
    printf '%s\n' "${args[@]}" | write_if_changed "$DIR/etc/mariadbd.args" 0644 && changed=1
    if alive mariadbd && [[ -z $changed ]] && mysql -e 'SELECT 1' >/dev/null 2>&1; then
        say "mariadbd running (pid $(recorded_pid mariadbd), port $port)"
        return
    fi
    alive mariadbd && [[ -n $changed ]] && say "mariadbd options changed: restarting it"
    stop_daemon mariadbd
    if [[ ! -d $DIR/mysql/mysql ]]; then
        say "initialising the accounting database in $DIR/mysql"
        rm -rf "$DIR/mysql"
        mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=socket \
            --skip-test-db >"$LOG/mariadb-install.log" 2>&1 9>&- ||
            fail_daemon "mariadb-install-db" "$LOG/mariadb-install.log"
    fi
    say "starting mariadbd (port $port)"
    spawn mariadbd "$LOG/mariadb.out" /usr/sbin/mariadbd "${args[@]}"
    MARIADB_STARTED=1
    wait_until 60 mariadbd mariadbd "$LOG/mariadb.log" "$LOG/mariadb.out" -- mysql -e 'SELECT 1'
}

# Database and user for slurmdbd (idempotent); the password is made once and kept in etc/.
setup_accounting_db() {
    local passf=$DIR/etc/mysql.pass pass
    [[ -s $passf ]] || (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$passf")
    pass=$(cat "$passf")
    mysql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
    echo "$pass"
}

dbd_works() { timeout 10 sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
    local restart=$1
    if alive slurmdbd && [[ -z $restart ]]; then say "slurmdbd running (pid $(recorded_pid slurmdbd))"; return; fi
    stop_daemon slurmdbd
    say "starting slurmdbd"
    spawn slurmdbd "$LOG/slurmdbd.out" /usr/sbin/slurmdbd -D
    # The first start creates the tables, which takes a while on a small machine.
    wait_until 180 slurmdbd slurmdbd "$LOG/slurmdbd.log" "$LOG/slurmdbd.out" -- dbd_works
}

register_cluster() {
    if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        say "registering cluster $CLUSTER in accounting"
        timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

ctld_works() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    local restart=$1
    if alive slurmctld && [[ -z $restart ]]; then say "slurmctld running (pid $(recorded_pid slurmctld))"; return; fi
    stop_daemon slurmctld
    say "starting slurmctld"
    spawn slurmctld "$LOG/slurmctld.out" /usr/sbin/slurmctld -D
    wait_until 60 slurmctld slurmctld "$LOG/slurmctld.log" "$LOG/slurmctld.out" -- ctld_works
}

node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

start_slurmd() {
    local restart=$1
    if alive slurmd && [[ -z $restart ]]; then say "slurmd running (pid $(recorded_pid slurmd))"; return; fi
    stop_daemon slurmd
    say "starting slurmd (node $NODE)"
    spawn slurmd "$LOG/slurmd.out" /usr/sbin/slurmd -D -N "$NODE"
}

# Wait for the node to be schedulable; a node left down/drained by an earlier run is resumed once it responds.
wait_node() {
    local deadline=$((SECONDS + 60)) state next_resume=0
    until node_usable; do
        alive slurmd || fail_daemon "slurmd (process exited)" "$LOG/slurmd.log" "$LOG/slurmd.out"
        state=$(node_state)
        if [[ $state =~ ^(down|drained|draining|fail|failing)$ ]] && ((SECONDS >= next_resume)); then
            say "node $NODE is $state; resuming it"
            timeout 10 scontrol update nodename="$NODE" state=resume 2>/dev/null || true
            next_resume=$((SECONDS + 5))
        fi
        if [[ $state == inval ]] || ((SECONDS >= deadline)); then # inval: it registered with a config it cannot meet
            timeout 10 sinfo -R >&2 || true
            fail_daemon "node $NODE (state '$state' after $((60 - deadline + SECONDS))s)" "$LOG/slurmd.log" "$LOG/slurmctld.log"
        fi
        sleep 0.5
    done
}

# An srun through the whole stack, then its record in accounting (which lags the job by about a second).
smoke_test() {
    local jid state deadline
    jid=$(timeout 60 srun -N1 -n1 -t 1 -J local_slurm_smoke sh -c 'echo $SLURM_JOB_ID' 2>"$LOG/smoke.err") ||
        fail_daemon "smoke job (srun true)" "$LOG/smoke.err" "$LOG/slurmctld.log" "$LOG/slurmd.log"
    deadline=$((SECONDS + 30))
    until state=$(timeout 10 sacct -n -X -P -j "$jid" -o State 2>/dev/null) && [[ $state == COMPLETED ]]; do
        ((SECONDS < deadline)) ||
            fail_daemon "accounting of smoke job $jid (sacct says '${state:-nothing}')" "$LOG/slurmdbd.log" "$LOG/slurmctld.log"
        sleep 0.3
    done
    say "smoke test passed (job $jid COMPLETED in sacct)"
}

# ---------------------------------------------------------------------------------------------- commands

lock() {
    exec 9>"$DIR/lock"
    flock -w 600 9 || die "another local_slurm.sh holds $DIR/lock"
}

require_root() { ((EUID == 0)) || die "must run as root (it installs packages and runs the daemons as root)"; }

cmd_start() {
    require_root
    local t0=$SECONDS conf_changed= dbd_changed= port pass
    mkdir -p "$DIR"/{etc,log,pids,run,state/slurmctld,state/slurmd}
    chmod 0755 "$DIR"
    lock
    ensure_packages
    STARTED= MARIADB_STARTED=
    HINT="(daemons that did start keep running: \`$0 stop\` stops them)"
    render_slurm_conf | write_if_changed "$CONF" 0644 && conf_changed=1

    check_ports
    start_munge
    port=$(mysql_port)
    start_mariadb "$port"
    pass=$(setup_accounting_db)
    render_slurmdbd_conf "$port" "$pass" | write_if_changed "$DBD_CONF" 0600 && dbd_changed=1
    # A daemon running with an older config is restarted; a fresh config on stopped daemons needs nothing.
    [[ -n $MARIADB_STARTED ]] && dbd_changed=1 # slurmdbd gets a fresh connection
    alive slurmdbd || dbd_changed=
    alive slurmctld || alive slurmd || conf_changed=
    [[ -n $dbd_changed ]] && say "slurmdbd.conf or mariadbd changed: restarting slurmdbd"
    [[ -n $conf_changed ]] && say "slurm.conf changed: restarting slurmctld and slurmd"

    start_slurmdbd "$dbd_changed"
    register_cluster
    start_slurmctld "$conf_changed"
    start_slurmd "$conf_changed"
    wait_node
    [[ -n $STARTED ]] && smoke_test
    link_etc_conf
    say "cluster $CLUSTER ready in $((SECONDS - t0))s (partition $PARTITION, node $NODE: $(nproc) CPUs)"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    require_root
    [[ -d $DIR ]] || { say "nothing to stop ($DIR does not exist)"; return; }
    mkdir -p "$PIDS"
    lock
    local targets=(slurmd slurmctld slurmdbd mariadbd munged) name pid
    if [[ -n $STARTED_FILE ]]; then
        local listed=()
        [[ -f $STARTED_FILE ]] || { say "nothing to stop ($STARTED_FILE does not exist)"; return; }
        while read -r name pid; do
            if [[ -n $name && $(recorded_pid "$name") == "$pid" ]] && alive "$name"; then listed+=("$name"); fi
        done <"$STARTED_FILE"
        targets=()
        for name in slurmd slurmctld slurmdbd mariadbd munged; do
            [[ " ${listed[*]} " == *" $name "* ]] && targets+=("$name")
        done
        ((${#targets[@]})) || { say "nothing to stop (no daemon listed in $STARTED_FILE still runs)"; return; }
    fi
    if [[ " ${targets[*]} " == *" slurmctld "* ]] && alive slurmctld && ctld_works; then
        local jobs
        jobs=$(timeout 10 squeue -h -o %F 2>/dev/null | sort -u | tr '\n' ' ') || true
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 30))
            while [[ -n $(timeout 10 squeue -h -t running,completing,suspended -o %i 2>/dev/null) ]] &&
                ((SECONDS < deadline)); do sleep 0.5; done
        fi
    fi
    local d
    for d in "${targets[@]}"; do stop_daemon "$d"; done
    say "stopped ${targets[*]} (state kept in $DIR)"
}

cmd_status() {
    local ok=0 d
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$d"; then
            echo "$d: running (pid $(recorded_pid "$d"))"
        elif [[ $d == munged ]] && munge_works; then
            echo "munged: not started by this script (a working munge is there)"
        else
            echo "$d: not running"
            ok=1
        fi
    done
    if [[ -f $CONF ]] && ctld_works; then
        echo "slurmctld: responds; node $NODE: $(node_state)"
        node_usable || ok=1
        dbd_works >/dev/null 2>&1 && echo "slurmdbd: responds" || { echo "slurmdbd: does not respond"; ok=1; }
    else
        echo "slurmctld: does not respond"
        ok=1
    fi
    if ((ok == 0)); then echo "usable: yes (export SLURM_CONF=$CONF)"; else echo "usable: no"; fi
    return $ok
}

STARTED_FILE=
if [[ ${2:-} == --started && -n ${3:-} && ${1:-} =~ ^(start|stop)$ ]]; then
    STARTED_FILE=$(realpath -m "$3")
elif (($# > 1)); then
    set -- usage
fi
case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop [--started FILE] | status" \
        "(state in \${NORMSCALE_SLURM_DIR:-/var/tmp/normscale-slurm})" >&2
    exit 2
    ;;
esac
