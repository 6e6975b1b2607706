"""Statistical flow matching distillation whose memory does not grow with the number of synthetic images.

One step (`Distiller.step`):
  draw the augmentations of every view (CPU generator, identical on every rank) ->
  single-phase: render, augment, forward with autograd, `ops.class_sums` -> (L, G) -> back-propagate G[y]/n_y
                (when one chunk holds every view);
  two-phase:    phase 1, per chunk of views without autograd: render only that chunk's images, augment, features,
                `ops.class_sums` (all-reduced across ranks) -> `Distiller._loss_and_grad` gives L and G = dL/dμ̃;
                the last chunk runs with autograd and keeps its graph; phase 2: back-propagate
                `ops.feature_grad(G, counts, labels)` = G[y]/n_y through that kept graph, then per other chunk render
                and augment again with autograd (same stored draws), features, and back-propagate into that chunk's
                images only (k chunks: k - 1 forwards recomputed; one chunk costs a single-phase step);
  lagged (opt-in): one pass, per chunk with autograd: features, add their class sums, back-propagate the G of the
                previous step's class sums; after the pass (L, G) of this step's sums is kept for the next step. The
                first step, and the first after a pyramid growth, is an exact two-phase step ->
  Adam on every pyramid level.
Activation checkpointing is switched on (for the autograd passes only) when the memory budget does not hold a chunk of
`_MIN_PLAIN_CHUNK` views of plain autograd; otherwise the step never pays for the recomputation.
View labels are non-decreasing (class-major images, image-major views), so the ops take their atomic-free,
deterministic segmented path (`sorted_labels=True`). Peak memory is one chunk's activations plus the images'
parameters, gradients and Adam state, whatever C·ipc is: the gradient of a chunk is accumulated into a preallocated
buffer (never through a full-size slice backward), and fused Adam updates in place.

Distributed (torch.distributed initialised): images are sharded contiguously across ranks; the per-class sums (C×D)
are all-reduced, so every rank computes the same L and G and updates its own images: the same images as one process.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from sfmkern import _io, augment, ops
from sfmkern._nvtx import nvtx_range
from sfmkern.artifacts import DistilledSet
from sfmkern.distillation.config import (
    CHECKPOINT_FORMAT,
    CPU_DEFAULT_CHUNK,
    MODES,
    PROBE_TRANSIENT,
    TRAJECTORY_FIELDS,
    DistillConfig,
    chunk_for_budget,
    own_bytes_max,
)
from sfmkern.synthetic import SyntheticImages, decode


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _shard(num_images: int, rank: int, world: int) -> tuple[int, int]:
    return rank * num_images // world, (rank + 1) * num_images // world


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------------- Distiller
class Distiller:
    """Owns the synthetic images of this rank, their Adam state and the augmentation generator; `step()` runs one
    distillation step.

    real_flow_or_stats: a ClassStats (anything with `.centres` [C, D]; its `classes`, `fingerprint` and
    `backbone_fingerprint` are used) or the real flow F [C, D] itself (`ops.real_flow(centres)`).
    backbone: a frozen `sfmkern.backbone.Backbone` (weights never receive a gradient).
    Images are class-major (image i has label i // ipc); view v of this rank is view v % A of local image v // A.
    """

    def __init__(self, real_flow_or_stats, backbone, *, classes=None, config: DistillConfig | None = None,
                 device=None, init_images: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                 anchor: torch.Tensor | None = None):
        self.ops = ops
        self.config = config if config is not None else DistillConfig()
        if not isinstance(self.config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(self.config).__name__}")
        cfg = self.config
        self.backbone = backbone
        self.device = torch.device(backbone.device)
        if device is not None and not _same_device(device, self.device):
            raise ValueError(f"device {device} differs from the backbone's device {backbone.device}")
        if any(p.requires_grad for p in backbone.model.parameters()):
            warnings.warn("the backbone's weights required grad; freezing them (sfmkern never computes weight "
                          "gradients)", stacklevel=2)
            backbone.model.requires_grad_(False)

        centres = None
        if isinstance(real_flow_or_stats, torch.Tensor):
            real_flow = real_flow_or_stats
            self.stats_fingerprint = ""
            stats_classes = None
        elif hasattr(real_flow_or_stats, "centres"):
            stats = real_flow_or_stats
            bb_fp = getattr(stats, "backbone_fingerprint", None)
            if bb_fp and getattr(backbone, "fingerprint", None) and bb_fp != backbone.fingerprint:
                raise ValueError("the statistics were collected with another backbone (fingerprint "
                                 f"{bb_fp[:12]}… vs {backbone.fingerprint[:12]}…)")
            centres = torch.as_tensor(stats.centres).to(self.device, torch.float32)
            real_flow = ops.real_flow(centres)
            self.stats_fingerprint = str(getattr(stats, "fingerprint", ""))
            stats_classes = list(getattr(stats, "classes", []) or []) or None
        else:
            raise TypeError("real_flow_or_stats must be a ClassStats or a real-flow tensor [C, D], got "
                            f"{type(real_flow_or_stats).__name__}")
        if real_flow.dim() != 2 or real_flow.shape[0] < 2:
            raise ValueError(f"real flow must be [C, D] with C >= 2, got shape {tuple(real_flow.shape)}")
        feature_dim = getattr(backbone, "feature_dim", None)
        if feature_dim is not None and real_flow.shape[1] != feature_dim:
            raise ValueError(f"real flow has D={real_flow.shape[1]} but the backbone's features have "
                             f"D={feature_dim}")
        num_real_classes = int(real_flow.shape[0])
        classes = classes if classes is not None else stats_classes
        self.classes = [str(c) for c in classes] if classes is not None else [str(c) for c in range(num_real_classes)]
        if len(self.classes) != num_real_classes:
            raise ValueError(f"{len(self.classes)} class names for a real flow of {num_real_classes} classes")
        self.config = cfg = self._effective_config(centres, init_images, targets, anchor, num_real_classes)
        per_image = targets is not None and cfg.ipc > 1 and cfg.subcentres
        if per_image:  # sub-centre flows: image i is matched to target i (its class's sub-centre i % ipc)
            centres = torch.as_tensor(targets).to(self.device, torch.float32)
            real_flow = ops.real_flow(centres)
        self.real_flow = real_flow.detach().to(self.device, torch.float32).contiguous()
        # flow targets the ops reduce over: the classes, or with sub-centres every image's own sub-centre
        self.num_classes = int(self.real_flow.shape[0])
        self.anchor = None
        if cfg.objective == "anchored":
            target = anchor if anchor is not None else centres
            self.anchor = torch.as_tensor(target).detach().to(self.device, torch.float32).contiguous()
            if tuple(self.anchor.shape) != tuple(self.real_flow.shape):
                raise ValueError(f"anchor must be {tuple(self.real_flow.shape)} (one row per flow target), got "
                                 f"{tuple(self.anchor.shape)}")

        self.rank, self.world = _dist_info()
        self.num_images = num_real_classes * cfg.ipc
        if self.num_images < self.world:
            raise ValueError(f"{self.num_images} synthetic images cannot be sharded over {self.world} ranks")
        self.rows = _shard(self.num_images, self.rank, self.world)
        self.images = SyntheticImages(self.num_images, cfg.syn_res, param=cfg.param,
                                      grow_every=cfg.effective_grow_every, seed=cfg.seed, rows=self.rows,
                                      device=self.device)
        if cfg.init == "real":
            if tuple(init_images.shape) != (self.num_images, 3, cfg.syn_res, cfg.syn_res):
                raise ValueError(f"init_images must be [{self.num_images}, 3, {cfg.syn_res}, {cfg.syn_res}], got "
                                 f"{tuple(init_images.shape)}")
            self.images.set_images(init_images[self.rows[0] : self.rows[1]])
        image_labels = torch.arange(*self.rows, dtype=torch.int64) // (1 if per_image else cfg.ipc)
        self.view_labels = image_labels.repeat_interleave(cfg.augs).to(self.device)
        self.num_views = len(self.view_labels)  # views of this rank
        self.aug_generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.chunk_size: int | None = cfg.chunk_size
        self.checkpointing = False  # switch activation checkpointing on in the autograd passes (resolve_chunk_size)
        self._lagged: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (G, counts, levels) for mode "lagged"
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._new_optimizer()

    def _effective_config(self, centres, init_images, targets, anchor, num_classes) -> DistillConfig:
        """The config with what cannot apply replaced (each with a warning): init="real" without init_images starts
        from noise; objective="anchored" without class centres (a bare flow tensor) is the flow alone; the
        "augmented" anchor without its targets anchors to the given centres, centred."""
        cfg = self.config
        changes = {}
        if cfg.init == "real" and init_images is None:
            warnings.warn("init='real' but no real images are reachable (pass init_data=, or statistics with a "
                          "feature cache and their source): starting from noise", stacklevel=3)
            changes["init"] = "noise"
        if cfg.objective == "anchored" and centres is None and anchor is None:
            warnings.warn("objective='anchored' needs class centres (statistics), not a bare flow: using the flow "
                          "cosine alone (objective='sfm')", stacklevel=3)
            changes["objective"] = "sfm"
        elif cfg.objective == "anchored" and cfg.anchor_target == "augmented" and anchor is None:
            warnings.warn("anchor_target='augmented' needs real images to compute the augmented centres: anchoring "
                          "to the clean centres with their common offset removed (anchor_target='centred')",
                          stacklevel=3)
            changes["anchor_target"] = "centred"
        if targets is not None and tuple(targets.shape)[0] != num_classes * cfg.ipc:
            raise ValueError(f"targets must have {num_classes * cfg.ipc} rows (class-major, ipc per class), got "
                             f"{tuple(targets.shape)}")
        return dataclasses.replace(cfg, **changes) if changes else cfg

    def _loss_and_grad(self, sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective on the (all-reduced) per-target feature sums [T, D] and counts [T] -> (loss, G = dL/dμ̃
        [T, D]): the flow cosine, plus with objective="anchored" the anchoring term (fused in
        `ops.flow_loss_and_grad(..., anchor=, anchor_weight=)`). Every step mode computes its loss here."""
        cfg = self.config
        if self.anchor is None or cfg.anchor_weight == 0:
            return self.ops.flow_loss_and_grad(sums, counts, self.real_flow)
        anchor = self.anchor
        if cfg.anchor_target == "centred":  # the targets moved by the common offset of the synthetic means
            mu = sums / counts.clamp_min(1).to(sums.dtype).unsqueeze(1)
            anchor = anchor - anchor.mean(0, keepdim=True) + mu.mean(0, keepdim=True)
        return self.ops.flow_loss_and_grad(sums, counts, self.real_flow, anchor=anchor,
                                           anchor_weight=cfg.anchor_weight)

    # -------------------------------------------------------------------------------------------- state
    def _new_optimizer(self) -> None:
        # fused Adam updates in place without a full-size temporary (the for-loop version allocates one per level,
        # which would make the step's transient memory grow with C·ipc); plain Adam where fused is unsupported
        try:
            self.optimizer = torch.optim.Adam(self.images.levels, lr=self.config.effective_lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.Adam(self.images.levels, lr=self.config.effective_lr)

    def parameters(self) -> list[torch.Tensor]:
        """The pyramid levels of this rank (leaf float32 tensors, coarsest first)."""
        return self.images.levels

    def own_bytes(self) -> int:
        """Bytes of the images' parameters, their gradients and Adam state as currently allocated."""
        total = self.images.nbytes()
        for p in self.images.levels:
            if p.grad is not None:
                total += p.grad.numel() * p.grad.element_size()
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.device == p.device:
                    total += value.numel() * value.element_size()
        return total

    def _grow_to(self, step: int) -> None:
        grew = False
        while self.images.num_levels < self.images.levels_due(step):
            grew |= self.images.grow()
        if grew:  # Adam state reset on every extension
            self._new_optimizer()

    # -------------------------------------------------------------------------------------------- views
    def draw_views(self) -> augment.Views:
        """Draw the augmentations of every view of every image (all ranks draw the same), keep this rank's:
        image-major order (local view v = view v % A of local image v // A), `source` = local image row."""
        return self._draw_views(self.aug_generator)

    def _draw_views(self, generator: torch.Generator) -> augment.Views:
        cfg = self.config
        res = cfg.syn_res
        views = augment.draw_views(self.num_images, cfg.augs, res, res, generator=generator,
                                   scale=cfg.scale, ratio=cfg.ratio, flip_p=cfg.flip_p, noise_p=cfg.noise_p)
        start, stop = self.rows
        # draw_views is view-major (k-th view of image i at k·N + i); reorder to image-major for this shard
        index = (torch.arange(start, stop)[:, None] + self.num_images * torch.arange(cfg.augs)[None, :]).reshape(-1)
        mine = views.select(index)
        return augment.Views(mine.source - start, mine.theta, mine.noise_on, mine.noise_seed)

    def _chunk_views(self, views: augment.Views, v0: int, v1: int):
        a = self.config.augs
        lo, hi = v0 // a, (v1 - 1) // a + 1
        part = views.select(slice(v0, v1))
        return lo, hi, part.rebased(lo)

    def _augment(self, images: torch.Tensor, views: augment.Views) -> torch.Tensor:
        cfg = self.config
        with nvtx_range("distill/augment"):
            return augment.apply_views(images, views, crop=cfg.crop, noise_std=cfg.noise_std,
                                       noise_mean=cfg.noise_mean)

    def _render_leaves(self, lo: int, hi: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images [lo, hi) with autograd to fresh leaf views of the levels (their grads go to the levels by hand)."""
        leaves = [level.detach()[lo:hi].requires_grad_(True) for level in self.images.levels]
        with nvtx_range("distill/render"):
            return decode(leaves, self.images.resolution), leaves

    def _accumulate(self, lo: int, hi: int, leaves: list[torch.Tensor]) -> None:
        for level, leaf in zip(self.images.levels, leaves, strict=True):
            if leaf.grad is not None:
                level.grad[lo:hi].add_(leaf.grad)

    # -------------------------------------------------------------------------------------------- chunking
    def activation_budget(self) -> int | None:
        """Bytes the chunks' activations may use: `max_memory` less the backbone's weights and the images' largest
        parameters, gradients and Adam state; else 85% of free CUDA memory less what the images will still grow by;
        None on CPU without `max_memory`."""
        cfg = self.config
        own_max = own_bytes_max(len(self.images), cfg.syn_res, cfg.param)
        if cfg.max_memory is not None:
            model_bytes = sum(p.numel() * p.element_size() for p in self.backbone.model.parameters())
            budget = cfg.max_memory - model_bytes - own_max
            if budget <= 0:
                raise ValueError(f"max_memory={cfg.max_memory} bytes does not even hold the backbone "
                                 f"({model_bytes} B) and the images with their Adam state ({own_max} B)")
            return budget
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(0.85 * free) - (own_max - self.own_bytes())
        return None

    def resolve_chunk_size(self) -> int:
        """Views per chunk: `config.chunk_size`, else from the activation budget (`activation_budget`) and activation
        bytes per view measured by a probe forward (`chunk_for_budget`: plain autograd when a chunk of
        `MIN_PLAIN_CHUNK` views fits, else activation checkpointing), else 256 on CPU. Never more than this rank's
        views. Sets `self.checkpointing`."""
        if self.chunk_size is not None:
            return min(self.chunk_size, self.num_views)
        budget = self.activation_budget()
        if budget is None:
            chunk, self.checkpointing = CPU_DEFAULT_CHUNK, False
        else:
            chunk, self.checkpointing = chunk_for_budget(budget, self._probe_bytes_per_view, self.num_views)
        self.chunk_size = max(1, min(chunk, self.num_views))
        return self.chunk_size

    def _probe_bytes_per_view(self, checkpointing: bool = False) -> float:
        """Activation bytes per view: tensors saved for backward during one forward of a few views (deduplicated
        by storage, weights excluded; with `checkpointing`, under activation checkpointing), times 1.5 for
        transients (an estimate; pass chunk_size= to override)."""
        k = min(2 * self.config.augs, self.num_views)
        weights = {p.untyped_storage().data_ptr() for p in self.backbone.model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in weights:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
            return t

        lo, hi, part = self._chunk_views(self._draw_views(torch.Generator().manual_seed(0)), 0, k)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                self.backbone.grad_checkpointing_on(checkpointing):
            images, _ = self._render_leaves(lo, hi)
            feats = self.backbone.features(self._augment(images, part))
        del feats, images
        return PROBE_TRANSIENT * max(sum(seen.values()), 1) / k

    def resolve_mode(self, mode: str = "auto") -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "auto":
            return mode
        return "single" if self.resolve_chunk_size() >= self.num_views else "two_phase"

    # -------------------------------------------------------------------------------------------- the step
    def _all_reduce(self, *tensors: torch.Tensor) -> None:
        if self.world > 1:
            for t in tensors:
                torch.distributed.all_reduce(t)

    def forward_backward(self, mode: str = "auto", views: augment.Views | None = None) -> torch.Tensor:
        """Grow the pyramid if due, draw the views (unless given) and leave dL/dlevel in each level's `.grad`.
        Returns the loss (0-dim float32 on the device, no host sync)."""
        mode = self.resolve_mode(mode)
        self._grow_to(self.step_count)
        if views is None:
            views = self.draw_views()
        views = views.to(self.device)  # the step's augmentation parameters: one pinned, non-blocking copy
        for level in self.images.levels:
            if level.grad is None:
                level.grad = torch.zeros_like(level)
            else:
                level.grad.zero_()
        if mode == "single":
            return self._single_phase(views)
        if mode == "lagged":
            return self._lagged_step(views)
        return self._two_phase(views)

    def _autograd_features(self, images: torch.Tensor, views: augment.Views) -> torch.Tensor:
        with self.backbone.grad_checkpointing_on(self.checkpointing):
            return self.backbone.features(self._augment(images, views))

    def _chunk_bounds(self) -> list[tuple[int, int]]:
        chunk = self.resolve_chunk_size()
        return [(v0, min(v0 + chunk, self.num_views)) for v0 in range(0, self.num_views, chunk)]

    def _chunk_graph(self, views: augment.Views, v0: int, v1: int):
        """Views [v0, v1) rendered and augmented with autograd from fresh leaves of their images' levels ->
        (features, rows), rows = (lo, hi, leaves) for `_backprop`."""
        lo, hi, part = self._chunk_views(views, v0, v1)
        images, leaves = self._render_leaves(lo, hi)
        return self._autograd_features(images, part), (lo, hi, leaves)

    def _add_class_sums(self, sums: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, v0: int, v1: int):
        """Add the per-class feature sums and view counts of views [v0, v1) (`feats`) into `sums`, `counts`."""
        chunk_sums, chunk_counts = self.ops.class_sums(feats.detach(), self.view_labels[v0:v1], self.num_classes,
                                                       sorted_labels=True)
        sums += chunk_sums
        counts += chunk_counts

    def _backprop(self, feats: torch.Tensor, grad_mu: torch.Tensor, counts: torch.Tensor, v0: int, v1: int,
                  rows) -> None:
        """Back-propagate G[y]/n_y of views [v0, v1) through `feats` into the levels' grads of `rows`' images."""
        feats.backward(self.ops.feature_grad(grad_mu, counts, self.view_labels[v0:v1], dtype=feats.dtype))
        self._accumulate(*rows)

    def _new_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(self.num_classes, self.real_flow.shape[1], dtype=torch.float32, device=self.device),
                torch.zeros(self.num_classes, dtype=torch.int64, device=self.device))

    def _single_phase(self, views: augment.Views) -> torch.Tensor:
        feats, rows = self._chunk_graph(views, 0, self.num_views)
        with nvtx_range("distill/loss"):
            sums, counts = self.ops.class_sums(feats.detach(), self.view_labels, self.num_classes,
                                               sorted_labels=True)
            self._all_reduce(sums, counts)
            loss, grad_mu = self._loss_and_grad(sums, counts)
        self._backprop(feats, grad_mu, counts, 0, self.num_views, rows)
        return loss.detach()

    def _two_phase(self, views: augment.Views, *, keep_grad: bool = False) -> torch.Tensor:
        """Phase 1 adds up the class sums chunk by chunk, the last chunk with autograd and its graph kept; after the
        loss, phase 2 back-propagates G through that kept graph first, then recomputes the other chunks with
        autograd. Exact (the same sums and G as one batch); one chunk's activations at a time; the last chunk's
        forward is never recomputed (with one chunk the step costs what the single-phase step does)."""
        bounds = self._chunk_bounds()
        sums, counts = self._new_sums()
        with nvtx_range("distill/phase-1"):
            with torch.no_grad():
                for v0, v1 in bounds[:-1]:
                    lo, hi, part = self._chunk_views(views, v0, v1)
                    with nvtx_range("distill/render"):
                        images = self.images.render(lo, hi)
                    self._add_class_sums(sums, counts, self.backbone.features(self._augment(images, part)), v0, v1)
                    del images
            last = bounds[-1]  # the last chunk: with autograd, its graph kept for phase 2
            last_feats, last_rows = self._chunk_graph(views, *last)
            self._add_class_sums(sums, counts, last_feats, *last)
        with nvtx_range("distill/loss"):
            self._all_reduce(sums, counts)
            loss, grad_mu = self._loss_and_grad(sums, counts)
        with nvtx_range("distill/phase-2"):
            self._backprop(last_feats, grad_mu, counts, *last, last_rows)
            del last_feats, last_rows
            for v0, v1 in bounds[:-1]:
                feats, rows = self._chunk_graph(views, v0, v1)
                self._backprop(feats, grad_mu, counts, v0, v1, rows)
                del feats, rows
        if keep_grad:
            self._lagged = (grad_mu, counts, self.images.num_levels)
        return loss.detach()

    def _lagged_step(self, views: augment.Views) -> torch.Tensor:
        """One autograd pass: each chunk back-propagates the previous step's G while adding up this step's class
        sums, whose (L, G) is kept for the next step. An exact two-phase step when there is no previous G or the
        pyramid grew since (the images changed outside Adam). Returns this step's exact loss."""
        if self._lagged is None or self._lagged[2] != self.images.num_levels:
            return self._two_phase(views, keep_grad=True)
        grad_prev, counts_prev, _ = self._lagged
        sums, counts = self._new_sums()
        with nvtx_range("distill/lagged"):
            for v0, v1 in self._chunk_bounds():
                feats, rows = self._chunk_graph(views, v0, v1)
                self._add_class_sums(sums, counts, feats, v0, v1)
                # the view counts per class are the same every step: the previous step's global counts apply
                self._backprop(feats, grad_prev, counts_prev, v0, v1, rows)
                del feats, rows
        with nvtx_range("distill/loss"):
            self._all_reduce(sums, counts)
            loss, grad_mu = self._loss_and_grad(sums, counts)
        self._lagged = (grad_mu, counts, self.images.num_levels)
        return loss.detach()

    def step(self, mode: str = "auto") -> torch.Tensor:
        """One distillation step (forward_backward + Adam). Returns the loss (0-dim device tensor, no host sync)."""
        loss = self.forward_backward(mode)
        with nvtx_range("distill/optimiser"):
            self.optimizer.step()
        self._nonfinite |= ~torch.isfinite(loss)
        self.step_count += 1
        return loss

    def check_finite(self) -> None:
        """Host sync: raise FloatingPointError if any loss since construction/resume was non-finite."""
        if bool(self._nonfinite):
            raise FloatingPointError(f"non-finite distillation loss at or before step {self.step_count}")

    # -------------------------------------------------------------------------------------------- results
    @torch.no_grad()
    def render_local(self, batch: int = 64) -> torch.Tensor:
        """This rank's images [n_local, 3, R, R] float32 in (0, 1), on the CPU."""
        parts = [self.images.render(lo, min(lo + batch, len(self.images))).cpu()
                 for lo in range(0, len(self.images), batch)]
        return torch.cat(parts)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' row blocks of `tensor` (this rank's rows first dim), concatenated in rank order, on the CPU."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        sizes = [_shard(self.num_images, r, self.world) for r in range(self.world)]
        longest = max(b - a for a, b in sizes)
        backend = dist.get_backend()
        dev = self.device if backend == "nccl" else torch.device("cpu")
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
        padded[: tensor.shape[0]] = tensor.to(dev)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return torch.cat([o[: b - a].cpu() for o, (a, b) in zip(out, sizes, strict=True)])

    def float_images(self) -> torch.Tensor:
        """Every image of every rank [C·ipc, 3, R, R] float32 in (0, 1) on the CPU (collective when distributed)."""
        return self.gather(self.render_local())

    def distilled_set(self, extra_config: dict | None = None) -> DistilledSet:
        images = _to_uint8(self.float_images())
        labels = torch.arange(self.num_images, dtype=torch.int64) // self.config.ipc
        config = {**self.config.to_dict(), "steps_done": self.step_count, "effective_lr": self.config.effective_lr,
                  "effective_grow_every": self.config.effective_grow_every, **(extra_config or {})}
        return DistilledSet(images, labels, self.classes, config, self.stats_fingerprint)

    # -------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_path(self, out_dir: str | os.PathLike) -> Path:
        if self.world == 1:
            return Path(out_dir) / "checkpoint.safetensors"
        return Path(out_dir) / f"checkpoint-rank{self.rank}-of-{self.world}.safetensors"

    def _identity(self) -> dict:
        cfg = self.config.to_dict()
        return {
            "config": {k: cfg[k] for k in TRAJECTORY_FIELDS},
            "num_classes": self.num_classes,
            "stats_fingerprint": self.stats_fingerprint,
            "backbone_fingerprint": getattr(self.backbone, "fingerprint", ""),
            "world": self.world,
            "rows": list(self.rows),
        }

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Atomically save levels, Adam state, the augmentation RNG state and the step (this rank's shard)."""
        tensors = {"aug_rng": self.aug_generator.get_state()}
        lagged_levels = 0
        if self._lagged is not None:  # the G that the next "lagged" step back-propagates
            tensors["lagged_grad"], tensors["lagged_counts"] = self._lagged[0].detach(), self._lagged[1].detach()
            lagged_levels = self._lagged[2]
        for k, level in enumerate(self.images.levels):
            tensors[f"level{k}"] = level.detach()
            state = self.optimizer.state.get(level, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    tensors[f"adam_{key}{k}"] = torch.as_tensor(state[key]).detach()
        meta = {"format": CHECKPOINT_FORMAT, "step": self.step_count, "num_levels": self.images.num_levels,
                "lagged_levels": lagged_levels, **self._identity()}
        return _io.save_tensors(path, tensors, meta)

    def load_checkpoint(self, path: str | os.PathLike) -> int:
        """Restore a checkpoint written by `save_checkpoint` for the same run; returns its step."""
        tensors, meta = _io.load_tensors(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a distillation checkpoint (format {meta.get('format')!r})")
        mine = self._identity()
        for key, value in mine.items():
            theirs = meta.get(key)
            if key == "config":
                diff = [f"{k}: {theirs.get(k)!r} in the checkpoint vs {v!r} now" for k, v in value.items()
                        if theirs is None or theirs.get(k) != v]
                if diff:
                    raise ValueError(f"{path}: written by a run with another configuration ({'; '.join(diff)}); "
                                     "use another out_dir or resume=False")
            elif theirs != value:
                raise ValueError(f"{path}: written by another run ({key}: {theirs!r} vs {value!r}); "
                                 "use another out_dir or resume=False")
        levels = [tensors[f"level{k}"] for k in range(int(meta["num_levels"]))]
        self.images.load_levels(levels)
        self._new_optimizer()
        state = {}
        for k in range(len(levels)):
            if f"adam_step{k}" in tensors:
                state[k] = {"step": tensors[f"adam_step{k}"].clone(), "exp_avg": tensors[f"adam_exp_avg{k}"],
                            "exp_avg_sq": tensors[f"adam_exp_avg_sq{k}"]}
        if state:
            sd = self.optimizer.state_dict()
            sd["state"] = state
            self.optimizer.load_state_dict(sd)
        self.aug_generator.set_state(tensors["aug_rng"])
        self.step_count = int(meta["step"])
        self._lagged = None
        if "lagged_grad" in tensors:
            self._lagged = (tensors["lagged_grad"].to(self.device, torch.float32),
                            tensors["lagged_counts"].to(self.device, torch.int64), int(meta.get("lagged_levels", 0)))
        self._nonfinite.zero_()
        return self.step_count
