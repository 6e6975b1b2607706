"""Plan a distillation run before starting it: the step mode and chunk size it will use, its predicted peak memory and
FLOPs per step, and its time per step (at a given TFLOP/s, or measured on this device over a few probe steps).

    import sfmkern
    print(sfmkern.plan("dinov2_vitb", num_classes=1000, ipc=10, max_memory="80GiB", tflops=400))

Everything is measured on a small probe `Distiller` (2+ classes at the run's A, resolution and parameterisation) and
scaled to the run's C·ipc·A views; the full set of images is never allocated. Memory: the images' parameters,
gradients and Adam state at full pyramid (16 bytes per parameter) plus one chunk of activations, per view the bytes
saved for backward by the same probe the Distiller sizes its chunks with (× 1.1 for transients, where the chunk
sizing uses × 1.5 as a margin), plus the backbone's weights.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from sfmkern.backbone import Backbone, load_backbone
from sfmkern.distillation.config import (
    CPU_DEFAULT_CHUNK,
    MODES,
    PROBE_TRANSIENT,
    DistillConfig,
    chunk_for_budget,
    own_bytes_max,
    parse_bytes,
)
from sfmkern.distillation.distiller import Distiller

_MIB = 2**20
# Predicted activations per view = bytes saved for backward × this. The chunk sizing keeps its × 1.5 margin; the peak
# measured by benchmarks/memory.py on CPU (vit_small_patch16_224 at 32 px: single-phase 100 views, two-phase chunks
# of 50) was 1.07× the saved bytes plus the images' state, so the prediction uses 1.1.
_PEAK_TRANSIENT = 1.1


@dataclass
class Plan:
    """What a run will do per step. Bytes are int, FLOPs float, seconds float or None."""

    backbone: str
    device: str
    num_classes: int
    ipc: int
    augs: int
    crop: int
    syn_res: int
    views: int
    mode: str
    chunk_size: int
    checkpointing: bool
    activation_budget: int | None  # bytes the chunks' activations may use (None: CPU without max_memory)
    bytes_per_view: float  # the chunk sizing's activation bytes per view (with checkpointing when it is on)
    model_bytes: int
    images_bytes: int  # the images' parameters, gradients and Adam state at full pyramid
    step_bytes: int  # predicted peak above the loaded model: images_bytes + one chunk of activations
    peak_bytes: int  # step_bytes + model_bytes
    flops_per_step: float
    seconds_per_step: float | None
    seconds_from: str  # "tflops=..." / "measured ..." / "not estimated"

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        budget = ("none (CPU default chunk)" if self.activation_budget is None
                  else f"{self.activation_budget / _MIB:,.0f} MiB")
        lines = [
            f"plan: {self.backbone} on {self.device}, C={self.num_classes} ipc={self.ipc} A={self.augs}, "
            f"crop {self.crop}, syn_res {self.syn_res}: {self.views} views per step",
            f"  mode {self.mode}, chunk {self.chunk_size} views, activation checkpointing "
            f"{'on' if self.checkpointing else 'off'}; activation budget {budget}",
            f"  memory: {self.bytes_per_view / _MIB:.2f} MiB of activations per view; images + grads + Adam "
            f"{self.images_bytes / _MIB:,.1f} MiB; predicted peak {self.peak_bytes / _MIB:,.1f} MiB "
            f"({self.step_bytes / _MIB:,.1f} MiB above the {self.model_bytes / _MIB:,.1f} MiB of weights)",
            f"  compute: {self.flops_per_step / 1e12:,.3f} TFLOP per step",
        ]
        if self.seconds_per_step is not None:
            lines.append(f"  time: {self.seconds_per_step:,.3f} s per step ({self.seconds_from})")
        return "\n".join(lines)


def _flops_per_view(backbone, views: int, crop: int, checkpointing: bool) -> tuple[float, float]:
    """(forward without autograd, forward + backward to the input) FLOPs per view of the backbone at `crop`."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(views, 3, crop, crop, device=backbone.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone.features(x)
    forward = counter.get_total_flops()
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as counter, backbone.grad_checkpointing_on(checkpointing):
        feats = backbone.features(x)
        feats.backward(torch.ones_like(feats))
    return forward / views, counter.get_total_flops() / views


def step_flops(mode: str, views: int, chunk: int, forward: float, forward_backward: float) -> float:
    """FLOPs of one step of `mode` over `views` views in chunks of `chunk`, from the per-view FLOPs of a forward
    without autograd and of a forward + backward to the input: single and lagged run every view once with autograd;
    two-phase also runs a forward without autograd for every chunk but the last (whose graph it keeps)."""
    if mode != "two_phase":
        return views * forward_backward
    last = views - chunk * ((views - 1) // chunk)
    return views * forward_backward + (views - last) * forward


def _probe_distiller(backbone, num_classes: int, ipc: int, augs: int, crop: int, syn_res: int, param: str,
                     chunk: int | None, seed: int = 0) -> Distiller:
    gen = torch.Generator().manual_seed(seed)
    flow = torch.randn(num_classes, backbone.feature_dim, generator=gen)
    flow -= flow.mean(0)
    cfg = DistillConfig(ipc=ipc, augs=augs, syn_res=syn_res, crop=crop, grow_every=0, param=param, chunk_size=chunk,
                        seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Distiller(flow.to(backbone.device), backbone, config=cfg)


def plan(backbone, num_classes: int, *, ipc: int = DistillConfig.ipc, augs: int = DistillConfig.augs,
         crop: int | None = None, syn_res: int | None = None, max_memory: int | str | None = None, device=None,
         mode: str = "auto", chunk_size: int | None = None, param: str = DistillConfig.param,
         tflops: float | None = None, measure_steps: int = 0) -> Plan:
    """Plan a run of `distill(..., ipc, augs, crop, syn_res, max_memory, chunk_size, mode)` without allocating it.

    backbone: a loaded `Backbone` or a name (loaded with random weights: neither memory nor FLOPs depend on them).
    crop: the backbone's input side (default: its input size); syn_res: the images' side (default 256, or crop when
    that is larger). max_memory: bytes or "80GiB" (default: 85% of the free memory on CUDA, none on CPU). tflops: the
    sustained rate to convert FLOPs into seconds; measure_steps > 0: time that many probe steps of the chosen mode
    (one chunk of views for single-phase, two chunks for two-phase and lagged, after one warm-up step) on the
    backbone's device and scale the best to the run's FLOPs.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in (("num_classes", num_classes), ("ipc", ipc), ("augs", augs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (2 if name == "num_classes" else 1):
            raise ValueError(f"plan: {name} must be an int >= {2 if name == 'num_classes' else 1}, got {value!r}")
    if tflops is not None and not tflops > 0:
        raise ValueError(f"plan: tflops must be positive, got {tflops!r}")
    if not isinstance(backbone, Backbone):
        torch.manual_seed(0)
        backbone = load_backbone(str(backbone), pretrained=False, img_size=crop, device=device)
    backbone.model.requires_grad_(False)
    crop = crop or backbone.input_size
    syn_res = syn_res or max(256, crop)
    dev = torch.device(backbone.device)
    views = num_classes * ipc * augs
    model_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    images_bytes = own_bytes_max(num_classes * ipc, syn_res, param)

    probe = _probe_distiller(backbone, 2, 1, augs, crop, syn_res, param, None)
    budget = None
    if max_memory is not None:
        budget = parse_bytes(max_memory) - model_bytes - images_bytes
        if budget <= 0:
            raise ValueError(f"max_memory={max_memory} does not even hold the backbone ({model_bytes} B) and the "
                             f"images with their Adam state ({images_bytes} B)")
    elif dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = int(0.85 * free) - images_bytes
    per_view = {}

    def bytes_per_view(checkpointing: bool) -> float:
        if checkpointing not in per_view:
            per_view[checkpointing] = probe._probe_bytes_per_view(checkpointing)
        return per_view[checkpointing]

    if chunk_size is not None:
        chunk, checkpointing = chunk_size, bool(backbone.grad_checkpointing)
    elif budget is None:
        chunk, checkpointing = CPU_DEFAULT_CHUNK, bool(backbone.grad_checkpointing)
    else:
        chunk, checkpointing = chunk_for_budget(budget, bytes_per_view, views)
    chunk = max(1, min(chunk, views))
    if mode == "auto":
        mode = "single" if chunk >= views else "two_phase"
    active = views if mode == "single" else chunk
    step_bytes = int(images_bytes + active * bytes_per_view(checkpointing) / PROBE_TRANSIENT * _PEAK_TRANSIENT)

    forward, forward_backward = _flops_per_view(backbone, min(2, views), crop, checkpointing)
    flops = step_flops(mode, views, chunk, forward, forward_backward)

    seconds, source = None, "not estimated"
    if measure_steps > 0:
        # the chunked modes are timed over two chunks (when the run has them), so that two-phase's forward without
        # autograd and both modes' per-chunk costs are measured, not only extrapolated; memory stays one chunk's
        probe_views = min(views, 2 * active) if mode in ("two_phase", "lagged") else active
        classes = max(2, math.ceil(probe_views / (ipc * augs)))
        timed = _probe_distiller(backbone, classes, ipc, augs, crop, syn_res, param, active)
        timed.checkpointing = checkpointing
        timed.step(mode)  # warm-up (and the exact first step of "lagged")
        times = []
        for _ in range(measure_steps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            float(timed.step(mode))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        # the best of a few (what the device does when not shared), scaled by FLOPs to the run's views and chunks
        probe_flops = step_flops(mode, timed.num_views, timed.resolve_chunk_size(), forward, forward_backward)
        seconds = min(times) * flops / probe_flops
        source = (f"measured: best of {measure_steps} probe steps of {timed.num_views} views on {dev}, scaled by "
                  f"FLOPs to {views} views")
    elif tflops is not None:
        seconds, source = flops / (tflops * 1e12), f"at {tflops:g} TFLOP/s"
    return Plan(backbone=getattr(backbone, "name", str(backbone)), device=str(dev), num_classes=num_classes,
                ipc=ipc, augs=augs, crop=crop, syn_res=syn_res, views=views, mode=mode, chunk_size=chunk,
                checkpointing=checkpointing, activation_budget=budget, bytes_per_view=bytes_per_view(checkpointing),
                model_bytes=model_bytes, images_bytes=images_bytes, step_bytes=step_bytes,
                peak_bytes=step_bytes + model_bytes, flops_per_step=float(flops), seconds_per_step=seconds,
                seconds_from=source)

