#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests of `d2r sweep` (tests/test_slurm.py)
# and for trying `d2r sweep --executor slurm` without a cluster.
#
#   bash scripts/slurm_local.sh start   # idempotent; exits 0 saying why when it cannot start
#   bash scripts/slurm_local.sh stop
#
# Needs Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge) and root; no systemd:
# munged runs as the munge user, slurmctld and slurmd as root, with a generated slurm.conf
# (/etc/slurm/slurm.conf, marked as ours; an existing one of a real cluster is left alone) and
# all state under $D2R_SLURM_DIR (default /tmp/d2r-slurm).
set -u
DIR="${D2R_SLURM_DIR:-/tmp/d2r-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# d2r local test cluster (scripts/slurm_local.sh)"

skip() { echo "slurm_local: not started: $*"; exit 0; }

running() { scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; }

start_munge() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged || return 1
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

write_conf() {
  local node mem
  node="$(slurmd -C | head -n 1)"          # NodeName=... CPUs=... as slurmd sees this machine
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  node="$(echo "$node" | sed -E "s/RealMemory=[0-9]+/RealMemory=$mem/")"
  mkdir -p "$DIR/ctld" "$DIR/d" /etc/slurm
  cat > "$CONF" <<EOF
$MARK
ClusterName=d2rlocal
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# fast turnaround for tests: SIGKILL 10 s after SIGTERM, finished jobs listed for 10 minutes
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=2
$node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
  for _ in $(seq 60); do
    running && return 0
    sinfo -h -o "%T" 2>/dev/null | grep -qE "down|drain" && scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null
    sleep 0.5
  done
  return 1
}

start() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null \
    || skip "slurm-wlm and munge are not installed (as root: apt-get install -y slurm-wlm munge)"
  [ "$(id -u)" = 0 ] || skip "needs root (munged runs as the munge user, slurmd as root)"
  if running; then echo "slurm_local: already running ($CONF)"; exit 0; fi
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then skip "$CONF belongs to another cluster"; fi
  start_munge || skip "munged did not start"
  stop_daemons
  write_conf
  slurmctld -c -i || skip "slurmctld did not start (see $DIR/slurmctld.log)"
  slurmd -c || skip "slurmd did not start (see $DIR/slurmd.log)"
  wait_idle || skip "the node did not become idle (see $DIR/slurmctld.log and $DIR/slurmd.log)"
  echo "slurm_local: one-node cluster up ($(sinfo -h -o '%P %D %T %c CPUs' | head -n 1)); state in $DIR"
}

stop_daemons() {
  for name in slurmd slurmctld; do
    if [ -f "$DIR/$name.pid" ]; then
      pid="$(cat "$DIR/$name.pid")"
      # only our daemon: a stale pid file may name a process that reused the number
      if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill "$pid" && for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      fi
      rm -f "$DIR/$name.pid"
    fi
  done
}

stop() {
  stop_daemons
  pid="$(cat /run/munge/munged.pid 2>/dev/null)"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ]; then kill "$pid"; fi
  echo "slurm_local: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop"; exit 2 ;;
esac
