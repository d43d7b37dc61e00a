#!/usr/bin/env bash
# A single-node Slurm cluster on loopback, for tests and for trying the Slurm launcher on one machine:
# Debian's slurm-wlm + munge, slurmctld and slurmd on this host, one partition `debug` holding this
# node with its real CPU count and memory. Needs root (the daemons run as root: SlurmUser=root).
#
#   infra/slurm/local-cluster.sh start    install if missing (apt-get), then start munged, slurmctld, slurmd
#   infra/slurm/local-cluster.sh stop     stop the three daemons this script started (by their pid files)
#   infra/slurm/local-cluster.sh status   exit 0 when the node is up and accepts jobs
#
# Idempotent: `start` leaves running daemons alone and only waits for the node to be idle. It writes
# /etc/slurm/slurm.conf (the file every Slurm command reads) and refuses to replace one it did not write.
# No accounting database (slurmdbd): finished jobs stay visible to squeue/scontrol for MinJobAge.
# Exit codes: 0 ok, 3 cannot run here (not root, no apt-get and no Slurm), 1 anything else.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by pretrain-factory infra/slurm/local-cluster.sh"
RUN=/run/pretrain-slurm
LOGS=/var/log/slurm
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}

say() { echo "local-cluster: $*" >&2; }
cannot() { say "$*"; exit 3; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || cannot "Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || cannot "Slurm is not installed and there is no apt-get to install slurm-wlm and munge"
  say "installing slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    say "$CONF exists and was not written by this script: not touching a real cluster's configuration"
    exit 1
  fi
  local node hw
  node=$(hostname -s)
  # The node as slurmd sees it (CPUs, sockets, cores, threads, RealMemory): a node configured with
  # more than it has would be drained at registration.
  hw=$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*//")
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS" "$RUN"
  local tmp="$CONF.tmp.$$"
  cat >"$tmp" <<EOF
$MARK
ClusterName=pretrain-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups needed (containers often have none): processes are tracked by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay known to the controller this long: with no accounting database, squeue is
# where their final state is read.
MinJobAge=3600
KillWait=10
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$tmp" "$CONF"
}

alive() {  # alive PIDFILE: the process it names is running
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge: /etc/munge/munge.key 2>/dev/null || true; }
  mkdir -p /run/munge "$RUN"
  chown munge: /run/munge 2>/dev/null || true
  # --force: run as root and despite a stale socket of a previous container run.
  munged --force --pid-file="$RUN/munged.pid"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  say "munged did not start"
  exit 1
}

node_ready() {
  local state
  state=$(sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -n 1) || return 1
  case "$state" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

start() {
  [ "$(id -u)" = 0 ] || cannot "starting slurmctld/slurmd here needs root (SlurmUser=root)"
  install
  write_conf
  start_munge
  alive "$RUN/slurmctld.pid" || slurmctld -i
  alive "$RUN/slurmd.pid" || slurmd
  local waited=0
  until node_ready; do
    if [ "$waited" -ge "$((TIMEOUT * 10))" ]; then
      say "the node did not become idle within ${TIMEOUT}s: $(sinfo -h -N -o '%N %T %E' 2>&1 | head -n 3)"
      say "logs: $LOGS/slurmctld.log $LOGS/slurmd.log"
      exit 1
    fi
    # A node left DOWN by an earlier run of the daemons comes back once they are up again.
    if [ $((waited % 20)) = 19 ]; then
      scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  say "up: $(sinfo -h -N -o '%N %P %T cpus=%c mem=%m')"
}

stop_daemon() {  # stop_daemon PIDFILE
  alive "$1" || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid"
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  stop_daemon "$RUN/slurmd.pid"
  stop_daemon "$RUN/slurmctld.pid"
  stop_daemon "$RUN/munged.pid"
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) node_ready ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
