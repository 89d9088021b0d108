#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests/test_slurm.py and for trying
# `reproduce.py --slurm` (docs/reproducing.md, "On a SLURM cluster"). As root, on Debian or Ubuntu:
#
#     bash tests/slurm_up.sh          # install what is missing, write the configuration, start
#     bash tests/slurm_up.sh stop     # stop the daemons
#
# One node (this machine, at 127.0.0.1, with its own cores and memory), one partition, no
# accounting, no systemd (munged runs as the munge user; slurmctld and slurmd as root). Requeued
# jobs may start again after 10 s (AuthInfo=cred_expire), not 120. State and logs under
# $EMA_SLURM_STATE (default /tmp/ema-slurm). It writes /etc/slurm/slurm.conf, and refuses to replace
# one it did not write.
set -euo pipefail
state=${EMA_SLURM_STATE:-/tmp/ema-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by tests/slurm_up.sh"

stop() {
  for pid in "$state/slurmd.pid" "$state/slurmctld.pid" /run/munge/munged.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
}

if [ "${1:-}" = stop ]; then
  stop
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: run it as root" >&2; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi
if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
  echo "slurm_up.sh: $conf exists and is not this script's: not replacing it" >&2
  exit 1
fi
stop
sleep 0.5
mkdir -p "$state/ctld" "$state/spool" /etc/slurm
host=$(hostname -s)
# This machine's cores and memory as slurmd sees them (memory a little under, for the system).
node=$(slurmd -C | head -1 | sed -E 's/ RealMemory=([0-9]+)//')
memory=$(slurmd -C | head -1 | sed -E 's/.*RealMemory=([0-9]+).*/\1/')
cat > "$conf" <<EOF
$marker (this repo's single-node test cluster)
ClusterName=ema-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
MailProg=/bin/true
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=5
$node NodeAddr=127.0.0.1 RealMemory=$((memory * 9 / 10))
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
mkdir -p /run/munge
chown munge:munge /run/munge
su -s /bin/sh munge -c munged
slurmctld -i
slurmd
for _ in $(seq 50); do
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then
    echo "slurm_up.sh: node $host idle; stop with: bash tests/slurm_up.sh stop"
    exit 0
  fi
  sleep 0.2
done
echo "slurm_up.sh: the node did not come up; logs in $state" >&2
sinfo >&2 || true
exit 1
