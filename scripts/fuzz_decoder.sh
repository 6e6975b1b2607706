#!/usr/bin/env bash
# Bounded mutation fuzzing of the decode core under AddressSanitizer + UBSan (csrc/fuzz_driver.cpp): the seeds are
# the robustness corpus of tests/decode_corpus.py, the mutations random byte flips, truncations, inserted/spliced
# bytes and JPEG/PNG header edits, with a fixed seed and a time box. A sanitizer report ends one round: its SUMMARY
# line is the crash signature, the input is kept in the crash folder, and the next round continues with the next
# seed until the time is up. Prints executions and unique crashes; exits non-zero when there is any crash.
#   bash scripts/fuzz_decoder.sh                       # 60 s, seed 1, 2 threads (what CI runs)
#   SFMKERN_FUZZ_SECONDS=600 SFMKERN_FUZZ_SEED=7 bash scripts/fuzz_decoder.sh
#   bash scripts/fuzz_decoder.sh --driver PATH        # with an already built fuzz_driver
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BUDGET="${SFMKERN_FUZZ_SECONDS:-60}"
SEED="${SFMKERN_FUZZ_SEED:-1}"
THREADS="${SFMKERN_FUZZ_THREADS:-2}"
CRASH_DIR="${SFMKERN_FUZZ_CRASH_DIR:-build/fuzz-crashes}"
# shellcheck source=scripts/asan_build.sh
source scripts/asan_build.sh
asan_target fuzz_driver "$@"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 tests/decode_corpus.py "$work/seeds" 0 >/dev/null
mkdir -p "$CRASH_DIR"
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=86"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
start=$(date +%s)
executions=0
rounds=0
declare -A signatures=()
while :; do
  left=$(( SECONDS_BUDGET - ($(date +%s) - start) ))
  [ "$left" -gt 0 ] || break
  round_seed=$(( SEED + rounds ))
  rounds=$(( rounds + 1 ))
  log="$work/round-$rounds.log"
  round_crashes="$work/crashes-$rounds"
  mkdir -p "$round_crashes"
  if "$driver" --seed "$round_seed" --seconds "$left" --threads "$THREADS" --crash-dir "$round_crashes" \
       "$work"/seeds/* >"$log" 2>&1; then
    n=$(sed -n 's/^executions: \([0-9]*\)$/\1/p' "$log" | tail -n 1)
    executions=$(( executions + ${n:-0} ))
  else
    n=$(sed -n 's/^fuzz_driver: executions before the report: \([0-9]*\)$/\1/p' "$log" | tail -n 1)
    executions=$(( executions + ${n:-0} ))
    sig=$(grep -m 1 '^SUMMARY:' "$log" || grep -m 1 -E 'runtime error|ERROR:' "$log" || echo "exit status without report")
    if [ -z "${signatures[$sig]+x}" ]; then
      signatures[$sig]=1
      kept="$CRASH_DIR/crash-$(date +%s)-seed$round_seed"
      mkdir -p "$kept"
      cp "$log" "$kept/report.log"
      cp "$round_crashes"/* "$kept/" 2>/dev/null || true
      echo "fuzz_decoder: new crash (seed $round_seed): $sig -> $kept" >&2
      grep -A 12 -E '^(==[0-9]+==ERROR|.*runtime error)' "$log" | head -n 30 >&2 || true
    fi
  fi
done
elapsed=$(( $(date +%s) - start ))
unique=${#signatures[@]}
echo "fuzz_decoder: $executions executions in ${elapsed} s ($rounds round(s), seed $SEED, $THREADS threads), $unique unique crashes"
[ "$unique" -eq 0 ]
