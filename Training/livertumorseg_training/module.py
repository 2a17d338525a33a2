"""The LightningModule: the engine's U-Net, the recipe's loss, optimiser and schedule.

Validation either scores patches (the seed) or runs the engine's own sliding window
(:func:`LiverTumorSegLib.inference.sliding_window_inference`: its window grid, Gaussian
weighting and air padding) over each validation volume's body box on the model grid, so
the Dice that picks checkpoints is close to the Dice users get; ``evaluate.py`` measures
the engine itself (body-box windows, postprocessing, the CT's own grid). Each case counts
once, also under DDP, where the distributed sampler repeats cases to even out the ranks.

Randomness: each training epoch's patches and augmentation follow from (recipe seed,
epoch) alone (:mod:`.data`), so a run resumed from ``last.ckpt`` trains as one that
went straight through.

Each checkpoint carries what export needs: the recipe, the data summary, provenance and
the validation metrics of that moment.
"""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
import torch

from LiverTumorSegLib.model.unet import build_network

from .augment import PatchAugmenter
from .losses import dice_from_counts, overlap_counts, segmentation_loss
from .visual import enlarge, grey, most_informative_slice, side_by_side

CHECKPOINT_KEY = "livertumorseg"


def architecture_of(config: dict) -> dict:
    """The model card's ``architecture`` section for a recipe."""
    return {"type": "unet3d", "in_channels": 1, "num_classes": 3,
            "widths": [int(w) for w in config["model"]["widths"]], "norm": str(config["model"]["norm"])}


def initial_weights(source: str, architecture: dict) -> dict:
    """Network weights to start from (fine-tuning): a model folder (checksum verified) or
    a ``train.py`` checkpoint. Raises :class:`ConfigError` when the architecture differs."""
    from pathlib import Path

    from LiverTumorSegLib.model import load_model

    from .errors import ConfigError

    path = Path(source).expanduser()
    if path.is_dir():
        loaded = load_model(path)
        if loaded.card.architecture != architecture:
            raise ConfigError(f"model.init_from {path}: its architecture {loaded.card.architecture} differs "
                              f"from the recipe's {architecture}")
        return loaded.network.state_dict()
    if not path.is_file():
        raise ConfigError(f"model.init_from {path} is neither a model folder nor a checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint.get(CHECKPOINT_KEY, {}).get("config")
    if saved is None or architecture_of(saved) != architecture:
        raise ConfigError(f"model.init_from {path}: not a checkpoint of this architecture ({architecture})")
    prefix = "network."
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


class LiverSegModule(L.LightningModule):
    """Trains :class:`~LiverTumorSegLib.model.unet.UNet3D` on (z, y, x) patches.

    Args:
        config: the resolved recipe.
        data_summary: the data set and split (stored in checkpoints for export).
        provenance: git commit, command line, versions (stored in checkpoints).
    """

    def __init__(self, config: dict, data_summary: Optional[dict] = None, provenance: Optional[dict] = None) -> None:
        super().__init__()
        self.config = config
        self.data_summary = data_summary or {}
        self.provenance = provenance or {}
        self.network = build_network(architecture_of(config))
        if config["model"].get("init_from"):
            self.network.load_state_dict(initial_weights(config["model"]["init_from"], architecture_of(config)))
        self.augmenter = PatchAugmenter.from_config(config)
        self.val_metrics: dict = {}
        self._counts = torch.zeros(2, 2, dtype=torch.float64)
        self._case_dice: list = []  # (case index, liver Dice, tumor Dice) per validation volume

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.config["loss"]
        return segmentation_loss(logits, target, loss["name"], float(loss["dice_weight"]), loss["class_weights"])

    # -- training --------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Training patches come with a margin; augment them here, on the training device,
        and crop them to the network's patch (see :mod:`.augment`)."""
        trainer = self._trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "label" in batch:
            batch["image"], batch["label"] = self.augmenter(batch["image"], batch["label"])
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self._loss(logits, batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # -- validation ------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._counts = torch.zeros(2, 2, dtype=torch.float64)
        self._case_dice = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.config["validation"]["mode"] == "sliding_window":
            image, logits, target = self._sliding_window(batch)
        else:
            image, target = batch["image"], batch["label"]
            logits = self(image)
        loss = self._loss(logits, target)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=target.shape[0])
        prediction = logits.argmax(dim=1)
        counts = overlap_counts(prediction, target).cpu()
        self._counts += counts
        if self.config["validation"]["mode"] == "sliding_window":
            dice = dice_from_counts(counts)
            self._case_dice.append((float(batch["index"]), float(dice[0]), float(dice[1])))
        if batch_idx < int(self.config["trainer"]["overlay_images"]) and not self.trainer.sanity_checking:
            self._log_overlay(image, prediction, target, batch_idx)

    def _sliding_window(self, batch: dict) -> tuple:
        from LiverTumorSegLib.inference import sliding_window_inference

        from LiverTumorSegLib.preprocess import air_value

        from .transforms import intensity_transform

        image = batch["image"].numpy()
        logits = sliding_window_inference(
            image, self.network, [int(p) for p in self.config["sampling"]["patch_size"]], num_classes=3,
            overlap=float(self.config["validation"]["overlap"]), batch_size=int(self.config["trainer"]["batch_size"]),
            device=str(self.device), pad_value=air_value(intensity_transform(self.config)),
        )
        return batch["image"][None], torch.from_numpy(logits)[None], batch["label"][None]

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._counts.to(self.device, torch.float32), reduce_op="sum").cpu()
        if self.config["validation"]["mode"] == "sliding_window":
            dice = self._mean_case_dice()
        else:
            dice = dice_from_counts(counts.double())
        metrics = {"val/dice_liver": float(dice[0]), "val/dice_tumor": float(dice[1]),
                   "val/dice_mean": float(dice.mean())}
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "val/dice_mean", sync_dist=True)
        if not self.trainer.sanity_checking:
            loss = self.trainer.callback_metrics.get("val/loss")
            self.val_metrics = {**metrics, "val/loss": None if loss is None else float(loss),
                                "epoch": int(self.current_epoch), "step": int(self.global_step),
                                "dice_definition": ("mean per-volume Dice, engine sliding window on whole volumes"
                                                    if self.config["validation"]["mode"] == "sliding_window"
                                                    else "Dice pooled over validation patches")}

    def _mean_case_dice(self) -> torch.Tensor:
        """(liver, tumor) Dice averaged over the validation cases, each counted once: under
        DDP every rank holds the same number of cases (the sampler pads by repeating some),
        so the rows are gathered and duplicates dropped by case index."""
        rows = torch.tensor(self._case_dice, dtype=torch.float64).reshape(-1, 3)
        if self.trainer.world_size > 1:
            rows = self.all_gather(rows.to(self.device)).reshape(-1, 3).cpu()
        per_case = {int(index): (liver, tumor) for index, liver, tumor in rows.tolist()}
        if not per_case:
            return torch.zeros(2, dtype=torch.float64)
        return torch.tensor(list(per_case.values()), dtype=torch.float64).mean(dim=0)

    def _log_overlay(self, image: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor, index: int) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or self.global_rank != 0:
            return
        image = image[0, 0].float().cpu().numpy()
        labels = target[0].cpu().numpy()
        k = most_informative_slice(labels)
        low, high = self.config["intensity"]["output_range"]
        picture = side_by_side(grey(image[k], low, high), labels[k], prediction[0, k].cpu().numpy())
        experiment.add_image(f"val/overlay_{index}", enlarge(picture), self.global_step, dataformats="HWC")

    # -- optimisation ----------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.config["optimizer"]
        lr, decay = float(opt["lr"]), float(opt["weight_decay"])
        if opt["name"] == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=decay)
        elif opt["name"] == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=decay)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.99, nesterov=True, weight_decay=decay)
        schedule = self.config["schedule"]
        if schedule["name"] == "none":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        factor = LRFactor(schedule["name"], total, int(schedule["warmup_steps"]), float(schedule["min_lr_ratio"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"config": self.config, "data": self.data_summary,
                                      "provenance": self.provenance, "val_metrics": self.val_metrics}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY, {})
        self.val_metrics = dict(saved.get("val_metrics", {}))
        keep_new_schedule_length(checkpoint)


def keep_new_schedule_length(checkpoint: dict) -> None:
    """Let a resumed run keep the schedule length of its own recipe.

    ``LambdaLR`` saves the attributes of a callable-object factor (:class:`LRFactor`:
    its total steps) and would put them back over the resumed run's, so a run resumed
    with more epochs would sit at the old schedule's floor for every added step. Lightning
    calls this hook before it restores the schedulers from the same ``checkpoint``; the
    step count (``last_epoch``) is still restored, so an interrupted run of the same
    length continues exactly where it stopped.
    """
    for state in checkpoint.get("lr_schedulers", []):
        if isinstance(state, dict) and isinstance(state.get("lr_lambdas"), list):
            state["lr_lambdas"] = [None] * len(state["lr_lambdas"])


class LRFactor:
    """Multiplier of the base learning rate at a step: linear warm-up, then cosine or
    poly (exponent 0.9) decay to ``min_ratio``. A class, so schedulers pickle."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> None:
        self.kind, self.total, self.warmup, self.min_ratio = kind, total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        t = min(max(step - self.warmup, 0) / max(self.total - self.warmup, 1), 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * t)) if self.kind == "cosine" else (1.0 - t) ** 0.9
        return self.min_ratio + (1.0 - self.min_ratio) * decay
