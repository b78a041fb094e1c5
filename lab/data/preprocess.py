"""An arm's input pipeline as data (timm's data-config fields): what reuse keys and stored model specs record,
without torch; `transform` builds the torchvision pipeline where pixels are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchvision.transforms import v2


@dataclass(frozen=True)
class Preprocess:
    """How an arm turns raw pixels into its input tensor (timm's data-config fields)."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def describe(self) -> str:
        mean = ",".join(f"{m:.3f}" for m in self.mean)
        std = ",".join(f"{s:.3f}" for s in self.std)
        return f"size={self.input_size} interp={self.interpolation} crop={self.crop_pct:g} mean={mean} std={std}"

    def transform(self, train: bool, augment: str) -> v2.Compose:
        import torch  # only where pixels are turned into tensors: reading and comparing pipelines needs neither
        from torchvision.transforms import v2

        interp = v2.InterpolationMode(self.interpolation)
        if train and augment == "crop_flip":
            resize = [
                v2.RandomResizedCrop(self.input_size, scale=(0.8, 1.0), interpolation=interp),
                v2.RandomHorizontalFlip(),
            ]
        else:
            scaled = round(self.input_size / self.crop_pct)
            resize = [v2.Resize(scaled, interpolation=interp, antialias=True), v2.CenterCrop(self.input_size)]
        return v2.Compose([*resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])
