"""Image reading and dataset-writing helpers shared by the tasks' data modules."""

from __future__ import annotations

import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from tasks.common.sampling import SeededDataset, SeededShuffleSampler, evaluation_sampler, global_seed, training_position

log = logging.getLogger(__name__)

__all__ = [
    "BaseDataModule",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "ImageFiles",
    "PredictImages",
    "ReportSkippedImages",
    "SkippingMissing",
    "SkippedFiles",
    "collate_predict_batch",
    "list_images",
    "make_loader",
    "read_image",
]

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec's. They stay the first
# choice here: on hymenoptera's 397 JPEGs they decode 705 images/s against PIL's 590 (1 thread, same
# pixels: `python -m benchmarks.decode ../shared/datasets/hymenoptera`), and PIL takes over for
# whatever they cannot read. The deprecation notice, raised on every image, is not the user's business:
# it is silenced around each call, whatever warning filters the user's program sets.
DECODER_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded."""


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W); raise ``CorruptImageError`` naming the file.

    The one image reader of every task's datasets. The format is found from the content, not the
    extension. Every PIL mode becomes 8-bit RGB: alpha is dropped (as by torchvision and PIL's
    ``convert("RGB")``), palettes give their colours, grayscale is repeated in the three channels,
    CMYK is converted. Deeper images are scaled by their bit depth, ``round(v * 255 / (2**bits - 1))``
    (16-bit: ``round(v / 257)``, so a 16-bit copy of an 8-bit image reads as that image): 16-bit
    PNGs (grayscale, RGB, with alpha), PIL modes ``I;16*`` (16 bits), ``I`` (32-bit integers: the
    TIFF's BitsPerSample, else 16 bits, as 16-bit PGM and PNG files open in it) and ``F`` (floats:
    0..1 if all values lie in [0, 1], else 0..255, clipped). Animated images give their first frame.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=DECODER_DEPRECATION, category=DeprecationWarning)
            image = decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception:  # formats or variants torchvision's decoders miss (TIFF, PGM, ...): PIL
        image = _read_with_pil(path)
    if image.ndim == 4:  # an animated GIF: (frames, C, H, W)
        image = image[0]
    if image.dtype == torch.uint16:  # 16-bit PNG
        image = _scale_to_uint8(image.to(torch.int64), 16)
    return image


def _read_with_pil(path: str | os.PathLike) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                return _deep_grayscale_to_rgb(image)
            return v2.functional.pil_to_tensor(image.convert("RGB"))
    except UnidentifiedImageError:
        raise CorruptImageError(
            f"cannot decode image file {path}: not an image in a format PIL or torchvision reads "
            f"(expected e.g. {', '.join(IMAGE_EXTENSIONS)})"
        ) from None
    except Exception as error:  # truncated or damaged data, a mode PIL cannot convert, ...
        raise CorruptImageError(f"cannot decode image file {path}: {error}") from error


def _deep_grayscale_to_rgb(image: Image.Image) -> torch.Tensor:
    """PIL's deep grayscale modes (``I;16*``, ``I``, ``F``) to uint8 RGB, scaled by the bit depth."""
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 1.0
        gray = torch.from_numpy(np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8))
    else:
        bits = 16
        if image.mode == "I":
            tag = getattr(image, "tag_v2", {}).get(258)  # TIFF BitsPerSample
            bits = int(tag[0] if isinstance(tag, tuple) else tag) if tag else 16
        gray = _scale_to_uint8(torch.from_numpy(values.astype(np.int64)), bits)
    return gray.expand(3, *gray.shape).clone()


def _scale_to_uint8(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer ``values`` of ``bits`` bits to uint8: ``round(v * 255 / (2**bits - 1))``, clipped."""
    top = 2**bits - 1
    return ((values.clamp(0, top) * 255 + top // 2) // top).to(torch.uint8)


class SkippedFiles:
    """Files a dataset skipped, counted in shared memory, so that the main process reads the exact
    count over all DataLoader worker processes (persistent or not), and the first ``keep`` paths.

    Lock-free: each worker process (and the main process) writes its own slot, so nothing depends on
    the multiprocessing context, and a killed worker cannot leave a lock held. Up to ``workers``
    worker processes have their own slot (more share slots, and may then lose counts). Read with
    ``take`` between epochs, when no worker is reading samples.
    """

    def __init__(self, keep: int = 5, workers: int = 128, max_path_bytes: int = 1024) -> None:
        self.keep = keep
        self.slots = workers + 1
        self.max_path_bytes = max_path_bytes
        self._counts = multiprocessing.RawArray("q", self.slots)
        self._paths = multiprocessing.RawArray("c", self.slots * keep * max_path_bytes)

    def add(self, path: str | os.PathLike) -> None:
        """Count ``path`` (in whichever process reads the sample)."""
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (self.slots - 1)
        count = self._counts[slot]
        if count < self.keep:
            start = (slot * self.keep + count) * self.max_path_bytes
            self._paths[start : start + self.max_path_bytes] = os.fsencode(path)[: self.max_path_bytes].ljust(self.max_path_bytes, b"\0")
        self._counts[slot] = count + 1

    def take(self) -> tuple[int, list[str]]:
        """The count and (up to ``keep``) paths since the last ``take``; resets both."""
        paths = []
        for slot in range(self.slots):
            for index in range(min(self._counts[slot], self.keep)):
                start = (slot * self.keep + index) * self.max_path_bytes
                paths.append(os.fsdecode(self._paths[start : start + self.max_path_bytes].rstrip(b"\0")))
        count = sum(self._counts)
        self._counts[:] = [0] * self.slots
        return count, paths[: self.keep]


def list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursively, following links), sorted."""
    return sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(directory, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


class ImageFiles(Dataset):
    """Base of the datasets that read image files. ``read_or_skip(path)`` decodes one; an
    unreadable file raises ``CorruptImageError`` naming it, or with ``skip_corrupt`` gives None,
    a warning in the process that read it and a count in ``skipped`` (a ``SkippedFiles`` shared by
    the worker processes; the data module reports the total after each epoch). ``source`` names
    the dataset (a folder, an annotation file) in those messages."""

    def __init__(self, source: str, skip_corrupt: bool = False) -> None:
        self.source = source
        self.skipped = SkippedFiles() if skip_corrupt else None

    def read_or_skip(self, path: str | os.PathLike) -> torch.Tensor | None:
        try:
            return read_image(path)
        except CorruptImageError as error:
            if self.skipped is None:
                raise
            self.skipped.add(path)
            warnings.warn(f"skipped 1 unreadable image (skip_corrupt; the total follows at the end of the epoch): {error}", stacklevel=2)
            return None


class PredictImages(ImageFiles):
    """Every image under ``directory`` (recursively, sorted), for ``predict``: samples
    ``(transform(image), {"path", "size": the image's (H, W), "input_size": the transformed (H, W)})``,
    or None for an unreadable image with ``skip_corrupt`` (``ImageFiles``), which the data
    module's collate wrapper (``SkippingMissing``) leaves out.

    ``transform`` takes ``read_image``'s uint8 RGB tensor as a ``tv_tensors.Image``.
    """

    def __init__(self, directory: str | os.PathLike, transform: Callable[[torch.Tensor], torch.Tensor], skip_corrupt: bool = False) -> None:
        super().__init__(str(directory), skip_corrupt)
        self.paths = list_images(Path(directory))
        if not self.paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under predict_dir {directory}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        path = self.paths[index]
        image = self.read_or_skip(path)
        if image is None:
            return None
        transformed = self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        return transformed, {"path": str(path), "size": tuple(image.shape[-2:]), "input_size": tuple(transformed.shape[-2:])}


def collate_predict_batch(batch: list) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``PredictImages`` samples of one size as (images stacked, their info dicts)."""
    images, infos = zip(*batch)
    return torch.stack(images), list(infos)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    collate_fn: Callable | None = None,
    trainer: pl.Trainer | None = None,
) -> DataLoader:
    """The tasks' DataLoader; pinned memory only with CUDA, persistent workers only when there are workers.

    A training loader (``shuffle``) draws its order and augmentations from the run's seed, the
    epoch and the sample index, drops the last partial batch, and resumes at the position of
    ``trainer`` (``tasks.common.sampling``); an evaluation loader keeps the dataset's order and, in
    a distributed run, gives each sample to exactly one process. Worker seeds come from a private
    generator, so creating a loader leaves the global random stream alone.
    """
    if shuffle:
        sampler = SeededShuffleSampler(dataset, batch_size, position=lambda: training_position(trainer))
        dataset = SeededDataset(dataset)
    else:
        sampler = evaluation_sampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(global_seed()),
    )


class SkippingMissing:
    """A collate function for datasets that skip unreadable images: ``collate`` (default: torch's
    ``default_collate``) of the batch without the skipped samples (None); None when none is left."""

    def __init__(self, collate: Callable[[list], Any] | None = None) -> None:
        self.collate = collate or default_collate

    def __call__(self, batch: list) -> Any:
        batch = [sample for sample in batch if sample is not None]
        return self.collate(batch) if batch else None


class ReportSkippedImages(pl.Callback):
    """Added by a ``BaseDataModule`` with ``skip_corrupt``: one warning per epoch and dataset with
    the exact number of skipped images (over all worker processes) and the first few names."""

    def __init__(self, datamodule: BaseDataModule) -> None:
        self.datamodule = datamodule

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.datamodule.report_skipped("train_dataset", f"in training epoch {trainer.current_epoch}")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            when = "in the sanity check"
        else:
            when = f"in validation (epoch {trainer.current_epoch})" if trainer.state.fn == "fit" else "in validate"
        self.datamodule.report_skipped("val_dataset", when)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.datamodule.report_skipped("test_dataset", "in test")

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.datamodule.report_skipped("predict_dataset", "in predict (left out of the predictions)")


def evaluated_split(test_split: str | None, val_split: str) -> str:
    """The split ``test`` evaluates: ``test_split`` if the data names one, else the validation split (said in the log)."""
    if test_split is None:
        log.info("no test split given: test evaluates the validation split (%s)", val_split)
        return val_split
    return test_split


class BaseDataModule(pl.LightningDataModule):
    """The loaders every task's data module shares: one ``make_loader`` per split, ``batch_size``
    for training and ``val_batch_size`` for validation, test and predict, the collate function
    that ``collate_fn(dataset)`` gives (default: torch's).

    A subclass passes the loader settings to ``__init__`` (``batch_size``, ``val_batch_size``,
    ``num_workers``, ``pin_memory``, ``persistent_workers``, ``skip_corrupt``), sets
    ``train_dataset`` / ``val_dataset`` / ``test_dataset`` (its ``test_split``, or the validation
    split: ``evaluated_split``) / ``predict_dataset`` in ``setup``, and ``mean`` / ``std`` where its transforms normalize the images (read by
    the task's ``input_normalization``).

    Bad input, the same in every task: an unreadable image file is an error naming it, unless the
    subclass's ``skip_corrupt`` is set (its datasets are ``ImageFiles``): then it is left out of its
    batch (a batch left empty is None, which the task's steps pass over) and the count with the
    first names is reported in one warning per epoch and split.

    ``train_loader_hooks``: functions ``hook(datamodule, epoch)`` called each time a training
    loader is built, with the epoch it starts (after a resume, the resumed one). Lightning builds
    the first loader, and starts its workers, before any epoch hook of a callback runs; a callback
    that changes what the workers produce (``ProgressiveResolution``) registers here.
    """

    train_dataset: Dataset  # set by setup("fit")
    val_dataset: Dataset  # set by setup("fit") and setup("validate")
    test_dataset: Dataset  # set by setup("test")

    def __init__(
        self,
        batch_size: int,
        val_batch_size: int,
        num_workers: int,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.skip_corrupt = skip_corrupt
        self.train_loader_hooks: list[Callable[[BaseDataModule, int], None]] = []

    def collate_fn(self, dataset: Dataset) -> Callable | None:
        return None

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        collate = self.collate_fn(dataset)
        if self.skip_corrupt:
            collate = SkippingMissing(collate)
            trainer = self.trainer
            if trainer is not None and not any(isinstance(c, ReportSkippedImages) and c.datamodule is self for c in trainer.callbacks):
                trainer.callbacks.append(ReportSkippedImages(self))
        return make_loader(dataset, batch_size, shuffle, self.num_workers, self.pin_memory, self.persistent_workers,
                           collate, trainer=self.trainer)

    def report_skipped(self, dataset: str, when: str) -> None:
        """Warn with the number of images ``self.<dataset>`` skipped since the last report (all worker
        processes together) and the first few names; nothing when none was skipped."""
        images = getattr(self, dataset, None)
        if getattr(images, "skipped", None) is None:
            return
        count, paths = images.skipped.take()
        if count:
            trainer = self.trainer
            rank = f" on process {trainer.global_rank} of {trainer.world_size}" if trainer is not None and trainer.world_size > 1 else ""
            more = f" and {count - len(paths)} more" if count > len(paths) else ""
            warnings.warn(
                f"{images.source}: skip_corrupt skipped {count} unreadable image(s) {when}{rank}: {', '.join(paths)}{more}", stacklevel=2
            )

    def teardown(self, stage: str) -> None:
        """Report what was skipped and not yet reported (e.g. in an interrupted epoch)."""
        for dataset in ("train_dataset", "val_dataset", "test_dataset", "predict_dataset"):
            self.report_skipped(dataset, f"in {stage} (not yet reported)")

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        for hook in self.train_loader_hooks:
            hook(self, epoch)
        return self.loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_dataset, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_dataset, self.val_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.predict_dataset, self.val_batch_size, shuffle=False)
