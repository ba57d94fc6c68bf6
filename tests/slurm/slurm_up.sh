#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on localhost for tests (Debian 12, root): installs
# slurmctld/slurmd/munge if missing, writes a config under $BASE, starts the daemons.
set -euo pipefail
BASE=${BASE:-/tmp/fusion-slurm}
export SLURM_CONF=$BASE/slurm.conf
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
rm -rf "$BASE"; mkdir -p "$BASE"/{state,spool,log}
hardware=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
cat > "$SLURM_CONF" <<CONF
ClusterName=fusiontest
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
KillWait=5
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
setsid slurmctld -D -i >"$BASE/log/slurmctld.out" 2>&1 & echo $! > "$BASE/slurmctld.bgpid"
setsid slurmd -D -N localhost >"$BASE/log/slurmd.out" 2>&1 & echo $! > "$BASE/slurmd.bgpid"
for _ in $(seq 150); do
  [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | wc -l)" -eq 1 ] && { echo "slurm up"; exit 0; }
  sleep 0.2
done
echo "the SLURM node did not become idle"; tail -n 20 "$BASE"/log/*; exit 1
