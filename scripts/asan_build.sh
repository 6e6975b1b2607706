#!/usr/bin/env bash
# Sourced by scripts/asan_corpus.sh and scripts/fuzz_decoder.sh: `asan_target TARGET [--driver PATH]` sets $driver to
# PATH when given, else configures build/asan with AddressSanitizer + UBSan and builds TARGET there.
asan_target() {
  local target="$1"
  driver=""
  if [ "${2:-}" = "--driver" ]; then driver="$3"; return; fi
  local build=build/asan
  local gen=(); command -v ninja >/dev/null && [ ! -f "$build/Makefile" ] && gen=(-G Ninja)
  cmake -S . -B "$build" "${gen[@]}" -DSFMKERN_ASAN=ON -DSFMKERN_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" --target "$target" -j "$(nproc)" >/dev/null
  driver="$build/$target"
}
