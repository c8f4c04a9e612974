"""From the ``dataset`` / ``split`` / ``trainer`` configs to sources, split indices and loaders.

Every sample's augmentation is seeded from (run seed, position in the sample stream), so a run that
is killed and resumed at step s draws exactly the batches an uninterrupted run draws from step s on.
Under several processes, rank r of W takes positions ``[s*B + r*B/W, s*B + (r+1)*B/W)`` of step s
(B: the configured total batch), so the ranks' samples of a step are exactly one process's batch,
with the same augmentation.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dcc import distributed as ddp
from dcc.config import DatasetConfig, DatasetName, TrainerConfig, VocProtocol, choice
from dcc.data.datasets import ArraySource, LabeledDataset, UnlabeledPairDataset
from dcc.data.digits import load_digit_scenes
from dcc.data.files import DataError
from dcc.data.splits import choose_split

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train: Any  # Source of the training images (with labels)
    val: Any  # Source of the validation images
    labeled: np.ndarray  # indices into train that keep their labels
    unlabeled: np.ndarray  # indices into train used without labels
    image_labels: np.ndarray | None = None  # float [len(train), num_classes - 1] with dataset.image_labels=true
    # the held-out test images (digits: dataset.scenes.num_test > 0; folder: images/test + masks/test), or None;
    # read once, at the end of a run (dcc/engine/trainer.py Trainer.finish), never by a choice
    test: Any = None


def load_sources(ds: DatasetConfig) -> tuple[Any, Any]:
    """(train, val) sources of ``dataset.name``; a missing or incomplete root fails here, naming the layout."""
    train, val, _ = load_all_sources(ds)
    return train, val


def load_all_sources(ds: DatasetConfig) -> tuple[Any, Any, Any]:
    """(train, val, test) sources of ``dataset.name``; test is None where the dataset has no test split with labels
    (VOC, Cityscapes: their test labels are not public; folder without images/test)."""
    name = choice(ds.name, DatasetName)
    if name is DatasetName.digits:
        sc = ds.scenes
        arrays = load_digit_scenes(
            Path(ds.root).expanduser() / "digits",
            num_train=sc.num_train,
            num_val=sc.num_val,
            image_size=sc.image_size,
            digits_per_image=tuple(sc.digits_per_image),
            digit_size=tuple(sc.digit_size),
            stroke=sc.stroke,
            max_overlap=sc.max_overlap,
            seed=sc.seed,
            num_test=sc.get("num_test", 0),
        )
        return (
            ArraySource(arrays["train_images"], arrays["train_masks"]),
            ArraySource(arrays["val_images"], arrays["val_masks"]),
            ArraySource(arrays["test_images"], arrays["test_masks"]) if "test_images" in arrays else None,
        )
    if name is DatasetName.voc:
        from dcc.data.voc import load_voc

        return (*load_voc(ds.root, protocol=choice(ds.protocol, VocProtocol), num_classes=ds.num_classes,
                          ignore_index=ds.ignore_index), None)
    if name is DatasetName.cityscapes:
        from dcc.data.cityscapes import load_cityscapes

        return (*load_cityscapes(ds.root, num_classes=ds.num_classes, ignore_index=ds.ignore_index), None)
    if name is DatasetName.folder:
        from dcc.data.folder import load_folder_splits, read_classes

        read_classes(ds.root)  # a wrong root fails here naming the layout, before the interpolated num_classes is read
        return load_folder_splits(ds.root, num_classes=ds.num_classes, ignore_index=ds.ignore_index)
    raise ValueError(f"dataset.name={name.name} has no loader")  # pragma: no cover - enum is exhaustive


def build_data(cfg: Any) -> DataBundle:
    """Sources, the split (``split.labeled_list`` or generated from ``split.seed`` / ``split.index``) and,
    with ``dataset.image_labels=true``, the image-level labels of the training images."""
    train, val, test = load_all_sources(cfg.dataset)
    problems = [p for source in (train, val, test) for p in getattr(source, "layout_problems", [])]
    if problems:  # e.g. a mask without its image (dataset=folder): a labeled image would silently go unlabeled
        raise DataError(f"{len(problems)} dataset layout problems, the first: {problems[0]} "
                        "(python -m dcc.data.check lists them all)")
    if str(cfg.dataset.name) == "folder":  # your own files: every one checked now, not when a batch draws it
        from dcc.data.folder import scan

        for warning in scan({"train": train, "val": val, "test": test},
                            largest_side=4 * max(int(cfg.dataset.base_size), int(cfg.dataset.crop_size))):
            log.warning(warning)
    elif str(cfg.dataset.name) in ("voc", "cityscapes"):
        log.info("dataset=%s: files are checked as they are read (python -m dcc.data.check checks them all now)",
                 cfg.dataset.name)
    labeled, unlabeled = choose_split(cfg, train)
    image_labels = None
    if cfg.dataset.get("image_labels"):
        from dcc.data.image_labels import load_image_labels

        image_labels = load_image_labels(cfg, train)
    if test is None:
        log.info("dataset=%s has no test split with labels: every result of this run is on the validation set",
                 cfg.dataset.name)
    return DataBundle(train=train, val=val, labeled=labeled, unlabeled=unlabeled, image_labels=image_labels, test=test)


def _stream_key(seed: int, position: int, stream: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{stream}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class StepSampler(Sampler):
    """Endless stream of ``(key, index)``: a fresh permutation per epoch, ``key`` seeds the sample's augmentation.

    Starting at ``start`` (a sample position, i.e. step x batch size) reproduces the stream exactly.
    With ``part=(r, W)`` it yields only rank r's share of each step of ``batch`` positions: positions
    ``step * batch + r * batch / W + i`` for ``i < batch / W``.
    """

    def __init__(self, num_items: int, *, seed: int, stream: str, start: int = 0, batch: int = 1,
                 part: tuple[int, int] = (0, 1)) -> None:
        self.num_items, self.seed, self.stream, self.start = num_items, seed, stream, start
        self.batch, self.part = batch, part

    def positions(self) -> Iterator[int]:
        rank, world = self.part
        if world == 1:
            yield from itertools.count(self.start)
            return
        size = self.batch // world
        for step in itertools.count(self.start // self.batch):
            first = step * self.batch + rank * size
            yield from range(first, first + size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, perm = -1, None
        for position in self.positions():
            if position // self.num_items != epoch:
                epoch = position // self.num_items
                gen = torch.Generator().manual_seed(_stream_key(self.seed, epoch, self.stream + "/perm"))
                perm = torch.randperm(self.num_items, generator=gen).tolist()
            yield _stream_key(self.seed, position, self.stream), perm[position % self.num_items]


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(key, i)`` is ``dataset[i]`` drawn with torch's RNG seeded by ``key``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        key, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            return self.dataset[index]


def _sampler(dataset: Dataset, seed: int, stream: str, start_step: int, batch: int) -> StepSampler:
    """The stream of total batch ``batch`` from step ``start_step``: this rank's share under torch.distributed."""
    return StepSampler(len(dataset), seed=seed, stream=stream, start=start_step * batch,  # type: ignore[arg-type]
                       batch=batch, part=(ddp.rank(), ddp.world_size()))


def _loader(dataset: Dataset, batch_size: int, sampler: StepSampler, workers: int, device: torch.device) -> DataLoader:
    """Batches of this rank's share of ``batch_size`` (the total over ranks)."""
    return DataLoader(
        SeededItems(dataset),
        batch_size=ddp.share(batch_size, "batch size"),
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
        generator=torch.Generator(),  # keeps the loader from consuming the global RNG
    )


def labeled_loader(
    ds: DatasetConfig, trainer: TrainerConfig, source: Any, indices: np.ndarray, *, start_step: int,
    device: torch.device, stream: str = "labeled", batch_size: int | None = None, unlabeled_aug: bool = False,
) -> DataLoader:
    """Labeled training batches; ``unlabeled_aug``: the photometric augmentation of CAC's unlabeled views
    (``dataset.unlabeled_color_jitter_p`` / ``unlabeled_grayscale_p`` / ``unlabeled_blur_p``) instead of the labeled
    images' (self-training's pseudo-labeled images with ``loss.st_unlabeled_aug``)."""
    photometric = (
        dict(color_jitter_p=ds.unlabeled_color_jitter_p, grayscale_p=ds.unlabeled_grayscale_p,
             blur_p=ds.unlabeled_blur_p, blur_kernel=ds.blur_kernel)
        if unlabeled_aug else dict(color_jitter_p=ds.color_jitter_p)
    )
    dataset = LabeledDataset(
        source,
        indices.tolist(),
        train=True,
        crop_size=ds.crop_size,
        base_size=ds.base_size,
        scale_range=tuple(ds.labeled_scale),
        mean=list(ds.mean),
        std=list(ds.std),
        flip=ds.flip,
        ignore_index=ds.ignore_index,
        **photometric,
    )
    batch = batch_size or trainer.batch_size
    return _loader(dataset, batch, _sampler(dataset, trainer.seed, stream, start_step, batch), trainer.num_workers,
                   device)


def unlabeled_loader(
    ds: DatasetConfig, trainer: TrainerConfig, source: Any, indices: np.ndarray, *, stride: int, context: bool,
    start_step: int, device: torch.device, image_labels: np.ndarray | None = None, with_masks: bool = False,
) -> DataLoader:
    """Pairs of overlapping crops of unlabeled images (CAC's two views); ``stride``: the consistency features'
    output stride (``segnet.consistency_stride``), on whose grid the crops are aligned; ``context``: two crops at
    different offsets, each with context the other lacks (``loss.context``), else the same crop twice."""
    dataset = UnlabeledPairDataset(
        source,
        indices.tolist(),
        crop_size=ds.crop_size,
        base_size=ds.base_size,
        scale_range=tuple(ds.unlabeled_scale),
        stride=stride,
        iou_range=tuple(ds.iou_range),
        context=context,
        mean=list(ds.mean),
        std=list(ds.std),
        flip=ds.flip,
        color_jitter_p=ds.unlabeled_color_jitter_p,
        grayscale_p=ds.unlabeled_grayscale_p,
        blur_p=ds.unlabeled_blur_p,
        blur_kernel=ds.blur_kernel,
        image_labels=image_labels,
        with_masks=with_masks,
        ignore_index=ds.ignore_index,
    )
    batch = trainer.unlabeled_batch_size
    return _loader(dataset, batch, _sampler(dataset, trainer.seed, "unlabeled", start_step, batch),
                   trainer.num_workers, device)


def shard(num_items: int) -> list[int]:
    """This process's share of ``range(num_items)`` under torch.distributed (every item exactly once over all
    ranks, unlike DistributedSampler, which pads with repeats); everything without it."""
    return ddp.rank_items(num_items)


def eval_loader(ds: DatasetConfig, trainer: TrainerConfig, source: Any, device: torch.device, *,
                sharded: bool = True) -> DataLoader:
    """Native-resolution images in order. Under DDP each rank gets a disjoint shard (see :func:`shard`) unless
    ``sharded=False`` (every rank needs every item, e.g. to pseudo-label the whole unlabeled set)."""
    dataset = LabeledDataset(
        source,
        shard(len(source)) if sharded else list(range(len(source))),
        train=False,
        crop_size=ds.crop_size,
        base_size=ds.base_size,
        scale_range=tuple(ds.labeled_scale),
        mean=list(ds.mean),
        std=list(ds.std),
        ignore_index=ds.ignore_index,
    )
    workers = min(trainer.num_workers, 4)
    return DataLoader(
        dataset, batch_size=trainer.eval_batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
