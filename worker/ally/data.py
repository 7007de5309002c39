"""Datasets as ready float tensors for training, and the benchmark's named datasets.

Images are converted and standardised once here, so training never touches PIL or
per-item transforms. Standardisation statistics always come from the training split.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from service.datasets import (
    PACKAGED,
    ArrayDataset,
    Task,
    packaged,
    read_image_folder_splits,
    read_mnist,
    read_parkinsons,
    split,
)

DATASETS: tuple[str, ...] = ("mnist", "cifar10", "parkinsons", "parkinsons-rows", *PACKAGED)
# Where developers and CI keep the real datasets, relative to the project root.
DEFAULT_DATA_ROOT = Path("../shared/data")
TEST_FRACTION = 0.2
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass
class TensorDataset:
    """A split ready for training: standardised inputs and (for regression) targets."""

    x: torch.Tensor  # float32 [N, C, H, W] images or [N, D] vectors
    y: torch.Tensor  # int64 [N] class indices, or float32 [N] standardised targets
    task: Task
    classes: tuple[str, ...] | None
    input_shape: tuple[int, ...]  # x.shape[1:]
    target_mean: float = 0.0  # regression: y = (target - target_mean) / target_std
    target_std: float = 1.0

    def __len__(self) -> int:
        return len(self.y)

    def original_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Standardised targets or predictions back in the target's own units."""
        return y * self.target_std + self.target_mean

    def mse(self, standardised_mse: float) -> float:
        """An MSE measured on standardised targets, in the target's squared units."""
        return standardised_mse * self.target_std**2


def _mean_std(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float64) along `axis`; a constant column gets std 1, not a division by 0."""
    mean = values.mean(axis=axis, dtype=np.float64)
    std = values.std(axis=axis, dtype=np.float64)
    return mean, np.where(std > 0, std, 1.0)


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std on the 0..255 scale of uint8 [N,H,W] or [N,H,W,3] images.

    Exact, from a 256-bin histogram: numpy's std would allocate a float64 copy of the
    whole set (1.2 GB for CIFAR-10).
    """
    channels = images[..., None] if images.ndim == 3 else images
    levels = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(channels.shape[-1]):
        counts = np.bincount(channels[..., c].ravel(), minlength=256)
        mean = counts @ levels / counts.sum()
        var = counts @ (levels - mean) ** 2 / counts.sum()
        means.append(mean)
        stds.append(np.sqrt(var) if var > 0 else 1.0)
    return np.array(means), np.array(stds)


def _images_to_tensor(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W(,3)] -> float32 [N,C,H,W], standardised per channel (0..255 stats)."""
    t = torch.from_numpy(np.require(images, requirements=("C", "W")))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    out = t.to(torch.float32, memory_format=torch.contiguous_format)
    # Scaling to [0, 1] and then standardising is the same affine map as this one.
    shape = (1, -1, 1, 1)
    out.sub_(torch.from_numpy(mean).float().view(shape))
    out.div_(torch.from_numpy(std).float().view(shape))
    return out


def input_tensors(
    input_kind: str, reference: np.ndarray, *arrays: np.ndarray
) -> list[torch.Tensor]:
    """`arrays` as model inputs, standardised with the statistics of `reference`.

    Images (uint8 [N,H,W(,3)]) become float32 [N,C,H,W] standardised per channel;
    vectors [N,D] are standardised per feature.
    """
    if input_kind == "image":
        mean, std = _channel_stats(reference)
        return [_images_to_tensor(x, mean, std) for x in arrays]
    mean, std = _mean_std(reference, axis=0)
    return [torch.from_numpy(((x - mean) / std).astype(np.float32)) for x in arrays]


def to_tensors(train: ArrayDataset, test: ArrayDataset) -> tuple[TensorDataset, TensorDataset]:
    """Both splits as tensors, standardised with statistics of `train` only."""
    if (train.task, train.input_kind, train.classes) != (test.task, test.input_kind, test.classes):
        raise ValueError("train and test differ in task, input kind or classes")
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ValueError(f"train items {train.x.shape[1:]} differ from test {test.x.shape[1:]}")

    xs = input_tensors(train.input_kind, train.x, train.x, test.x)

    target_mean, target_std = 0.0, 1.0
    if train.task == "regression":
        m, s = _mean_std(train.y, axis=0)
        target_mean, target_std = float(m), float(s)
        ys = [
            torch.from_numpy(((ds.y - target_mean) / target_std).astype(np.float32))
            for ds in (train, test)
        ]
    else:
        ys = [torch.from_numpy(ds.y.astype(np.int64)) for ds in (train, test)]

    train_t, test_t = (
        TensorDataset(
            x=x,
            y=y,
            task=train.task,
            classes=train.classes,
            input_shape=tuple(x.shape[1:]),
            target_mean=target_mean,
            target_std=target_std,
        )
        for x, y in zip(xs, ys, strict=True)
    )
    return train_t, test_t


def _cache_root() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ally"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        # A read-only or missing home (containers, CI users): fall back to the temp dir.
        root = Path(tempfile.gettempdir()) / "ally-cache"
        root.mkdir(parents=True, exist_ok=True)
    return root


def extract_once(archive: Path) -> Path:
    """The folder `archive` extracts to, extracting it only if this version is not cached.

    The cache key is the file's name, size and mtime, so a replaced archive is re-extracted.
    Extraction goes to a private folder renamed into place, so a concurrent or interrupted
    run never sees a half-extracted tree.
    """
    stat = archive.stat()
    root = _cache_root()
    target = root / f"{archive.name}-{stat.st_size}-{stat.st_mtime_ns}"
    if not target.is_dir():
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
        try:
            with tarfile.open(archive) as tar:
                # The "data" filter refuses absolute paths, "..", links out of the tree.
                tar.extractall(partial, filter="data")
            partial.rename(target)
        except (tarfile.TarError, EOFError) as e:
            raise ValueError(f"{archive}: not a readable tar archive ({e})") from e
        except OSError:
            if not target.is_dir():  # not merely lost a race to another process
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _image_root(path: Path) -> Path:
    """An image folder from a folder, an archive, or a folder holding one archive."""
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"{path}: expected an image folder or a .tar.gz/.tgz/.tar archive")
        path = extract_once(path)
    elif not (path / "train").is_dir():
        archives = [p for p in path.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES)]
        if len(archives) == 1:
            path = extract_once(archives[0])
    # Archives often wrap everything in one top-level folder.
    children = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not (path / "train").is_dir() and len(children) == 1 and (children[0] / "train").is_dir():
        path = children[0]
    return path


def _data_path(name: str, path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        default = DEFAULT_DATA_ROOT / name
        if not default.exists():
            raise FileNotFoundError(
                f"no path given for dataset {name!r} and {default} does not exist; "
                f"pass --data PATH to the {name} files"
            )
        return default
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder for dataset {name!r}")
    return path


def load(
    name: str, path: str | os.PathLike[str] | None = None, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """The named benchmark dataset as (train, test) tensors.

    mnist and cifar10 keep their official test split; parkinsons is split 80/20 by
    subject (new patients) and parkinsons-rows by recording (new recordings of enrolled
    patients, the telemonitoring case); the packaged sets 80/20 stratified; all seeded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name in PACKAGED:
        splits = packaged(name)
    else:
        folder = _data_path(name.removesuffix("-rows"), path)
        if name == "mnist":
            splits = read_mnist(folder)
        elif name == "cifar10":
            splits = read_image_folder_splits(_image_root(folder))
        else:
            recordings = read_parkinsons(folder)
            if name == "parkinsons-rows":
                recordings = replace(recordings, groups=None)
            splits = {"train": recordings}
    if "test" in splits:
        train, test = splits["train"], splits["test"]
    else:
        train, test = split(splits["train"], TEST_FRACTION, seed)
    return to_tensors(train, test)
