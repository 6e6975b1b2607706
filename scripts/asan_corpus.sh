#!/usr/bin/env bash
# Runs the decoder's robustness corpus (tests/decode_corpus.py: broken, hostile and edge-case files, plus seeded
# mutants and scikit-image's real photos) through the C++ decode core built with AddressSanitizer + UBSan, on a
# 2-thread pool, fused and full-size. Exits non-zero on any sanitizer report (leaks included).
#   bash scripts/asan_corpus.sh            # configure + build build/asan, then run
#   bash scripts/asan_corpus.sh --driver PATH   # run with an already built driver (what `ctest` does)
set -euo pipefail
cd "$(dirname "$0")/.."
MUTANTS="${SFMKERN_ASAN_MUTANTS:-300}"
# shellcheck source=scripts/asan_build.sh
source scripts/asan_build.sh
asan_target corpus_driver "$@"
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
python3 tests/decode_corpus.py "$corpus" "$MUTANTS" >/dev/null
photos=$(python3 -c "import pathlib, skimage.data as d; p = pathlib.Path(d.__file__).parent; \
print(' '.join(str(f) for f in sorted(p.glob('*.png')) + sorted(p.glob('*.jpg'))))")
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=86"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
log="$corpus/driver.log"
# shellcheck disable=SC2086
if ! "$driver" "$corpus"/* $photos >"$log" 2>&1; then
  tail -n 60 "$log"
  echo "asan_corpus: FAILED (sanitizer report above)" >&2
  exit 1
fi
tail -n 1 "$log"
echo "asan_corpus: clean ($(grep -c ': fused=' "$log") files)"
