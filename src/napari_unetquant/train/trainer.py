"""The training loop as a generator of progress events, with validation and best-model keeping.

The caller iterates :meth:`Trainer.run`; it may show the events, save the best model when a
:class:`ValidationEvent` says it improved, and stop at any step by no longer iterating. The core
knows nothing of threads, progress bars or files.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from ..config import InferConfig, TrainConfig
from ..data.augment import AugmentConfig, sample_crop
from ..devices import resolve_device
from ..events import Event, StepEvent, ValidationEvent
from ..infer.accumulator_grid import snap_biases
from ..infer.predict import predict_probabilities, predicted_classes, spatial_dims
from ..metrics import dice_score
from ..quant.global_batch import sharded_batch
from .distributed import DataParallel, check_batch_size
from .losses import bce_dice_loss, soft_dice_loss
from .sets import SliceSet, VolumeSet, foreground_centre
from .volumes import check_volumetric, volume_batch

ELASTIC = AugmentConfig(elastic_alpha=8.0, elastic_sigma=6.0)  # the paper's GM setting


class TrainingDiverged(ValueError):
    """The loss stopped being finite; the best model so far is kept."""


class Trainer:
    """Adam with a cosine schedule on random augmented crops, validating every few steps.

    Parameters
    ----------
    model
        The (quantized) U-Net; trained in place, on ``config.device``.
    train, validation
        Slices to train on and to choose the best model by (``validation=None``: the best is
        chosen by Dice on the un-augmented training slices). A 3D U-Net takes whole volumes
        (:class:`~napari_unetquant.train.VolumeSet`): it trains on 3D patches and is scored by
        Dice per volume.

    Built while a process group of several processes is active (``torchrun``; see
    :mod:`.distributed`), it trains data-parallel on the group's device: every process draws
    the same global batch of ``config.batch_size`` crops and trains on its share, so the
    processes together take the steps one process would take.
    """

    def __init__(
        self,
        model: nn.Module,
        train: SliceSet | VolumeSet,
        validation: SliceSet | VolumeSet | None,
        config: TrainConfig,
        infer: InferConfig | None = None,
    ) -> None:
        self.config = config
        self.parallel = DataParallel.current()
        if self.parallel is not None:
            check_batch_size(config.batch_size, self.parallel.world_size)
        self.device = self.parallel.device if self.parallel else resolve_device(config.device)
        self.model = model.to(self.device)
        self._train_model = self.parallel.wrap(model, self.device) if self.parallel else model
        self.train_set, self.validation_set = train, validation
        self.volumetric = check_volumetric(spatial_dims(model), train, validation, config)
        self.infer = infer or InferConfig(tile=max(512, config.crop))
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.steps
        )
        self.step = 0
        self.best_dice = -1.0
        self.best_step = 0
        self.best_state: dict[str, Tensor] | None = None
        augment = ELASTIC if config.elastic else AugmentConfig()
        augment = replace(augment, scanner=config.scanner_augment)
        self.augment = augment if config.augment else AugmentConfig.none()
        self.loss_fn = bce_dice_loss if config.loss == "bce_dice" else soft_dice_loss
        self._foreground = [np.argwhere(mask).astype(np.float64) for mask in train.masks]
        torch.manual_seed(config.seed)

    def _batch(self, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        if isinstance(self.train_set, VolumeSet):  # a 3D U-Net: patches of whole volumes
            arrays = volume_batch(self.train_set, self._foreground, self.config, self.augment, rng)
            images, masks = (torch.from_numpy(array).to(self.device) for array in arrays)
            return images, masks
        crops = []
        for i in rng.integers(len(self.train_set), size=self.config.batch_size):
            image, mask = self.train_set.images[i], self.train_set.masks[i]
            size = np.array([self.config.crop] * 2, np.float64)
            share = self.config.foreground_oversample
            centre = foreground_centre(self._foreground[int(i)], size, share, rng)
            crops.append(sample_crop(image, mask, self.config.crop, self.augment, rng, centre))
        images = torch.from_numpy(np.stack([c[0] for c in crops])[:, None])
        masks = torch.from_numpy(np.stack([c[1] for c in crops])[:, None].astype(np.float32))
        return images.to(self.device), masks.to(self.device)

    def _share(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """This process's share of the global batch (all of it in a single process)."""
        if self.parallel is None:
            return images, masks
        return self.parallel.share(images), self.parallel.share(masks)

    def _optimise(self, images: Tensor, masks: Tensor) -> float:
        self._train_model.train()
        try:
            with sharded_batch() if self.parallel else nullcontext():
                loss = self.loss_fn(self._train_model(images), masks)
            # data-parallel: the whole batch's loss, so every process stops at the same step
            whole = self.parallel.mean(loss) if self.parallel else loss.detach()
            if not torch.isfinite(whole):
                raise FloatingPointError(f"the loss became {whole.item()}")
        except FloatingPointError as error:
            kept = (
                f"the best model (step {self.best_step}) was kept"
                if self.best_state is not None
                else "no model was saved yet"
            )
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1} ({error}); it stopped and {kept}; "
                f"lower the learning rate"
            ) from error
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.schedule.step()
        return float(whole)

    def run(self) -> Iterator[Event]:
        """Train from the current step to ``config.steps``, yielding events as it goes.

        Each step draws its crops from a generator seeded by ``(seed, step)``, so a resumed run
        sees exactly the batches the interrupted one would have seen.
        """
        start, first_step = time.perf_counter(), self.step
        while self.step < self.config.steps:
            rng = np.random.default_rng([self.config.seed, self.step])
            loss = self._optimise(*self._share(*self._batch(rng)))
            self.step += 1
            elapsed = time.perf_counter() - start
            remaining = self.config.steps - self.step
            eta = elapsed / (self.step - first_step) * remaining
            yield StepEvent(self.step, self.config.steps, loss, elapsed, eta)
            if self.step % self.config.validate_every == 0 or remaining == 0:
                yield self.validate()

    def validate(self) -> ValidationEvent:
        """Score the current model; keep its weights if it is the best so far."""
        dice = self.validation_dice()
        improved = dice > self.best_dice
        if improved:
            self.best_dice, self.best_step = dice, self.step
            self.best_state = {
                k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
            }
        return ValidationEvent(
            self.step, self.config.steps, dice, self.best_dice, self.best_step, improved
        )

    def validation_dice(self) -> float:
        """Mean per-slice Dice on the validation slices (training slices when there are none);
        a 3D U-Net's is the mean Dice per volume."""
        slices = self.validation_set or self.train_set
        pairs = list(zip(slices.images, slices.masks, strict=True))
        if self.parallel:  # each process scores every N-th slice; the mean is pooled
            pairs = pairs[self.parallel.rank :: self.parallel.world_size]
        scores = []
        for image, mask in pairs:
            scores.append(self._dice(image, mask))
        if self.parallel:
            return self.parallel.mean_of_parts(scores, len(slices))
        return float(np.mean(scores))

    def _dice(self, image: np.ndarray, mask: np.ndarray) -> float:
        """Dice of the prediction of one slice ``(H, W)`` or, 3D, one volume ``(S, H, W)``;
        with several classes (``mask`` holds class indices), the mean of the classes' Dice."""
        stack = image if self.volumetric else image[None]
        probability = predict_probabilities(self.model, stack, self.infer, self.device)
        predicted = predicted_classes(probability, self.infer.threshold).reshape(mask.shape)
        if probability.ndim == stack.ndim:  # binary: (S, H, W) foreground probabilities
            return dice_score(predicted, mask)
        classes = range(1, probability.shape[1])  # (S, C, H, W): channel 0 the background
        return float(np.mean([dice_score(predicted == c, mask == c) for c in classes]))

    def best_model(self) -> nn.Module:
        """A copy of the model with the best validation weights, on the CPU, in eval mode, the
        biases of its integer layers on their int8 accumulator grid (less than a hundredth of
        an activation step away: :mod:`~napari_unetquant.infer.accumulator_grid`), so that
        int8 kernels compute exactly what the model does."""
        model = copy.deepcopy(self.model).cpu()
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        snap_biases(model.eval())
        return model
