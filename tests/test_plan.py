"""sfmkern.plan: the mode and chunk the Distiller would choose, FLOPs that scale with the views, and a peak-memory
prediction within 25% of what benchmarks/memory.py measures (CPU, each configuration in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone

import sfmkern
from sfmkern.distillation import DistillConfig, Distiller

ROOT = Path(__file__).resolve().parent.parent
MODEL = "vit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(MODEL)


def test_plan_agrees_with_the_distiller(backbone):
    model_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    budget = model_bytes + 40 * 2**20
    p = sfmkern.plan(backbone, 100, ipc=1, augs=2, crop=32, syn_res=32, max_memory=budget)
    flow = torch.randn(100, backbone.feature_dim)
    d = Distiller(flow - flow.mean(0), backbone,
                  config=DistillConfig(ipc=1, augs=2, crop=32, syn_res=32, max_memory=budget))
    assert (p.mode, p.chunk_size, p.checkpointing) == (d.resolve_mode("auto"), d.chunk_size, d.checkpointing)
    assert p.mode == "two_phase" and 8 <= p.chunk_size < 200 and not p.checkpointing
    assert p.peak_bytes <= budget and p.peak_bytes == p.step_bytes + model_bytes
    tight = sfmkern.plan(backbone, 100, ipc=1, augs=2, crop=32, syn_res=32,
                         max_memory=int(model_bytes + p.images_bytes + 3 * p.bytes_per_view))
    assert tight.checkpointing and tight.bytes_per_view < p.bytes_per_view
    assert "mode two_phase" in str(p) and "TFLOP per step" in str(p)


def test_flops_and_time_scale_with_the_mode_and_the_views(backbone):
    single = sfmkern.plan(backbone, 10, crop=32, syn_res=32, mode="single", tflops=2.0)
    lagged = sfmkern.plan(backbone, 10, crop=32, syn_res=32, mode="lagged", chunk_size=4)
    two = sfmkern.plan(backbone, 10, crop=32, syn_res=32, mode="two_phase", chunk_size=4)
    double = sfmkern.plan(backbone, 20, crop=32, syn_res=32, mode="single")
    assert single.flops_per_step > 0 and lagged.flops_per_step == single.flops_per_step
    assert double.flops_per_step == pytest.approx(2 * single.flops_per_step)
    # chunks of 4, 4, 2 views: the last chunk's graph is kept, the 8 views before it run one more forward
    assert 1.35 < two.flops_per_step / single.flops_per_step < 1.45  # 1 + (8 / 10) F / (F + B), B = F
    assert single.seconds_per_step == pytest.approx(single.flops_per_step / 2e12)
    measured = sfmkern.plan(backbone, 10, crop=32, syn_res=32, measure_steps=1)
    assert measured.seconds_per_step > 0 and "measured" in measured.seconds_from
    chunked = sfmkern.plan(backbone, 10, crop=32, syn_res=32, mode="two_phase", chunk_size=4, measure_steps=1)
    assert chunked.seconds_per_step > 0 and "probe steps of 8 views" in chunked.seconds_from  # two chunks timed
    with pytest.raises(ValueError, match="num_classes"):
        sfmkern.plan(backbone, 1)
    with pytest.raises(ValueError, match="does not even hold"):
        sfmkern.plan(backbone, 10, max_memory=1000)


@pytest.mark.parametrize("views,chunk", [(10, 4), (10, 10), (12, 5)])
def test_two_phase_flops_match_a_counted_step(backbone, views, chunk):
    from torch.utils.flop_counter import FlopCounterMode

    p = sfmkern.plan(backbone, views, ipc=1, augs=1, crop=32, syn_res=32, mode="two_phase", chunk_size=chunk)
    flow = torch.randn(views, backbone.feature_dim)
    d = Distiller(flow - flow.mean(0), backbone,
                  config=DistillConfig(ipc=1, augs=1, crop=32, syn_res=32, grow_every=0, chunk_size=chunk))
    with FlopCounterMode(display=False) as counter:
        d.forward_backward("two_phase")
    # the plan counts the backbone only; the step also counts the pyramid's upsampling products (about 0.5% here),
    # while a forward too many or too few would be 6% (12, 5), 7% (10, 4) or 50% (10, 10) off
    assert p.flops_per_step == pytest.approx(counter.get_total_flops(), rel=0.02)
    single = sfmkern.plan(backbone, views, ipc=1, augs=1, crop=32, syn_res=32, mode="single")
    assert (p.flops_per_step == pytest.approx(single.flops_per_step)) == (chunk >= views)


def _measured_step_bytes(config: str, method: str, chunk: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072", OMP_WAIT_POLICY="PASSIVE",
               HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--child", config, "--method", method,
           "--model", MODEL, "--crop", "32", "--syn-res", "32", "--chunk", str(chunk), "--steps", "3",
           "--threads", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["step"]


@pytest.mark.parametrize("config,method,mode,chunk", [("120x1x1", "sfm_single", "single", 120),
                                                      ("100x1x3", "sfm_two_phase", "two_phase", 60)])
def test_memory_prediction_within_25_percent_of_memory_py(backbone, config, method, mode, chunk):
    c, ipc, a = (int(v) for v in config.split("x"))
    predicted = sfmkern.plan(backbone, c, ipc=ipc, augs=a, crop=32, syn_res=32, mode=mode, chunk_size=chunk).step_bytes
    measured = _measured_step_bytes(config, method, chunk)
    assert measured > 20 * 2**20  # the activations dominate RSS noise (about ±2 MiB)
    error = predicted / measured - 1
    assert abs(error) <= 0.25, f"{config} {mode}: predicted {predicted / 2**20:.1f} MiB, measured " \
                               f"{measured / 2**20:.1f} MiB ({error:+.0%})"
