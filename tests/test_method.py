"""Issue #11's method pieces: defaults that move at any budget, real-image start, anchoring, sub-centre flows.

A tiny random-weight timm ViT (test_vit at 32 px) on the real photo folder of conftest (3 classes, 3-4 images each).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sfmkern.distillation import CONFIG_FIELDS, PAPER_SCHEDULE, DistillConfig, Distiller, paper_schedule, realdata
from sfmkern.pipeline import distill
from sfmkern.synthetic import SyntheticImages, decode, encode, level_sizes

SMALL = {"syn_res": 32, "crop": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(photo_folder):
    from sfmkern.data import ImageFolder

    return ImageFolder(photo_folder)


@pytest.fixture(scope="module")
def cached_stats(folder, backbone, tmp_path_factory):
    from sfmkern.stats import collect_stats

    out = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    return collect_stats(folder, backbone, resize=32, crop=32, batch_size=8, out=out, cache_features=True,
                         progress=False)


def test_encode_inverts_decode():
    images = torch.rand(4, 3, 16, 16)
    levels = encode(images, level_sizes(16), margin=0.05)
    assert [lv.shape[-1] for lv in levels] == level_sizes(16)
    torch.testing.assert_close(decode(levels, 16), 0.05 + 0.9 * images, atol=1e-5, rtol=0)
    s = SyntheticImages(4, 16, grow_every=7)
    s.set_images(images)
    assert s.num_levels == s.max_levels and all(lv.requires_grad for lv in s.levels)
    torch.testing.assert_close(s.render().detach(), 0.02 + 0.96 * images, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="set_images"):
        s.set_images(torch.rand(3, 3, 16, 16))


def test_default_budget_moves_the_loss_and_draws_images(cached_stats, backbone):
    """The acceptance test of issue #11: distill(stats, backbone, ipc=1, steps=100) with no other argument."""
    from sfmkern.stats import ClassStats

    bare = ClassStats(**{**cached_stats.__dict__, "features_path": None})  # nothing real reachable: noise start
    losses = []
    orig = Distiller.step

    def spy(self, mode="auto"):
        loss = orig(self, mode)
        losses.append(float(loss))
        return loss

    Distiller.step = spy
    try:
        with pytest.warns(UserWarning, match="starting from noise"):
            result = distill(bare, backbone, ipc=1, steps=100, progress=False, syn_res=32, crop=32)
    finally:
        Distiller.step = orig
    assert len(losses) == 100
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.05, (losses[:5], losses[-10:])
    images = result.float_images()
    # not flat colour squares: every image varies across its pixels (a 1x1-level image has std 0)
    assert float(images.flatten(2).std(dim=2).min()) > 0.02
    assert result.config["init"] == "noise" and result.config["effective_grow_every"] == 0


def test_incomplete_schedule_warns(cached_stats, backbone):
    with pytest.warns(UserWarning, match="ends before the pyramid"):
        distill(cached_stats, backbone, ipc=1, steps=3, grow_every=2, init="noise", objective="sfm",
                progress=False, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distill(cached_stats, backbone, ipc=1, steps=2, init="noise", objective="sfm", progress=False, **SMALL)
    assert paper_schedule() == PAPER_SCHEDULE and PAPER_SCHEDULE["grow_every"] == 200
    assert DistillConfig(**{k: v for k, v in PAPER_SCHEDULE.items()}).effective_lr == 2e-3


def test_real_start_picks_the_centroid_images(cached_stats, folder, backbone):
    feats, labels = cached_stats.load_features()
    start = realdata.select_start(cached_stats, 1, seed=0)
    for c, row in enumerate(start["rows"].tolist()):
        members = np.flatnonzero(labels == c)
        d = np.linalg.norm(np.asarray(feats[members], dtype=np.float32) - cached_stats.centres[c].numpy(), axis=1)
        assert row == members[d.argmin()]
    torch.testing.assert_close(start["targets"], cached_stats.centres.float())
    d = Distiller(cached_stats, backbone, config=DistillConfig(ipc=1, objective="sfm", **SMALL),
                  **realdata.prepare(cached_stats, folder, backbone, DistillConfig(ipc=1, objective="sfm", **SMALL)))
    images, _ = realdata.load_start_images(folder, start["ranking"], 1, 32)
    torch.testing.assert_close(d.render_local(), 0.02 + 0.96 * images, atol=1e-5, rtol=0)
    assert d.config.effective_lr == 2e-3


def test_subcentre_flows_and_augmented_anchor(cached_stats, folder, backbone):
    cfg = DistillConfig(ipc=2, objective="anchored", anchor_images=3, anchor_views=2, **SMALL)
    real = realdata.prepare(cached_stats, folder, backbone, cfg)
    assert real["targets"].shape == (3 * 2, backbone.feature_dim)
    assert real["anchor"].shape == (6, backbone.feature_dim) and bool(torch.isfinite(real["anchor"]).all())
    again = realdata.prepare(cached_stats, folder, backbone, cfg)  # the cache beside the statistics answers
    torch.testing.assert_close(again["anchor"], real["anchor"], atol=0, rtol=0)
    d = Distiller(cached_stats, backbone, config=cfg, **real)
    assert d.num_classes == 6 and d.view_labels.tolist() == list(range(6))
    loss = d.step()
    assert bool(torch.isfinite(loss))
    result = d.distilled_set()
    assert result.labels.tolist() == [0, 0, 1, 1, 2, 2] and len(result.classes) == 3


def test_bad_method_options():
    for kwargs, match in (({"init": "centroid"}, "init"), ({"objective": "lgm"}, "objective"),
                          ({"anchor_target": "clean"}, "anchor_target"), ({"anchor_weight": -1.0}, "anchor_weight"),
                          ({"anchor_views": 0}, "anchor_views")):
        with pytest.raises(ValueError, match=match):
            DistillConfig(**kwargs)


def test_defaults_agree_across_config_function_and_cli():
    """DistillConfig is the one source: distill()'s signature and the CLI flags are derived from it, and a run with
    no option gets the dataclass's defaults through either door; stats and eval flags read the API's defaults."""
    import dataclasses
    import inspect

    import sfmkern
    from sfmkern.cli import build_parser, distill_settings
    from sfmkern.evaluation import evaluate, fit_full_head
    from sfmkern.stats import collect_stats

    config = DistillConfig()
    for fn in (sfmkern.distill, sfmkern.distillation.distill):
        params = inspect.signature(fn).parameters
        for f in dataclasses.fields(DistillConfig):
            assert params[f.name].default == getattr(config, f.name), (fn, f.name)
    parser = build_parser()
    args = parser.parse_args(["distill", "--stats", "s.safetensors", "--backbone", "b", "--out-dir", "o"])
    assert distill_settings(args) == {} and DistillConfig(**distill_settings(args)) == config
    flags = {a.dest: a for a in parser._subparsers._group_actions[0].choices["distill"]._actions}
    for f in dataclasses.fields(DistillConfig):
        if f.metadata["flag"] is None:
            continue
        dest = (f.metadata["flag"] or f.name).lstrip("-").replace("-", "_")
        shown = f.default[0] if isinstance(f.default, tuple) else f.default
        assert dest in flags and (isinstance(shown, bool) or f"(default {shown})" in flags[dest].help), f.name
    # every flag given, each to a non-default value, arrives in the config
    given = parser.parse_args(["distill", "--stats", "s", "--backbone", "b", "--out-dir", "o", "--ipc", "3",
                               "--steps", "7", "--lr", "0.5", "--flip-p", "0.25", "--scale-min", "0.3",
                               "--no-subcentres", "--init", "noise", "--max-memory", "1GiB"])
    cfg = DistillConfig(**distill_settings(given))
    assert (cfg.ipc, cfg.steps, cfg.lr, cfg.flip_p, cfg.scale, cfg.subcentres, cfg.init, cfg.max_memory) == (
        3, 7, 0.5, 0.25, (0.3, 1.0), False, "noise", 2**30)
    assert inspect.signature(sfmkern.distill).parameters["mode"].default == args.mode
    for command, fn, pairs in (
            ("stats", collect_stats, (("resize", "resize"), ("crop", "crop"), ("batch_size", "batch_size"),
                                      ("checkpoint_every", "checkpoint_every"))),
            ("eval", evaluate, (("epochs", "epochs"), ("runs", "runs"), ("seed", "seed"), ("resize", "resize"),
                                ("crop", "crop"), ("batch_size", "feature_batch"), ("mode", "mode"))),
            ("eval", fit_full_head, (("head_epochs", "epochs"),)),
            ("plan", sfmkern.plan, (("ipc", "ipc"), ("augs", "augs"), ("mode", "mode")))):
        parsed = vars(parser.parse_args([command]))
        params = inspect.signature(fn).parameters
        for dest, name in pairs:
            assert parsed[dest] == params[name].default, (command, dest)
    assert (config.init, config.objective, config.effective_lr, config.effective_grow_every) == ("real", "sfm", 2e-3, 0)


def test_cli_paper_flag_and_method_options(monkeypatch, tmp_path):
    import sfmkern.cli as cli
    import sfmkern.pipeline as distill_mod
    from sfmkern.distillation import DistilledSet

    (tmp_path / "s.safetensors").write_bytes(b"x")
    seen = []

    def fake_distill(stats, backbone, **kwargs):
        seen.append(kwargs)
        return DistilledSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])

    monkeypatch.setattr(cli, "_load_backbone", lambda args: None)
    monkeypatch.setattr(cli, "_load_stats_for", lambda path, backbone, crop=None: None)
    monkeypatch.setattr(distill_mod, "distill", fake_distill)
    base = ["--quiet", "distill", "--stats", str(tmp_path / "s.safetensors"), "--backbone", "b"]
    assert cli.main([*base, "--out-dir", str(tmp_path / "a"), "--paper"]) == 0
    assert {k: seen[-1][k] for k in PAPER_SCHEDULE if k != "steps"} == {
        k: v for k, v in PAPER_SCHEDULE.items() if k != "steps"}
    assert cli.main([*base, "--out-dir", str(tmp_path / "b"), "--paper", "--lr", "0.01", "--objective", "anchored",
                     "--anchor-weight", "2", "--scale-min", "0.5"]) == 0
    assert (seen[-1]["lr"], seen[-1]["objective"], seen[-1]["grow_every"], seen[-1]["anchor_weight"],
            seen[-1]["scale"]) == (0.01, "anchored", 200, 2.0, (0.5, 1.0))
    assert cli.main([*base, "--out-dir", str(tmp_path / "c")]) == 0
    config = DistillConfig(**{k: v for k, v in seen[-1].items() if k in CONFIG_FIELDS})  # no flag: the defaults
    assert (config.lr, config.grow_every, config.init, config.objective, config.subcentres) == (
        None, None, "real", "sfm", True)
