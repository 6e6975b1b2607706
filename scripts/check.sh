#!/usr/bin/env bash
# scripts/check.sh — every check CI runs after scripts/setup.sh, as one command (README's test command):
#   ruff, then two lanes side by side (on 2 cores the whole check takes about 63% of its serial time):
#   tools   the decoder's robustness corpus under ASan + UBSan (scripts/asan_corpus.sh), the 60 s mutation fuzzer
#           (scripts/fuzz_decoder.sh), the quick demo and its gate (exit 3 when an SFM row falls below random real)
#           with a parse check of its report, the CPU-safe parts of the GPU check (scripts/gpu_check.sh --cpu), and
#           kernel tests under Triton 3.6's interpreter (scripts/triton_compat.sh); it stops at its first failure
#   pytest  the test suite (TRITON_INTERPRET=1, HF_HUB_OFFLINE=1)
# The pytest lane streams to stdout; the tools lane writes build/check-tools.log (kept), printed when both are done,
# each step with its time. Exit status 1 when either lane failed; an interrupted check (Ctrl-C, TERM, or its
# parent killed) stops both lanes. Nothing in the suite is timed against a wall clock (no speed-up assertions), so
# the lanes can share the cores.
#   bash scripts/check.sh            # both lanes at once
#   bash scripts/check.sh --serial   # one lane after the other (a 1-core machine, or to read the output in order)
#   bash scripts/check.sh --tools    # the tools lane only (no ruff);  --pytest [ARGS...]: the pytest lane only
set -uo pipefail
cd "$(dirname "$0")/.."
mode=both
case "${1:-}" in
  --serial) mode=serial; shift ;;
  --tools) mode=tools; shift ;;
  --pytest) mode=pytest; shift ;;
  -h|--help) sed -n '2,15p' scripts/check.sh; exit 0 ;;
  "") ;;
  *) echo "check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1
start=$(date +%s)

# One step of the tools lane: its name, the command; prints "check: NAME ok|FAILED (rc) in N s".
step() {
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  echo "=== check: $name"
  "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then echo "check: $name ok in $(( $(date +%s) - t0 )) s"
  else echo "check: $name FAILED (exit $rc) after $(( $(date +%s) - t0 )) s"; fi
  return "$rc"
}

parse_demo_report() {
  python3 -c "from sfmkern.demo import parse_report_table as p
rows, ref = p('demo-quick/report.md'), p('demo-quick/report.md', table='reference')
assert len(rows) >= 6 and len(ref) >= 2, (rows, ref)
print('demo-quick: results table with', len(rows), 'rows, reference table with', len(ref))"
}

tools_lane() {
  step asan-corpus bash scripts/asan_corpus.sh &&
  step fuzz bash scripts/fuzz_decoder.sh &&
  step quick-demo python3 -m sfmkern --quiet demo --quick --out demo-quick &&
  step quick-demo-report parse_demo_report &&
  step gpu-check-cpu bash scripts/gpu_check.sh --cpu &&
  step triton-3.6 bash scripts/triton_compat.sh -q -x -p no:cacheprovider tests/test_kernels_strides.py \
    tests/test_kernels_grid.py::test_small_multiblock
}

pytest_lane() {
  TRITON_INTERPRET=1 python3 -m pytest -q -ra "${@:-tests}"
}

case "$mode" in
  tools)
    # started by the `both` mode in a session of its own: stop the whole session when that parent goes away
    if [ -n "${CHECK_PARENT_PID:-}" ]; then
      ( while kill -0 "$CHECK_PARENT_PID" 2>/dev/null; do sleep 2; done; kill -- -$$ 2>/dev/null ) &
    fi
    tools_lane; rc=$?
    echo "check: tools lane exit $rc in $(( $(date +%s) - start )) s"
    exit "$rc" ;;
  pytest) pytest_lane "$@"; exit $? ;;
esac
python3 -m ruff check . || { echo "check: ruff FAILED" >&2; exit 1; }
case "$mode" in
  serial)
    tools_lane; tools_rc=$?
    pytest_lane; pytest_rc=$?
    ;;
  both)
    mkdir -p build
    log=build/check-tools.log
    # the tools lane in a session of its own, so that an interrupted check can stop all of it
    CHECK_PARENT_PID=$$ setsid bash scripts/check.sh --tools >"$log" 2>&1 &
    tools_pid=$!
    pytest_lane &
    pytest_pid=$!
    stop_lanes() {
      kill "$pytest_pid" 2>/dev/null
      kill -- -"$tools_pid" 2>/dev/null
      echo "check: interrupted; the tools lane's log so far ($log):" >&2
      tail -n 40 "$log" >&2
    }
    trap 'stop_lanes; exit 130' INT
    trap 'stop_lanes; exit 143' TERM
    wait "$pytest_pid"; pytest_rc=$?
    wait "$tools_pid"; tools_rc=$?
    trap - INT TERM
    echo "=============================== tools lane log ($log) ==============================="
    cat "$log"
    ;;
esac
echo "check: pytest lane exit $pytest_rc, tools lane exit $tools_rc, total $(( $(date +%s) - start )) s"
[ "$pytest_rc" -eq 0 ] && [ "$tools_rc" -eq 0 ]
