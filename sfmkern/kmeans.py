"""Per-class k-means in feature space: the one implementation behind the k-means baseline, the real-image
initialisation of the synthetic images and the sub-centre flows (a leaf: torch only)."""

from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, k: int, *, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on x [n, D] float32 -> centres [k, D]. Empty clusters are re-seeded
    with the point farthest from its centre."""
    if x.dim() != 2 or x.shape[0] < k or k < 1:
        raise ValueError(f"kmeans needs x [n, D] with n >= k >= 1, got shape {tuple(x.shape)} and k={k}")
    n = x.shape[0]
    centres = x[torch.randint(0, n, (1,), generator=generator)].clone()
    d2 = torch.cdist(x, centres).pow(2).min(dim=1).values
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        nxt = torch.multinomial(probs, 1, generator=generator)
        centres = torch.cat([centres, x[nxt]])
        d2 = torch.minimum(d2, torch.cdist(x, x[nxt]).pow(2).squeeze(1))
    for _ in range(iters):
        dist = torch.cdist(x, centres)
        assign = dist.argmin(dim=1)
        new = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        new = new / counts.clamp_min(1).unsqueeze(1)
        if bool(empty.any()):
            far = dist.gather(1, assign.view(-1, 1)).squeeze(1).argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        if torch.allclose(new, centres):
            centres = new
            break
        centres = new
    return centres


def nearest_distinct(targets: torch.Tensor, x: torch.Tensor) -> list[int]:
    """For each row of targets [k, D], the nearest (Euclidean) row of x [n, D] not picked for an earlier target,
    followed by every other row of x by distance to its nearest target (fallbacks) -> a ranking of len n."""
    dist = torch.cdist(targets.float(), x.float())
    picked: list[int] = []
    for t in range(targets.shape[0]):
        for j in dist[t].argsort().tolist():
            if j not in picked:
                picked.append(j)
                break
    chosen = set(picked)
    return picked + [j for j in dist.min(dim=0).values.argsort().tolist() if j not in chosen]
