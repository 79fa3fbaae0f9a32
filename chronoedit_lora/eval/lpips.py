"""LPIPS (Zhang et al. 2018, v0.1, AlexNet) from a local folder: the distance between two images'
unit-normalised AlexNet activations, weighted per channel by learned linear layers.

The folder (``--lpips``) holds two files, both read with ``torch.load(weights_only=True)``:

* ``alex.pth``: the LPIPS v0.1 linear layers (keys ``lin0.model.1.weight`` .. ``lin4``), as the
  ``lpips`` package ships them in ``lpips/weights/v0.1/alex.pth``;
* ``alexnet-owt-7be5be79.pth`` (any ``alexnet*.pth``): torchvision's AlexNet ImageNet weights, as
  torch's hub cache holds them.

For images x, y in [-1, 1]: each is shifted and scaled per channel, run through AlexNet's five
ReLU stages, each stage's activations divided by their norm over channels at every pixel; the
squared differences are weighted per channel (the linear layers), averaged over pixels, and the
five stages summed. 0 for identical images, larger is more different.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..errors import ChronoEditError

LINEAR_FILE = "alex.pth"
BACKBONE_GLOB = "alexnet*.pth"
STAGE_ENDS = (2, 5, 8, 10, 12)  # torchvision AlexNet.features indices after each ReLU stage
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def lpips_files(folder: str | Path, flag: str = "--lpips") -> tuple[Path, Path]:
    """(linear layers, AlexNet backbone) of an LPIPS folder; a one-line error naming ``flag`` if either is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ChronoEditError(f"{flag} {folder}: not a folder (nothing is downloaded).")
    backbones = sorted(folder.glob(BACKBONE_GLOB))
    linear = folder / LINEAR_FILE
    if not linear.is_file() or len(backbones) != 1:
        raise ChronoEditError(f"{flag} {folder}: expected {LINEAR_FILE} (the lpips package's weights/v0.1/alex.pth) "
                              f"and one {BACKBONE_GLOB} (torchvision's alexnet-owt-7be5be79.pth), found "
                              f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'}.")
    return linear, backbones[0]


class Lpips(torch.nn.Module):
    """LPIPS distance between images of one size (see the module docstring)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        super().__init__()
        from torchvision.models import alexnet

        linear_path, backbone_path = lpips_files(folder)
        features = alexnet(weights=None).features
        backbone = torch.load(backbone_path, map_location="cpu", weights_only=True)
        features.load_state_dict({k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")})
        starts = (0,) + STAGE_ENDS[:-1]
        self.stages = torch.nn.ModuleList(features[a:b] for a, b in zip(starts, STAGE_ENDS))
        linear = torch.load(linear_path, map_location="cpu", weights_only=True)
        self.weights = [linear[f"lin{i}.model.1.weight"].float() for i in range(len(STAGE_ENDS))]
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
        self.device = torch.device(device)
        self.weights = [w.to(self.device) for w in self.weights]
        self.to(self.device).eval()

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances (N,) between image batches (N, 3, H, W) in [-1, 1]."""
        x, y = (a.to(self.device) - self.shift) / self.scale, (b.to(self.device) - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=self.device)
        for stage, weight in zip(self.stages, self.weights):
            x, y = stage(x), stage(y)
            unit_x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            unit_y = y / (y.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            total += torch.nn.functional.conv2d((unit_x - unit_y) ** 2, weight).mean(dim=(1, 2, 3))
        return total

    def distance(self, edit: Image.Image, reference: Image.Image) -> float:
        """LPIPS between two PIL images of one size."""
        from ..video import to_tensor

        return self(to_tensor(edit.convert("RGB"))[None], to_tensor(reference.convert("RGB"))[None]).item()
