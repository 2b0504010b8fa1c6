# Sourced by the launch scripts (not run on its own): `supervise N COMMAND...` runs a launcher (torchrun, the deepspeed
# launcher) that starts N ranks on this host, and makes the script behave like one well-mannered process:
# - signals: the launcher runs in its own session, so SIGTERM / SIGINT / SIGHUP / SIGUSR1 sent to this script's pid,
#   to its process group (`kill -TERM -PGID`, Ctrl-C, a container stop) reach the launcher exactly once, forwarded
#   by this script (torchrun turns a second copy into a second shutdown);
# - orphans: the ranks learn this script's pid (SSLSCALE_LAUNCHER_PID / _HOST); if the script dies, even by `kill -9`,
#   they checkpoint and exit (sslscale/train/signals.py), and their launcher with them;
# - exit status: 0 finished, 75 preempted (checkpointed; rerun to resume), 2 bad input, 3 non-finite stop, 1 error
#   (sslscale/train/rundir.py), from the ranks' own reports (SSLSCALE_EXIT_FILE): torchrun exits 1 after any signal
#   and the deepspeed runner dies of it, so the launcher's status alone cannot tell a preemption from a crash.
# torchrun: forward SIGUSR1 too (SLURM's pre-timeout signal) and give ranks time to write their checkpoint.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

_sslscale_forward() {  # _sslscale_forward SIGNAL: to the launcher's whole process group (its session leader)
  [ -n "${_sslscale_child:-}" ] && kill -s "$1" -- "-$_sslscale_child" 2>/dev/null
  return 0
}

supervise() {  # supervise EXPECTED_LOCAL_RANKS COMMAND...
  local - expect=$1 rc=0 code exit_file
  shift
  set +e
  exit_file=$(mktemp "${TMPDIR:-/tmp}/sslscale-exit.XXXXXX") || return 1
  export SSLSCALE_EXIT_FILE=$exit_file SSLSCALE_LAUNCHER_PID=$$ SSLSCALE_LAUNCHER_HOST
  SSLSCALE_LAUNCHER_HOST=$(hostname)
  trap '_sslscale_forward TERM' TERM
  trap '_sslscale_forward INT' INT
  trap '_sslscale_forward HUP' HUP
  trap '_sslscale_forward USR1' USR1
  if command -v setsid >/dev/null; then
    setsid "$@" &  # a background job is no process-group leader, so setsid execs in place: $! is the launcher
  else
    "$@" &
  fi
  _sslscale_child=$!
  while :; do
    wait "$_sslscale_child"
    rc=$?
    kill -0 "$_sslscale_child" 2>/dev/null || break  # else a trapped signal interrupted the wait
  done
  # The deepspeed runner can die of the signal while its launcher and ranks still write the checkpoint: wait for
  # everything in the launcher's process group.
  while kill -0 -- "-$_sslscale_child" 2>/dev/null; do sleep 0.2; done
  trap - TERM INT HUP USR1
  _sslscale_child=
  "${PYTHON:-$(command -v python || command -v python3)}" -m sslscale.train.rundir exit-code "$exit_file" --expect "$expect" --launcher-rc "$rc"
  code=$?
  rm -f "$exit_file"
  return "$code"
}
