#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on 127.0.0.1 -- for tests/test_slurm.py, CI (.ci/run) and
# for trying `python -m bench.run -m ... hydra/launcher=slurm` on one machine (docs/CLUSTER.md).
#
#   sudo scripts/slurm_up.sh       # ~2 s when installed; ~22 s the first time (17 s of apt-get)
#   sudo scripts/slurm_down.sh     # stops what this script started, by PID file
#
# What it does (as root, without systemd; Debian bookworm's slurm 22.05):
# - installs slurmctld slurmd slurm-client munge slurmdbd mariadb-server when any is missing;
# - starts munged (unless a munged already answers), MariaDB on its unix socket only
#   (--skip-networking) and slurmdbd, so that `sacct` works: without accounting, submitit never
#   notices a job that was killed before writing its result and waits forever;
# - writes /etc/slurm/slurm.conf for one node, `NodeName=localhost NodeAddr=127.0.0.1` with the
#   CPUs and memory `slurmd -C` measures on this machine, no cgroups (proctrack/linuxproc), and a
#   fixed ClusterName with its own state directory (slurmctld refuses to start when the name
#   differs from the one saved in its state);
# - starts slurmctld and slurmd and waits until the node is idle.
# Every daemon it starts writes its PID file into $RUN_DIR; slurm_down.sh stops exactly those.
# It refuses to touch a slurm.conf that it did not write (a real cluster's), unless
# FEWSTEP_SLURM_FORCE=1. Exit 0 only when `sinfo` shows the node idle and `sacct` answers.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

CLUSTER=fewstep                                  # fixed: see the state-directory note above
STATE_DIR=/var/lib/fewstep-slurm                 # slurmctld state, slurmd spool
RUN_DIR=/run/fewstep-slurm                       # PID files of the daemons this script started
LOG_DIR=/var/log/fewstep-slurm                   # daemon logs (read these when a job hangs)
MARK="# written by fewstep-bench scripts/slurm_up.sh"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MYSQL_SOCK=/run/mysqld/mysqld.sock

t0=$(date +%s.%N)
say() { printf 'slurm_up: %s\n' "$*"; }
die() { printf 'slurm_up: error: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll every 0.2 s
  local limit=$1 what=$2; shift 2
  local end=$(($(date +%s) + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "$what did not come up within ${limit} s (logs: $LOG_DIR)"
    sleep 0.2
  done
}

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"

# -- 1. packages ------------------------------------------------------------------------------------
need=()
for cmd in slurmctld slurmd sinfo sacct slurmdbd munged mariadbd; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
  say "installing slurm 22.05, munge, slurmdbd and mariadb-server (missing: ${need[*]})"
  apt-get update -qq
  # policy-rc.d: package scripts must not start daemons (no systemd here; we start them below).
  # One that is already there (container images ship one) is kept as it is.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  say "installed in $(elapsed) s"
fi
export PATH="$PATH:/usr/sbin"

if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF" && [ "${FEWSTEP_SLURM_FORCE:-0}" != 1 ]; then
  die "$CONF exists and was not written by this script (a real cluster?); leaving it alone (FEWSTEP_SLURM_FORCE=1 overrides)"
fi
mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" /etc/slurm

# -- 2. munge -------------------------------------------------------------------------------------
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
if ! munge_ok 2>/dev/null; then
  if [ ! -f /etc/munge/munge.key ]; then
    /usr/sbin/mungekey -c -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  install -d -o munge -g munge "$RUN_DIR/munge" "$LOG_DIR/munge"
  runuser -u munge -- /usr/sbin/munged --pid-file="$RUN_DIR/munge/munged.pid" \
    --log-file="$LOG_DIR/munge/munged.log"
  wait_for 10 munged munge_ok
fi

# -- 3. MariaDB for slurmdbd: unix socket only, root by socket authentication (no password) -----------
db_ok() { mariadb-admin --socket="$MYSQL_SOCK" ping; }
if ! db_ok >/dev/null 2>&1; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  install -d -o mysql -g mysql "$RUN_DIR/mysql" "$LOG_DIR/mysql"
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >/dev/null
  fi
  nohup /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$MYSQL_SOCK" \
    --pid-file="$RUN_DIR/mysql/mariadbd.pid" --log-error="$LOG_DIR/mysql/mariadbd.log" \
    >/dev/null 2>&1 </dev/null &
  wait_for 60 MariaDB db_ok
fi

# -- 4. configuration -----------------------------------------------------------------------------
# This machine's node line as slurmd measures it (CPUs, sockets, cores, threads, RealMemory).
node=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ UpTime=.*//')
[ -n "$node" ] || die "slurmd -C printed no node description"
umask 077
cat >"$DBD_CONF" <<CONF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=fewstep_slurm_acct
CONF
umask 022
cat >"$CONF" <<CONF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

# -- 5. daemons -----------------------------------------------------------------------------------
dbd_ok() { (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null; }
alive "$RUN_DIR/slurmdbd.pid" || /usr/sbin/slurmdbd
wait_for 30 slurmdbd dbd_ok
# The cluster must exist in the accounting database before slurmctld registers with it.
sacctmgr -i -Q show cluster -n format=cluster | grep -qw "$CLUSTER" \
  || sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
alive "$RUN_DIR/slurmctld.pid" || /usr/sbin/slurmctld
alive "$RUN_DIR/slurmd.pid" || /usr/sbin/slurmd -N localhost
idle() { sinfo -h -N -o %T | grep -qx idle; }
wait_for 30 "the node" idle
wait_for 10 sacct sacct -n -X -S now
say "cluster '$CLUSTER' up in $(elapsed) s: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB')"
