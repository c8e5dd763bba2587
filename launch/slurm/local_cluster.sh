#!/usr/bin/env bash
# A private one-host Slurm cluster (munged + slurmctld + slurmd), every file under one folder: to try
# launch/slurm/train.sbatch without a cluster, and what tests/cluster/test_slurm.py submits to.
#
#   launch/slurm/local_cluster.sh install           # Debian's slurm-wlm daemons + munge (root; apt-get)
#   launch/slurm/local_cluster.sh start DIR         # prints the slurm.conf path: export SLURM_CONF=<it>
#   SLURM_CONF=DIR/slurm.conf sbatch launch/slurm/train.sbatch +exp=tiny
#   launch/slurm/local_cluster.sh stop DIR
#
# The daemons run as the calling user (root here) with their own munge key and socket, free ports,
# no cgroups (proctrack/linuxproc) and no accounting; the node has this machine's cores and memory
# and no GPUs. Nothing under /etc is touched, so it does not disturb a system Slurm.
set -euo pipefail

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

case "${1:-}" in
install)
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && exit 0
  if [ "$(id -u)" != 0 ]; then
    echo "local_cluster.sh install: needs root (apt-get install slurmctld slurmd slurm-client munge)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  ;;
start)
  dir=$(realpath -m "${2:?usage: local_cluster.sh start DIR}")
  mkdir -p "$dir"/{state,spool,log,munge}
  chmod 700 "$dir/munge"
  head -c 1024 /dev/urandom > "$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
  node=$(hostname)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  : > "$dir/plugstack.conf"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=ember-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -f "$dir/slurm.conf" -i
  slurmd -f "$dir/slurm.conf"
  # Ready when the node reports idle.
  for _ in $(seq 1 60); do
    if SLURM_CONF="$dir/slurm.conf" sinfo -h -o %T 2>/dev/null | grep -q idle; then
      echo "$dir/slurm.conf"
      exit 0
    fi
    sleep 0.5
  done
  echo "local_cluster.sh start: the node did not come up; see $dir/log" >&2
  exit 1
  ;;
stop)
  dir=$(realpath -m "${2:?usage: local_cluster.sh stop DIR}")
  for pid_file in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
  done
  ;;
*)
  echo "usage: local_cluster.sh install | start DIR | stop DIR" >&2
  exit 2
  ;;
esac
