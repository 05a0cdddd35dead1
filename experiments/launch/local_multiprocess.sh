#!/usr/bin/env bash
# Start N attnflax processes on this machine as one multi-process JAX job.
#
#   experiments/launch/local_multiprocess.sh N [flags for attnflax.main ...]
#   e.g. experiments/launch/local_multiprocess.sh 2 --workdir=runs/digits_2proc
#
# Each process gets DEVICES_PER_PROCESS forced CPU devices (default 1) and joins the
# job through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, with Gloo
# collectives on CPU. The default config is experiments/configs/digits.py and the
# default workdir runs/digits_<N>proc. Process i logs to <workdir>/logs/process_<i>.log;
# process 0's output is also shown here. If any process fails, the others are stopped
# and the script exits non-zero. Needs: the .venv made by `make venv` (or PYTHON=...).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [--config=FILE] [--workdir=DIR] [--config.key=value ...]" >&2
  exit 2
fi
N=$1; shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
PORT=${PORT:-$(( 20000 + RANDOM % 20000 ))}

config="--config=$ROOT/experiments/configs/digits.py"
workdir="runs/digits_${N}proc"
extra=()
for arg in "$@"; do
  case "$arg" in
    --config=*) config="$arg" ;;
    --workdir=*) workdir="${arg#--workdir=}" ;;
    *) extra+=("$arg") ;;
  esac
done
mkdir -p "$workdir/logs"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for (( i = 0; i < N; i++ )); do
  (
    export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
    export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
    export JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i
    exec "$PYTHON" -m attnflax.main "$config" "--workdir=$workdir" "${extra[@]}"
  ) > "$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $N processes (coordinator localhost:$PORT, $DEVICES_PER_PROCESS CPU device(s) each)"
echo "logs: $workdir/logs/process_*.log"
tail -n +1 -f "$workdir/logs/process_0.log" --pid "${pids[0]}" &
tailer=$!

status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  # Wait for whichever process ends first; a failure stops the whole job.
  if wait -n "${remaining[@]}"; then :; else status=$?; fi
  alive=()
  for p in "${remaining[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
  remaining=("${alive[@]}")
  if (( status != 0 )); then
    echo "a process exited with status $status; stopping the others (see $workdir/logs)" >&2
    break
  fi
done
wait "$tailer" 2>/dev/null || true
exit $status
