#!/usr/bin/env bash
# Runs the kernel tests under the Triton interpreter of a second Triton version (default 3.6.0, the GPU machines'
# version; the pinned one in requirements.txt is tested by the main suite). Creates, or reuses, a small venv with
# --system-site-packages that holds only that Triton, so torch, numpy and pytest come from the main environment.
#   scripts/triton_compat.sh [pytest args...]        (default: the seven kernel and op test files below, -q -x;
#                                                     about 5 minutes on 2 cores)
# Env: TRITON_COMPAT_VERSION (3.6.0), TRITON_COMPAT_VENV (~/.cache/sfmkern/venv-triton-<version>).
set -euo pipefail
cd "$(dirname "$0")/.."
version="${TRITON_COMPAT_VERSION:-3.6.0}"
venv="${TRITON_COMPAT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sfmkern/venv-triton-$version}"
py="$venv/bin/python"
if ! "$py" -c "import triton, sys; sys.exit(triton.__version__ != '$version')" 2>/dev/null; then
  echo "triton_compat: creating $venv with triton==$version"
  # no pip inside the venv (ensurepip took ~40 s of a CI run): the main interpreter's pip installs into it (--python,
  # pip >= 22.3); an older pip falls back to a venv with its own pip
  if python3 -m pip --help | grep -q -- '--python <python>'; then
    python3 -m venv --without-pip --system-site-packages "$venv"
    python3 -m pip --python "$py" install -q --no-deps "triton==$version"
  else
    python3 -m venv --system-site-packages "$venv"
    "$py" -m pip install -q --no-deps "triton==$version"
  fi
fi
"$py" -c "import triton, torch, numpy; print('triton_compat: triton', triton.__version__, '| torch', torch.__version__, '| numpy', numpy.__version__)"
if [ "$#" -eq 0 ]; then
  set -- -q -x -p no:cacheprovider tests/test_ops.py tests/test_ops_grid.py tests/test_kernels_grid.py \
    tests/test_kernels_strides.py tests/test_kernels_anchor.py tests/test_kernels_bounds.py tests/test_custom_ops.py
fi
start=$(date +%s)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE \
  "$py" -m pytest "$@"
echo "triton_compat: triton $version kernel tests passed in $(( $(date +%s) - start )) s"
