"""The statistics pass accumulates in place: `accumulate_class_sums` gives bit-identical totals to the former dense
per-batch reduction (fp32 [C, D] class sums cast to fp64 and added), on both backends, and never asks for a table
with more rows than the batch has."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sfmkern import ops
from sfmkern import stats as stats_mod
from sfmkern.backbone import load_backbone
from sfmkern.data import ArraySource


def _dense_reference(sums, counts, features, labels):
    """The reduction as it was: a dense [max(C, 2), D] fp32 table per batch, cast to fp64 and added."""
    c = sums.shape[0]
    batch_sums, batch_counts = ops.class_sums(features, labels, max(c, 2), deterministic=True)
    sums += batch_sums[:c].to(torch.float64)
    counts += batch_counts[:c]


def _batches(num_classes, batch, n_batches, dim, *, seed, sorted_labels=False, one_class=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        feats = torch.randn(batch, dim, generator=g) * 3 + 1  # not centred, so rounding order shows
        if one_class is not None:
            labels = torch.full((batch,), one_class, dtype=torch.int64)
        else:
            labels = torch.randint(0, num_classes, (batch,), generator=g)
        if sorted_labels:
            labels = labels.sort().values
        yield feats, labels


CASES = [  # (classes, batch, dim, sorted, one class)
    (50, 8, 37, False, None),  # C > B: most classes absent from a batch
    (3, 16, 64, False, None),  # C < B: every class present several times
    (1, 5, 16, False, None),  # one class (ops need C >= 2)
    (40, 12, 33, True, None),  # sorted labels (segmented path)
    (30, 9, 20, False, 29),  # the whole batch in the last class
    (997, 7, 761, False, None),  # awkward sizes
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("classes,batch,dim,is_sorted,one_class", CASES)
def test_bit_identical_to_dense_reduction(monkeypatch, backend, classes, batch, dim, is_sorted, one_class):
    monkeypatch.setenv("SFMKERN_BACKEND", backend)
    sums = torch.zeros(classes, dim, dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.int64)
    ref_sums, ref_counts = sums.clone(), counts.clone()
    for feats, labels in _batches(classes, batch, 4, dim, seed=classes + batch, sorted_labels=is_sorted,
                                  one_class=one_class):
        stats_mod.accumulate_class_sums(sums, counts, feats, labels)
        _dense_reference(ref_sums, ref_counts, feats, labels)
    assert torch.equal(counts, ref_counts)
    assert torch.equal(sums, ref_sums)  # bitwise
    # and both are the exact class sums up to fp32 rounding of a batch (a wrong class or row would be far off)
    exact = torch.zeros(classes, dim, dtype=torch.float64)
    for feats, labels in _batches(classes, batch, 4, dim, seed=classes + batch, sorted_labels=is_sorted,
                                  one_class=one_class):
        exact.index_add_(0, labels, feats.double())
    assert torch.allclose(sums, exact, rtol=1e-5, atol=1e-4)


def test_no_dense_class_table_per_batch(monkeypatch):
    """The per-batch table has min(B, C) rows (>= 2), never C, and the accumulators are updated in place."""
    seen = []
    real = ops.class_sums

    def spy(features, labels, num_classes, **kw):
        seen.append(num_classes)
        return real(features, labels, num_classes, **kw)

    monkeypatch.setattr(ops, "class_sums", spy)
    sums = torch.zeros(1000, 8, dtype=torch.float64)
    counts = torch.zeros(1000, dtype=torch.int64)
    sums_ptr, counts_ptr = sums.data_ptr(), counts.data_ptr()
    for feats, labels in _batches(1000, 6, 3, 8, seed=0):
        stats_mod.accumulate_class_sums(sums, counts, feats, labels)
    assert seen == [6, 6, 6]
    assert sums.data_ptr() == sums_ptr and counts.data_ptr() == counts_ptr
    assert int(counts.sum()) == 18


def test_collect_stats_unchanged_by_in_place_accumulation(monkeypatch):
    """collect_stats with the in-place accumulator == the same pass with the former dense reduction, bitwise."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 12, 30)
    labels[:12] = np.arange(12)  # every class present
    source = ArraySource(images, labels, classes=[f"c{i}" for i in range(12)])
    torch.manual_seed(0)
    backbone = load_backbone("test_efficientnet", pretrained=False, device="cpu")
    new = stats_mod.collect_stats(source, backbone, resize=16, crop=16, batch_size=4, progress=False)
    monkeypatch.setattr(stats_mod, "accumulate_class_sums", _dense_reference)
    old = stats_mod.collect_stats(source, backbone, resize=16, crop=16, batch_size=4, progress=False)
    assert torch.equal(new.counts, old.counts) and new.counts.tolist() == np.bincount(labels).tolist()
    assert torch.equal(new.centres, old.centres)
    assert new.fingerprint == old.fingerprint
