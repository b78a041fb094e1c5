"""The shared, seeded LightningDataModule: every arm sees the same test samples in the same order and the same
training order and augmentation; only the preprocessing (`Preprocess`) may differ per arm.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lab.config import Config
from lab.data.datasets import DatasetInfo, Split, resolve_dataset
from lab.data.preprocess import Preprocess


class SplitDataset(Dataset):
    """Yields (image tensor, label, sample_id). Training augmentation is seeded per (seed, epoch, index)."""

    def __init__(self, split: Split, transform: v2.Compose, seed: int | None = None, epoch: int = 0):
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.split)

    def _pixels(self, i: int) -> torch.Tensor:
        if self.split.images is not None:
            return torch.from_numpy(np.ascontiguousarray(self.split.images[i])).permute(2, 0, 1)
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(self.split.paths[i], mode=ImageReadMode.RGB)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        pixels = self._pixels(i)
        if self.seed is None:
            image = self.transform(pixels)
        else:
            # Random augmentation drawn from a generator that only (seed, epoch, i) decide, so every arm sees
            # exactly the same augmented images whatever RNG calls its model construction made. torchvision's
            # transforms draw from the global CPU generator: reseed it for this sample and put its state back.
            # (torch.random.fork_rng + torch.manual_seed draw the same numbers at ~60x the cost: they visit
            # every device backend, about 0.9 ms a sample on a loaded 2-core box against 15 us here.)
            generator = torch.default_generator
            state = generator.get_state()
            try:
                generator.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF)
                image = self.transform(pixels)
            finally:
                generator.set_state(state)
        return image, int(self.split.labels[i]), int(self.split.sample_ids[i])


class ABDataModule(L.LightningDataModule):
    """One seeded data module for every arm: same test samples in the same order, same training order."""

    def __init__(self, cfg: Config, preprocess: Preprocess, train_seed: int | None = None):
        super().__init__()
        self.cfg, self.preprocess = cfg, preprocess
        # Training order and augmentation: `seed` for every arm, unless an arm has its own (seed_b, an A/A test)
        self.train_seed = cfg.seed if train_seed is None else train_seed
        self.info: DatasetInfo | None = None

    def prepare_data(self) -> None:
        resolve_dataset(self.cfg)

    def setup(self, stage: str | None = None) -> None:
        self.info = resolve_dataset(self.cfg)

    def _loader(self, dataset: Dataset, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.info is not None
        # Called again every epoch (Trainer(reload_dataloaders_every_n_epochs=1)): order and augmentation
        # depend only on (seed, epoch), identical for every arm of one seed.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        # Without augmentation the transform draws no random numbers: no per-sample seeding to pay for.
        seed = self.train_seed if self.cfg.augment != "none" else None
        transform = self.preprocess.transform(True, self.cfg.augment)
        dataset = SplitDataset(self.info.train, transform, seed=seed, epoch=epoch)
        return self._loader(dataset, shuffle=True, generator=torch.Generator().manual_seed(self.train_seed + epoch))

    def test_dataloader(self) -> DataLoader:
        assert self.info is not None
        return self._loader(SplitDataset(self.info.test, self.preprocess.transform(False, "none")), shuffle=False)
