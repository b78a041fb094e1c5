"""The LightningModule every arm runs: fine-tune (optional) and test one classifier, keeping per-sample outputs
for `predictions.parquet`."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torchmetrics
from torch import nn

from callbacks import ranks
from lab.models.sources import ModelError

TOPK_STORED = 5
MAX_CLASSES_STORED = 100


class ArmModule(L.LightningModule):
    """Fine-tune (optional) and test one classifier; `test_step` keeps per-sample outputs on the device."""

    def __init__(self, model: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.05,
                 epochs: int = 0, channels_last: bool = False, arch: str = ""):
        super().__init__()
        self.save_hyperparameters({"arch": arch, "num_classes": num_classes, "lr": lr, "epochs": epochs})
        self.model = model
        self.num_classes, self.lr, self.weight_decay, self.epochs = num_classes, lr, weight_decay, epochs
        self.channels_last = channels_last
        # Under DDP the metrics see the gathered predictions on every rank: no sync of their own, which would
        # count every sample once per rank (and wait in a collective that only rank 0 reaches).
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro",
                                                                       sync_on_compute=False)
        self.test_acc_per_class = torchmetrics.classification.MulticlassAccuracy(num_classes, average="none",
                                                                                 sync_on_compute=False)
        self._outputs: list[tuple[torch.Tensor, ...]] = []
        self.predictions: pd.DataFrame | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=total, pct_start=0.15)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_test_epoch_start(self) -> None:
        # A test retried after running out of memory starts from nothing, not from the failed try's counts.
        self._outputs = []
        for metric in (self.test_acc, self.test_acc_per_class):
            metric.reset()

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, ids = batch
        logits = self(x)
        if logits.shape[-1] != self.num_classes:
            raise ModelError(f"the model outputs {logits.shape[-1]} classes but the dataset has {self.num_classes}")
        probs = logits.float().softmax(dim=-1)
        # Outputs stay on the device and the metrics are updated once, at the end: a batch costs its forward
        # pass and a softmax, and nothing in it waits for the device (torchmetrics' argument checks would).
        if self.num_classes <= MAX_CLASSES_STORED:
            self._outputs.append((ids, y, probs))
        else:
            self._outputs.append((ids, y, *probs.topk(TOPK_STORED, dim=-1)))

    def on_test_epoch_end(self) -> None:
        outputs, self._outputs = self._outputs, []
        if self.trainer.world_size > 1:  # DDP: every rank scored its own batches; all of them, once, everywhere
            outputs = gather_outputs(outputs, self.trainer.world_size, len(self.trainer.test_dataloaders.dataset))
        if outputs:
            labels = torch.cat([out[1] for out in outputs])
            preds = torch.cat([out[2].argmax(dim=-1) if len(out) == 3 else out[3][:, 0] for out in outputs])
            for metric in (self.test_acc, self.test_acc_per_class):
                metric.update(preds, labels)
        self.log("test_accuracy", self.test_acc.compute())
        self.predictions = predictions_frame(outputs, self.num_classes)
        if self.trainer.world_size > 1:  # one-process runs keep the loader's order; gathered ones are sorted
            self.predictions = self.predictions.sort_values("sample_id", kind="stable", ignore_index=True)

    def per_class_accuracy(self) -> list[float]:
        return [float(v) for v in self.test_acc_per_class.compute().cpu()]

    def confusion_matrix(self) -> list[list[int]]:
        """Counts [label][pred], derived from the predictions table: no k x k state kept on the device during
        the test (800 MB at 10,000 classes), and one source for the arm's dense JSON and its sparse Parquet."""
        assert self.predictions is not None, "test loop produced no predictions"
        k = self.num_classes
        cells = self.predictions["label"].to_numpy() * k + self.predictions["pred"].to_numpy()
        return np.bincount(cells, minlength=k * k).reshape(k, k).tolist()


def gather_outputs(outputs: list[tuple[torch.Tensor, ...]], world: int, n_test: int) -> list[tuple[torch.Tensor, ...]]:
    """Every rank's test outputs, on the CPU, in rank order: one collective at the end of the test.

    The ranks hold disjoint batches of uneven counts, so the outputs travel as objects (no per-batch collective,
    no padding). Raises when a sample came twice or one is missing: the predictions must be exact.
    """
    local = [tuple(t.detach().cpu() for t in out) for out in outputs]
    merged = [out for part in ranks.gather(local, world) for out in part]
    ids = torch.cat([out[0] for out in merged]) if merged else torch.empty(0, dtype=torch.int64)
    repeated = len(ids) - len(torch.unique(ids))
    if repeated or len(ids) != n_test:
        raise RuntimeError(f"DDP gather: {len(ids)} predictions for {n_test} test images ({repeated} repeated); "
                           "the test shards must cover the test set once")
    return merged


def predictions_frame(outputs: list[tuple[torch.Tensor, ...]], num_classes: int) -> pd.DataFrame:
    """The `predictions.parquet` table: sample_id, label, pred, confidence, and probabilities or top-5."""
    cols = [torch.cat(parts).cpu().numpy() for parts in zip(*outputs, strict=True)]
    ids, labels = cols[0].astype(np.int64), cols[1].astype(np.int64)
    frame = {"sample_id": ids, "label": labels}
    if len(cols) == 3:
        probs = cols[2].astype(np.float32)
        frame |= {"pred": probs.argmax(1).astype(np.int64), "confidence": probs.max(1)}
        frame |= {f"prob_{k}": probs[:, k] for k in range(num_classes)}
    else:
        top_p, top_i = cols[2].astype(np.float32), cols[3].astype(np.int64)
        frame |= {"pred": top_i[:, 0], "confidence": top_p[:, 0]}
        frame |= {f"top{k + 1}_class": top_i[:, k] for k in range(top_i.shape[1])}
        frame |= {f"top{k + 1}_prob": top_p[:, k] for k in range(top_p.shape[1])}
    return pd.DataFrame(frame)
