"""``DetectionDataModule``: the datasets, transforms and loaders of one ``conf/dataset/*.yaml``."""

from __future__ import annotations

import functools
import inspect
import os
import random
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from ssd_lightning.plugins import build_plugin, is_spec

from .base import Target
from .batch_plan import BatchPlan, plan_batch
from .sampling import RepeatFactorSampler, repeat_factors
from .sources import SOURCES, SPLITS, DataSource
from .transforms import DetectionTransform, build_eval_transform, build_train_transform


def collate_detection(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list[Target]]:
    """Stack the images to [B,3,S,S] (uint8 from the data module's transforms, float32 from normalising
    ones); keep the targets as a list of dicts (their box counts differ)."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


def _derive_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence([e % 2**63 for e in entropy]).generate_state(1)[0])


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a distinct augmentation stream per worker, epoch and rank.

    ``torch.initial_seed()`` already differs per worker and epoch; ``rank`` tells DDP processes apart.
    """
    # No cv2.setNumThreads here: in a forked worker it can deadlock on the pool inherited from the parent.
    seed = _derive_seed(torch.initial_seed(), rank)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if isinstance(transform, DetectionTransform):
        transform.reseed(seed)


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def usable_workers(requested: int | str, on_cpu: bool = False, processes_per_node: int = 1) -> int:
    """`requested` DataLoader workers, at most one per CPU this process may run on (more only queue up).

    `auto`: training on the CPU, none on a machine of 2 CPUs (the training step needs both cores; workers
    only contend with it: the built-in run trains at 152 images/s with none, 125 with 2, on 2 cores,
    experiments/first_run/README.md), else a quarter of the CPUs; on accelerators, the CPUs of this
    process's share of the node less one (for the training process), at most 8."""
    cpus = usable_cpus()
    if requested == "auto":
        if on_cpu:
            return 0 if cpus <= 2 else cpus // 4
        # A process pinned to its own CPUs (SLURM, torchrun) has them to itself; else the node's are shared.
        share = cpus // max(1, processes_per_node) if cpus == (os.cpu_count() or cpus) else cpus
        return max(1, min(8, share - 1))
    requested = int(requested)
    if requested > cpus:
        rank_zero_info(f"dataset.num_workers={requested} but this process may use {cpus} CPUs: using {cpus}")
    return min(requested, cpus)


def held_out(name: str, fraction: float) -> bool:
    """Whether image `name` belongs to the held-out validation `fraction` (a stable hash of the name)."""
    return zlib.crc32(name.encode()) < fraction * 2**32


def make_source(format: str, **options: Any) -> DataSource:
    """The source of a built-in `format` (`SOURCES`) with the options that format takes; an option given
    (not None) that it does not take is an error naming it."""
    if format not in SOURCES:
        raise ValueError(f"dataset.format must be one of {', '.join(SOURCES)}, got {format!r}")
    kind = SOURCES[format]
    takes = inspect.signature(kind).parameters
    misplaced = [key for key, value in options.items() if value is not None and key not in takes]
    if misplaced:
        raise ValueError(f"dataset.{', dataset.'.join(misplaced)} do not apply to format {format!r}")
    return kind(**{key: value for key, value in options.items() if value is not None or key == "root"})


class DetectionDataModule(pl.LightningDataModule):
    """Datasets and loaders for SSD training, built from one ``conf/dataset/*.yaml``.

    ``classes``, ``num_classes`` (with background), ``image_size``, ``mean``, ``std`` (0-255 RGB) and,
    for COCO, ``label_to_category_id`` are set on construction; the datasets are built (and every
    image and box validated) in :meth:`setup`. Batches are ``(images [B,3,S,S], list of target dicts)``
    with boxes normalised to [0,1] (see :class:`~ssd_lightning.data.base.DetectionDataset`). Images are
    uint8 RGB, 4x less to copy to an accelerator than floats: normalise them where they arrive with
    :func:`~ssd_lightning.data.transforms.normalize_images` (``SSDLitModule`` does it itself).

    Args:
        format: a built-in data format (``shapes``, generated on first use; ``voc``; ``coco``; ``yolo``),
            read by its :class:`~ssd_lightning.data.sources.DataSource`; ignored when ``source`` is given.
        root: dataset folder: a VOCdevkit (voc), the folder holding ``annotations/`` (coco), the dataset's
            YAML or its folder (yolo), the cache folder (shapes; None means
            :func:`~ssd_lightning.data.shapes.default_shapes_root`).
        classes: class names without background. None: the data's own (VOC: ``classes.txt`` of the first
            train year, else VOC's 20; COCO: every category of the annotation file; shapes: its five).
        name: display name for logs; defaults to the format's.
        image_size: square input side of the model.
        mean, std: per-channel RGB normalisation on the 0-255 scale.
        global_batch_size: images per optimiser step over all devices, nodes and accumulated batches; each
            device's batch is derived from it once the trainer is known (:meth:`resolve_batch_size`).
        batch_size: images per batch PER DEVICE instead (the global batch is then batch_size x devices x
            nodes x accumulated batches); one of the two is needed.
        num_workers, pin_memory, persistent_workers: DataLoader settings (workers: at most the CPUs this
            process may use; ``auto`` follows the machine, see :func:`usable_workers`).
        train_sets, val_sets, test_sets: voc only, lists of ``[year, image_set]``.
        train_split, val_split, test_split: coco only (test defaults to the val split).
        val_holdout: fraction of the training images (chosen by a hash of their names, so the same on every
            run and machine) to validate on instead of the val split; they are left out of training.
        keep_difficult_in_train: train on VOC-difficult / COCO-crowd boxes too (evaluation keeps them
            flagged either way).
        skip_bad_samples: skip images with problems (counted in a warning) instead of failing.
        verify_images: read every image header in ``setup`` (existence is always checked).
        augmentation: keyword arguments of :func:`~ssd_lightning.data.transforms.build_train_transform`, or
            a transform of your own: ``{"_target_": "my_package.MyTransform", ...}``, a
            :class:`~ssd_lightning.data.transforms.DetectionTransform` subclass built with ``image_size``,
            ``mean``, ``std`` and the other keys.
        shapes: keyword arguments of :func:`~ssd_lightning.data.shapes.ensure_shapes_dataset` (counts, seed);
            ``online: true`` trains on ``num_train`` fresh scenes per epoch rendered in the loader workers
            (:class:`~ssd_lightning.data.shapes.OnlineShapesDataset`) instead of the cached train split.
        source: a data source of your own instead of ``format``: ``{"_target_": "my_package.MySource",
            ...}``, a :class:`~ssd_lightning.data.sources.DataSource` subclass built with ``root``, ``name``
            and the other keys (or a DataSource object).
        sampler: None (shuffle) or ``repeat_factor``: LVIS repeat-factor sampling of the training images
            (:class:`~ssd_lightning.data.sampling.RepeatFactorSampler`), for class imbalance.
        repeat_threshold: its threshold ``t``: a class in fewer than this fraction of the training images
            repeats its images ``sqrt(t / f)`` times on average.
    """

    def __init__(
        self,
        format: str = "shapes",
        root: str | None = None,
        classes: Sequence[str] | None = None,
        name: str | None = None,
        image_size: int = 300,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        global_batch_size: int | None = None,
        batch_size: int | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_sets: Sequence[Sequence[Any]] | None = None,
        val_sets: Sequence[Sequence[Any]] | None = None,
        test_sets: Sequence[Sequence[Any]] | None = None,
        train_split: str | None = None,
        val_split: str | None = None,
        test_split: str | None = None,
        val_holdout: float = 0.0,
        keep_difficult_in_train: bool = False,
        skip_bad_samples: bool = False,
        verify_images: bool = True,
        augmentation: Mapping[str, Any] | None = None,
        shapes: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | DataSource | None = None,
        sampler: str | None = None,
        repeat_threshold: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=[] if source is None or is_spec(source) else ["source"])
        if isinstance(source, DataSource):
            self.source = source
        elif is_spec(source):
            self.source = build_plugin(
                source, DataSource, "dataset.source", **({"root": root} if root else {})
            )
        else:
            self.source = make_source(
                format,
                root=root,
                name=name,
                train_sets=train_sets,
                val_sets=val_sets,
                test_sets=test_sets,
                train_split=train_split,
                val_split=val_split,
                test_split=test_split,
                shapes=shapes,
            )
        self.format = format if source is None else self.source.name
        self.name = name or self.source.name
        self.root = self.source.root
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                "mean/std (model.pixel_mean/pixel_std in a config) need 3 values (std > 0), got "
                f"{self.mean} / {self.std}"
            )
        if batch_size is None and global_batch_size is None:
            raise ValueError("set dataset.global_batch_size (all devices) or dataset.batch_size (per device)")
        for option, value in (("global_batch_size", global_batch_size), ("batch_size", batch_size)):
            if value is not None and int(value) < 1:
                raise ValueError(f"dataset.{option} must be >= 1, got {value}")
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        # Per device; until resolve_batch_size knows the devices, the batch of one process.
        self.batch_size = int(batch_size) if batch_size is not None else self.global_batch_size
        self.per_device_batch_given = batch_size is not None
        self.batch_plan: BatchPlan | None = None  # once the processes are known (resolve_batch_size)
        self.resolved_global_batch_size: int | None = None  # images per optimiser step, once resolved
        if not 0.0 <= float(val_holdout) < 1.0:
            raise ValueError(f"dataset.val_holdout must be a fraction in [0, 1), got {val_holdout}")
        self.val_holdout = float(val_holdout)
        if num_workers != "auto" and int(num_workers) < 0:
            raise ValueError(f"dataset.num_workers must be >= 0 or auto, got {num_workers}")
        self.num_workers = num_workers if num_workers == "auto" else int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.keep_difficult_in_train = keep_difficult_in_train
        self.skip_bad_samples = skip_bad_samples
        self.verify_images = verify_images
        self.augmentation = dict(augmentation or {})
        if sampler not in (None, "repeat_factor"):
            raise ValueError(f"dataset.sampler must be null or repeat_factor, got {sampler!r}")
        if not float(repeat_threshold) > 0:
            raise ValueError(f"dataset.repeat_threshold must be > 0, got {repeat_threshold}")
        self.sampler = sampler
        self.repeat_threshold = float(repeat_threshold)
        self.classes = self.source.class_names(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"dataset.classes must be distinct names, got {self.classes}")
        self.label_to_category_id = self.source.label_to_category_id
        self._check_train_transform(self.train_transform(normalize=False))  # a misspelt key fails here
        self.datasets: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes including background (label 0)."""
        return len(self.classes) + 1

    def train_transform(self, normalize: bool = True) -> DetectionTransform:
        """The training augmentation: build_train_transform with `augmentation`, or the class it names (whose
        images are uint8 whatever `normalize` says: it ends with `to_tensor_steps(mean, std)`)."""
        if is_spec(self.augmentation):
            return build_plugin(
                self.augmentation, DetectionTransform, "dataset.augmentation",
                image_size=self.image_size, mean=self.mean, std=self.std,
            )  # fmt: skip
        return build_train_transform(
            self.image_size, self.mean, self.std, **self.augmentation, normalize=normalize
        )

    def _check_train_transform(self, transform: DetectionTransform) -> None:
        """A transform of the user's own gives what the batches need: uint8 [3,S,S] at the model's size."""
        if not is_spec(self.augmentation):
            return
        side = self.image_size
        image = np.full((side + side // 2, side, 3), 127, np.uint8)
        target = {
            "boxes": np.array([[1.0, 1.0, side / 2, side / 2]], np.float32),
            "labels": np.array([1]),
            "difficult": np.array([False]),
            "image_id": 0,
            "orig_size": np.array([side + side // 2, side]),
        }
        tensor, _ = transform(image, target)
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (3, side, side):
            raise ValueError(
                f"dataset.augmentation ({self.augmentation['_target_']}) gives {tensor.dtype} images of "
                f"{tuple(tensor.shape)}; the batches need uint8 [3, {side}, {side}] (model.image_size): end "
                "its steps with a resize to image_size and ssd_lightning.data.to_tensor_steps(mean, std)"
            )

    def prepare_data(self) -> None:
        """Make the data exist (the built-in data is generated; once per node, the other processes wait)."""
        self.source.prepare()

    def build_dataset(
        self,
        split: str,
        *,
        transform: DetectionTransform | None | str = "default",
        skip_bad_samples: bool | None = None,
        verify_images: bool | None = None,
        keep_difficult: bool | None = None,
    ) -> Any:
        """The validated dataset of ``split`` (train, val or test).

        ``transform="default"`` gives the training augmentation for train and resize-only otherwise (uint8);
        ``skip_bad_samples``, ``verify_images`` and ``keep_difficult`` None take the configured values
        (difficult/crowd objects are kept everywhere but in train, unless ``keep_difficult_in_train``).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        if transform == "default":
            transform = (
                self.train_transform(normalize=False)
                if split == "train"
                else build_eval_transform(self.image_size, self.mean, self.std, normalize=False)
            )
        if (
            split == "train"
            and (generated := self.source.training_images(self.classes, transform)) is not None
        ):
            return generated
        options = {
            "transform": transform,
            "skip_bad_samples": self.skip_bad_samples if skip_bad_samples is None else skip_bad_samples,
            "verify_images": self.verify_images if verify_images is None else verify_images,
            "keep_difficult": (self.keep_difficult_in_train or split != "train")
            if keep_difficult is None
            else keep_difficult,
        }
        if self.val_holdout and split in ("train", "val"):
            source = self.source.load("train", self.classes, **options)
            validation = split == "val"
            return source.subset(
                lambda record: held_out(record.name, self.val_holdout) == validation,
                f"{source.name} ({'held-out' if validation else 'without the held-out'} "
                f"{self.val_holdout:.0%} for validation)",
            )
        return self.source.load(split, self.classes, **options)

    def validation_is_test(self) -> bool:
        """Whether the val and test splits are the same images (VOC2007 test, COCO val2017 by default):
        then nothing may be selected on validation results without selecting on the test split."""
        return not self.val_holdout and self.source.reads("val") == self.source.reads("test")

    def resolve_batch_size(
        self, num_devices: int = 1, num_nodes: int = 1, accumulate: int = 1, training: bool = True
    ) -> BatchPlan:
        """Set the per-device batch for `num_devices` x `num_nodes` processes that accumulate `accumulate`
        batches per optimiser step and return the plan (logged once). A global batch that does not divide
        over them is rounded (see `plan_batch`; evaluation only, `training=False`, rounds up)."""
        plan = plan_batch(
            None if self.per_device_batch_given else self.global_batch_size,
            self.batch_size if self.per_device_batch_given else None,
            num_devices,
            num_nodes,
            accumulate,
            round_up=not training,
        )
        if self.batch_plan is None:
            rank_zero_info(plan.describe())
        self.batch_plan = plan
        self.batch_size, self.resolved_global_batch_size = plan.per_device, plan.global_batch
        return plan

    def setup(self, stage: str | None = None) -> None:
        """Build (and validate) the datasets ``stage`` needs; any data problem raises here."""
        if self.trainer is not None and self.batch_plan is None:
            trainer = self.trainer
            self.resolve_batch_size(
                trainer.num_devices,
                trainer.num_nodes,
                trainer.accumulate_grad_batches,
                training=trainer.state.fn == "fit",
            )
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        if (
            stage in (None, "fit")
            and not self.val_holdout
            and self.source.reads("val") == self.source.reads("train")
        ):
            rank_zero_warn(
                f"{self.name}: validation reads the training images ({self.source.reads('val')}): its mAP "
                "measures memory, not generalisation, and the best checkpoint is chosen on it. Set "
                "dataset.val_holdout=0.1 to validate on held-out training images."
            )
        for split in needed.get(stage or "", SPLITS):
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)
                transform = self.datasets[split].transform
                if isinstance(transform, DetectionTransform):  # reproducible under seed_everything
                    transform.reseed(_derive_seed(torch.initial_seed(), self._rank(), SPLITS.index(split)))

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where the training augmentation's random stream stands in this process (what
        loads batches with `num_workers=0`; workers derive theirs from the restored global generators)."""
        transform = getattr(self.datasets.get("train"), "transform", None)
        return (
            {"train_augmentation": transform.random_state()}
            if isinstance(transform, DetectionTransform)
            else {}
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning calls it when resuming, after `setup` built the datasets."""
        transform = getattr(self.datasets.get("train"), "transform", None)
        if isinstance(transform, DetectionTransform):
            transform.set_random_state(state_dict.get("train_augmentation", {}))

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(split, split))
        dataset = self.datasets[split]
        sampler = None
        trainer = self.trainer
        if split == "train" and self.sampler == "repeat_factor":
            sampler, shuffle = self._repeat_factor_sampler(dataset), False
        elif split != "train" and trainer is not None and trainer.world_size > 1:
            # Every image evaluated exactly once: Lightning's default sampler pads ranks with repeats.
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        on_cpu = trainer is None or isinstance(trainer.accelerator, CPUAccelerator)
        workers = usable_workers(self.num_workers, on_cpu, trainer.num_devices if trainer is not None else 1)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=collate_detection,
            worker_init_fn=functools.partial(seed_worker, rank=self._rank()),
        )

    def _repeat_factor_sampler(self, dataset: Any) -> RepeatFactorSampler:
        records = getattr(dataset, "records", None)
        if records is None:
            raise ValueError(
                "dataset.sampler=repeat_factor needs training images with known labels; "
                f"{type(dataset).__name__} makes them on the fly (dataset.shapes.online=false: the cache)"
            )
        factors = repeat_factors([record.labels for record in records], self.repeat_threshold)
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # seed_everything's: the same order on every rank
        sampler = RepeatFactorSampler(dataset, factors, num_replicas=replicas, rank=rank, seed=seed)
        rank_zero_info(
            f"repeat-factor sampling (t={self.repeat_threshold:g}): {len(records)} training images make "
            f"{sampler.total_size} per epoch, {int((factors > 1).sum())} of them repeated, at most "
            f"{factors.max():.2f} times"
        )
        return sampler

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
