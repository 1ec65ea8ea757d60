#!/usr/bin/env bash
# Stop the daemons scripts/slurm_up.sh started -- by their PID files in /run/fewstep-slurm, never
# by name, so that a munged or MariaDB this script did not start is left running. Two rounds, each
# signalled together and then awaited (up to 15 s; each daemon takes ~2 s to exit): the SLURM
# daemons, then MariaDB and munged, which they use.
# Configuration, state and the accounting database stay (job ids keep counting up between
# bring-ups, so `sacct -j <id>` never mixes two jobs).
set -u
RUN_DIR=/run/fewstep-slurm

stop() {  # stop PIDFILE...: SIGTERM to each, then wait for all of them
  local f pid pids=() names=()
  for f in "$@"; do
    [ -f "$RUN_DIR/$f" ] || continue
    pid=$(cat "$RUN_DIR/$f" 2>/dev/null)
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then pids+=("$pid"); names+=("$f"); fi
    rm -f "$RUN_DIR/$f"
  done
  for i in "${!pids[@]}"; do
    for _ in $(seq 1 75); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "slurm_down: ${names[$i]} (pid ${pids[$i]}) still running after 15 s" >&2
    else
      echo "slurm_down: stopped ${names[$i]%.pid} (pid ${pids[$i]})"
    fi
  done
}

stop slurmd.pid slurmctld.pid slurmdbd.pid
stop mysql/mariadbd.pid munge/munged.pid
exit 0
