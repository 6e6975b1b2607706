"""`torchrun -m sfmkern ...` joins a gloo process group and gives the same statistics and images as one process."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")

COMMON = ["--backbone", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, cwd, world: int = 1) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TRITON_INTERPRET="0")
    if world == 1:
        cmd = [sys.executable, "-m", "sfmkern", "--quiet", *args]
    else:
        cmd = ["torchrun", "--nnodes", "1", "--nproc-per-node", str(world), "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "sfmkern", "--quiet", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_torchrun_two_ranks_equal_one_process(photo_folder, tmp_path):
    from sfmkern.distillation import DistilledSet
    from sfmkern.stats import ClassStats

    stats_args = ["stats", "--data", str(photo_folder), *COMMON, "--resize", "40", "--crop", "32", "--batch-size", "3"]
    _run([*stats_args, "--out", "one.safetensors"], tmp_path)
    _run([*stats_args, "--out", "two.safetensors"], tmp_path, world=2)
    one, two = ClassStats.load(tmp_path / "one.safetensors"), ClassStats.load(tmp_path / "two.safetensors")
    assert two.run_info["world_size"] == 2
    assert torch.equal(one.counts, two.counts)
    torch.testing.assert_close(two.centres, one.centres, rtol=1e-5, atol=1e-6)

    distill_args = ["distill", "--stats", "one.safetensors", *COMMON, "--syn-res", "40", "--crop", "32", "--steps", "4",
                    "--ipc", "2", "--grow-every", "2"]
    _run([*distill_args, "--out-dir", "d1"], tmp_path)
    _run([*distill_args, "--out-dir", "d2"], tmp_path, world=2)
    a = DistilledSet.load(tmp_path / "d1" / "distilled.safetensors")
    b = DistilledSet.load(tmp_path / "d2" / "distilled.safetensors")
    assert a.images.shape == (6, 3, 40, 40)
    assert (a.images.int() - b.images.int()).abs().max() <= 1  # uint8 rounding of fp32 sums in another order
