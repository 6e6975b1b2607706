"""Shared helpers of the benchmark scripts: environment description, results file, peak memory, the distillation-step
methods compared by memory.py and runtime.py on one shared setup, and the recipes' real JPEG loader.

Methods (one step each, Adam included):
  lgm                 Linear Gradient Matching as its public code runs it (baselines/lgm.py)
  public_sfm          the public SFM step: all views in one batch, weights requiring grad (baselines/public_sfm.py)
  sfm_single          sfmkern single-phase: frozen weights, one forward with autograd
  sfm_two_phase       sfmkern two-phase (memory-flat) with a fixed chunk of views, plain autograd (no checkpointing:
                      the Distiller switches it on only when its budget does not hold a chunk)
  sfm_lagged          sfmkern lagged (memory-flat, opt-in): one autograd pass per chunk with the previous step's G
  sfm_two_phase_ckpt  two-phase with timm activation checkpointing forced on (what the step cost before; not default)
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from sfmkern._machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MIB = 2**20
METHODS = ("lgm", "public_sfm", "sfm_single", "sfm_two_phase", "sfm_lagged")
ALL_METHODS = (*METHODS, "sfm_two_phase_ckpt")
LABELS = {"lgm": "LGM (as coded)", "public_sfm": "public SFM", "sfm_single": "sfmkern single-phase",
          "sfm_two_phase": "sfmkern two-phase", "sfm_lagged": "sfmkern lagged",
          "sfm_two_phase_ckpt": "sfmkern two-phase + forced ckpt"}
# MALLOC_MMAP_THRESHOLD_ pins glibc's (otherwise adaptive) mmap threshold, so that large tensors are mapped and
# unmapped on free and RSS tracks live memory instead of heap fragmentation that depends on allocation history
DISPLAY_NAMES = {"PIL": "Pillow"}  # module name -> distribution name, for versions()
RESULTS_HEADER = "# Benchmark results\n\nEach script appends its own section; nothing is overwritten.\n"
CPU_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------ environment
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions(*extra: str) -> str:
    """"torch X, triton Y, timm Z" plus the modules named in `extra` (e.g. "torchvision", "PIL"); every import but
    torch's is lazy and optional, so a machine without triton or timm still gets a line."""
    out = [f"torch {torch.__version__}"]
    for name in ("triton", "timm", *extra):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        out.append(f"{DISPLAY_NAMES.get(name, name)} {getattr(module, '__version__', 'unknown')}")
    return ", ".join(out)


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    """The device a run used: the GPU's name for "cuda[:i]", else "CPU (<model>, <n> usable cores)"."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({cpu_model()}, {usable_cores()} usable cores)"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def describe_machine(device: str | None = None) -> str:
    """The machine for a RESULTS.md section: CPU model, usable cores and GPU (or "no GPU"); with `device`, led by the
    device the run used, e.g. "CPU; machine: AMD EPYC 9654, 16 usable cores, NVIDIA H100 80GB HBM3"."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = f"{cpu_model()}, {usable_cores()} usable cores, {gpu}"
    if device is None:
        return machine
    used = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else "CPU"
    return f"{used}; machine: {machine}"


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def append_results(text: str) -> Path:
    """Append a section to benchmarks/RESULTS.md (never rewrites what is there; creates it with a title if missing)."""
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_HEADER)
    with open(RESULTS, "a") as fh:
        fh.write("\n" + text.rstrip("\n") + "\n")
    return RESULTS


def publish(text: str, *, append: bool = True) -> None:
    """Print a finished section and, unless told not to, append it to benchmarks/RESULTS.md."""
    print("\n" + text)
    if append:
        print(f"appended to {append_results(text)}")


def stamp(title: str) -> str:
    return f"## {title} ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, git {git_sha()})"


# ------------------------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_bytes() -> int:
    """VmHWM of this process (peak resident set since start or the last `reset_peak_rss`)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


# ------------------------------------------------------------------------------------------------ the setup
@dataclass
class Case:
    """One (C, ipc, A) configuration: a Distiller on random real flow, and what LGM loads per step."""

    num_classes: int
    ipc: int
    augs: int
    distiller: object
    chunk: int
    generator: torch.Generator

    @property
    def views(self) -> int:
        return self.num_classes * self.ipc * self.augs

    def key(self) -> str:
        return f"C={self.num_classes} ipc={self.ipc} A={self.augs}"


def load_model(model: str, crop: int, device: torch.device):
    from sfmkern.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone(model, pretrained=False, img_size=crop, device=device)


def make_case(backbone, num_classes: int, ipc: int, augs: int, *, syn_res: int, crop: int, chunk: int,
              seed: int = 0) -> Case:
    import warnings

    from sfmkern.distillation import DistillConfig, Distiller

    device = torch.device(backbone.device)
    gen = torch.Generator().manual_seed(seed)
    real_flow = torch.randn(num_classes, backbone.feature_dim, generator=gen).to(device)
    real_flow -= real_flow.mean(0)
    cfg = DistillConfig(ipc=ipc, augs=augs, syn_res=syn_res, crop=crop, grow_every=0, chunk_size=chunk, seed=seed)
    backbone.model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distiller = Distiller(real_flow, backbone, config=cfg, device=device)
    return Case(num_classes, ipc, augs, distiller, chunk, gen)


def prepare(case: Case, method: str) -> None:
    """Put the shared backbone in the state the method runs it in (weights' grad flag, checkpointing)."""
    backbone = case.distiller.backbone
    public = method in ("lgm", "public_sfm")
    backbone.model.requires_grad_(public)
    if not public:
        for p in backbone.model.parameters():
            p.grad = None
    backbone.set_grad_checkpointing(method == "sfm_two_phase_ckpt")


def run_step(case: Case, method: str, real_batch=None) -> torch.Tensor:
    """One full step (forward, backward, Adam) of `method`, inside an NVTX range "bench/<method>"; call
    `prepare(case, method)` first. `real_batch`: LGM's (images, labels) from a loader (default: random tensors
    standing in for it). Returns the loss (0-dim tensor on the device)."""
    from sfmkern._nvtx import nvtx_range

    with nvtx_range(f"bench/{method}"):
        return _run_step(case, method, real_batch)


def _run_step(case: Case, method: str, real_batch=None) -> torch.Tensor:
    from baselines import lgm_forward_backward, public_sfm_forward_backward

    d = case.distiller

    if method == "lgm":
        # the loader batch of ipc·A·C real images at the synthetic resolution, on the device for the step
        if real_batch is None:
            real = torch.rand(case.views, 3, d.config.syn_res, d.config.syn_res, device=d.device)
            labels = torch.arange(case.num_classes, device=d.device).repeat_interleave(case.ipc * case.augs)
        else:
            real, labels = real_batch[0].to(d.device), real_batch[1].to(d.device)
        loss = lgm_forward_backward(d, real, labels, generator=case.generator)
        del real
    elif method == "public_sfm":
        loss = public_sfm_forward_backward(d)
    elif method == "sfm_single":
        loss = d.forward_backward("single")
    elif method in ("sfm_two_phase", "sfm_two_phase_ckpt"):
        loss = d.forward_backward("two_phase")
    elif method == "sfm_lagged":
        loss = d.forward_backward("lagged")
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    d.optimizer.step()
    d.step_count += 1
    return loss


def parse_grid(items: list[str]) -> list[tuple[int, int, int]]:
    """["100x1x3", ...] -> [(C, ipc, A), ...]."""
    out = []
    for item in items:
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"grid entries are CxIPCxA with positive ints (e.g. 100x1x3), got {item!r}")
        out.append(tuple(int(p) for p in parts))
    return out


def add_step_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments memory.py and runtime.py share: the preset, grid, methods, setup, threads, device, --no-append.
    Options left at None are filled from QUICK / FULL by `apply_preset`."""
    parser.add_argument("--quick", action="store_true", help="small ViT on CPU-sized inputs (< 5 min on 2 cores)")
    parser.add_argument("--grid", nargs="+", default=None, help="CxIPCxA entries, e.g. 100x1x3 100x1x1")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=ALL_METHODS)
    parser.add_argument("--model", default=None, help="timm model (random weights)")
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--syn-res", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None, help="views per chunk of the two-phase step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--recipes", nargs="*", default=None, metavar="CxIPC",
                        help="recipe section: LGM at A=10 and A=3 vs sfmkern at A=1 for these C×ipc (default from the "
                             "preset); pass --recipes with nothing to skip it")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers of LGM's real JPEG loader")
    return parser


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options `add_step_arguments` left at None from QUICK (--quick) or FULL, and the device."""
    preset = QUICK if args.quick else FULL
    for key in ("model", "crop", "chunk", "grid", "syn_res", "recipes"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# What decides the memory ratios is how the activations one view keeps for backward compare with what one synthetic
# image costs in any method (pyramid levels + gradients + Adam m and v, fp32). ViT-B/16 at 224 px under bf16 autocast,
# images at 256 px (the paper's setting, FULL): ~145 MiB per view vs 4.0 MiB per image, ~36:1. QUICK keeps that
# proportion on a CPU budget: ViT-S/16 (22.0M parameters, width 384) at 32 px (4 patches + CLS) with 32-px images,
# ~1.4 MiB per view vs 0.06 MiB per image, ~23:1 (ViT-Ti/16 at 32 px with 40-px images was ~5:1 and understated every
# ratio). Two-phase chunk: 32 views of ViT-B (6.3k tokens per matmul) keep an H100 busy at ~0.6 GiB of checkpointed
# activations. On CPU 50 views (250 tokens per matmul): at 16 views (80 rows per matmul) the CPU's GEMMs run so far
# below their rate that every chunked mode paid for it (measured in process CPU time at C=100, A=1: two-phase 2.4×,
# lagged 1.8× the single-phase step, where the FLOPs say 1.5× and 1.0×); 50 views still leave C·ipc = 50 to 200 in
# whole chunks for the flatness check.
# Recipes (as users run each method): LGM's published A = 10 (A = 3 on ImageNet-1k, where its README says memory
# forbids more) with ipc·A·C real images loaded per step; SFM's A = 1 with no real image in the loop.
QUICK = {"model": "vit_small_patch16_224", "crop": 32, "syn_res": 32, "chunk": 50,
         "grid": ["100x1x3", "100x1x1", "10x1x1", "50x1x1", "200x1x1"], "recipes": ["100x1", "10x10"]}
FULL = {"model": "vit_base_patch16_224", "crop": 224, "syn_res": 256, "chunk": 32,
        "grid": ["100x1x3", "100x1x1", "10x1x1", "1000x1x1", "1000x1x3"],
        "recipes": ["100x1", "100x10", "1000x1", "1000x10"]}
RECIPE_LGM_AUGS = (10, 3)
RECIPE_SFM_METHODS = ("sfm_single", "sfm_two_phase", "sfm_lagged")
JPEGS_PER_CLASS = 10


def parse_recipes(items: list[str]) -> list[tuple[int, int]]:
    """["100x1", ...] -> [(C, ipc), ...]."""
    out = []
    for item in items:
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"recipe entries are CxIPC with positive ints (e.g. 100x1), got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


# ------------------------------------------------------------------------------------------------ LGM's real loader
def write_jpeg_folder(root: Path, num_classes: int, per_class: int = JPEGS_PER_CLASS, seed: int = 0) -> Path:
    """An ImageFolder of real JPEGs (root/c0000/k.jpg): scikit-image's bundled photos, randomly cropped, resized to an
    ImageNet-like longer side of 300-600 px, re-encoded at quality 75-95. Returns root."""
    import numpy as np
    import skimage.data
    from PIL import Image

    names = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg",
             "hubble_deep_field.jpg", "motorcycle_right.png", "ihc.png", "color.png"]
    folder = Path(skimage.data.__file__).parent
    photos = [Image.open(folder / n).convert("RGB") for n in names]
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            im = photos[int(rng.integers(len(photos)))]
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            long_side = int(rng.integers(300, 601))
            scale = long_side / max(cw, ch)
            tile = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((max(32, round(cw * scale)), max(32, round(ch * scale))),
                                                             Image.BICUBIC)
            tile.save(root / f"c{c:04d}" / f"{k}.jpg", "JPEG", quality=int(rng.integers(75, 96)))
    return root


class _PerClassBatches:
    """Batch sampler: each batch holds `per_class` random files of every class, class-major (LGM's real batch)."""

    def __init__(self, targets: list[int], num_classes: int, per_class: int, seed: int = 0):
        self.by_class = [[i for i, t in enumerate(targets) if t == c] for c in range(num_classes)]
        self.per_class = per_class
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            batch = []
            for files in self.by_class:
                pick = torch.randint(len(files), (self.per_class,), generator=self.generator)
                batch.extend(files[int(i)] for i in pick)
            yield batch


def lgm_loader(root: Path, num_classes: int, per_class: int, res: int, workers: int):
    """LGM's kind of loader: torchvision ImageFolder (PIL decode) + Resize(res) + CenterCrop(res) + ToTensor, a
    DataLoader with `workers` worker processes (prefetch_factor 1) yielding one batch of per_class·C images per step.
    Returns an iterator of (images float [per_class·C, 3, res, res], labels int64)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(res), transforms.CenterCrop(res), transforms.ToTensor()])
    data = datasets.ImageFolder(str(root), transform=tf)
    if len(data.classes) < num_classes:
        raise ValueError(f"{root}: {len(data.classes)} class folders, need {num_classes}")
    sampler = _PerClassBatches(data.targets, num_classes, per_class)
    extra = {"prefetch_factor": 1, "persistent_workers": True} if workers > 0 else {}
    return iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=workers, **extra))


def warm_up(backbone, *, syn_res: int, crop: int) -> None:
    """One sfmkern step on 2 classes × 1 image, then everything freed: the runtime's one-time initialisation (autograd
    engine, kernel workspaces, allocator pools: ~27 MiB of RSS with vit_tiny on CPU) happens here, before the baseline
    is taken, and is not charged to whichever method is measured first."""
    case = make_case(backbone, 2, 1, 1, syn_res=syn_res, crop=crop, chunk=2)
    prepare(case, "sfm_single")
    run_step(case, "sfm_single")
    del case
    backbone.model.requires_grad_(False)
    for p in backbone.model.parameters():
        p.grad = None


def prepare_free(backbone) -> None:
    """Freeze the backbone again and drop any weight gradients a baseline accumulated."""
    backbone.model.requires_grad_(False)
    for p in backbone.model.parameters():
        p.grad = None
