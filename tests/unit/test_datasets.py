import gzip
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.datasets import (
    PACKAGED,
    ArrayDataset,
    packaged,
    read_csv,
    read_idx,
    read_image_folder,
    read_image_folder_splits,
    read_mnist,
    split,
)
from worker.ally.data import load, to_tensors

IDX_TYPES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """The IDX format by hand: 0, 0, type byte, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, IDX_TYPES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_image(path: Path, array: np.ndarray, **save_args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)


def grey(value: int, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    return np.full(size, value, dtype=np.uint8)


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return packaged("digits")["train"]


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 70000], dtype=np.int32),
        np.array([[1.5, -2.25]], dtype=np.float32),
    ],
)
def test_idx_round_trip(tmp_path, name, array):
    back = read_idx(write_idx(tmp_path / name, array))
    assert back.dtype == array.dtype  # native byte order, not the file's big-endian
    np.testing.assert_array_equal(back, array)
    back[0] = 1  # a writable copy, not a view of the file's bytes


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_truncated_idx_is_rejected(tmp_path, name):
    path = write_idx(tmp_path / name, np.zeros((3, 4, 4), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"a\.idx"):
        read_idx(path)


def test_idx_with_a_bad_magic_number_is_rejected(tmp_path):
    path = tmp_path / "a.idx"
    path.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


def test_read_mnist_accepts_both_file_spellings(tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    train_y = np.array([0, 1, 2, 3, 4, 9, 9], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", train_x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", train_y)
    write_idx(tmp_path / "t10k-images.idx3-ubyte.gz", train_x[:3])
    write_idx(tmp_path / "t10k-labels.idx1-ubyte.gz", train_y[:3])

    splits = read_mnist(tmp_path)

    assert set(splits) == {"train", "test"}
    np.testing.assert_array_equal(splits["train"].x, train_x)
    assert splits["train"].y.tolist() == train_y.tolist()
    assert splits["train"].y.dtype == np.int64
    assert splits["test"].x.shape == (3, 28, 28)
    assert splits["train"].classes == tuple("0123456789")


def test_read_mnist_without_a_test_split_and_with_mismatched_counts(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    assert set(read_mnist(tmp_path)) == {"train"}
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(ValueError):
        read_mnist(tmp_path)


def test_image_folder_reads_classes_in_name_order_and_skips_hidden_files(tmp_path):
    write_image(tmp_path / "zebra" / "1.png", grey(10))
    write_image(tmp_path / "zebra" / "2.PNG", grey(20))
    write_image(tmp_path / "ant" / "1.png", grey(30))
    write_image(tmp_path / "ant" / ".hidden.png", grey(40, size=(2, 2)))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()

    ds = read_image_folder(tmp_path)

    assert ds.classes == ("ant", "zebra")
    assert ds.x.shape == (3, 6, 5) and ds.x.dtype == np.uint8
    assert ds.y.tolist() == [0, 1, 1]
    assert ds.x[:, 0, 0].tolist() == [30, 10, 20]
    assert (ds.task, ds.input_kind) == ("classification", "image")


def test_image_folder_reads_colour_and_promotes_stray_grey_images(tmp_path):
    colour = np.zeros((4, 4, 3), dtype=np.uint8)
    colour[..., 0] = 200
    write_image(tmp_path / "a" / "c.png", colour)
    write_image(tmp_path / "b" / "g.jpg", grey(90, size=(4, 4)), quality=95)

    ds = read_image_folder(tmp_path, classes=("b", "a"))

    assert ds.x.shape == (2, 4, 4, 3)
    assert ds.classes == ("b", "a")
    assert ds.y.tolist() == [0, 1]  # files follow the given class order
    assert np.abs(ds.x[0].astype(int) - 90).max() <= 2  # lossy JPEG; grey copied to all channels
    np.testing.assert_array_equal(ds.x[1], colour)


def test_image_folder_names_the_file_with_another_size(tmp_path):
    write_image(tmp_path / "a" / "1.png", grey(1))
    write_image(tmp_path / "a" / "2.png", grey(1, size=(7, 5)))
    with pytest.raises(ValueError, match=r"2\.png.*share one size"):
        read_image_folder(tmp_path)


# Pillow only warns between the limit and twice the limit; the reader must refuse.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_folder_refuses_images_over_the_pixel_limit(tmp_path, monkeypatch):
    write_image(tmp_path / "a" / "big.png", grey(1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    with pytest.raises(ValueError, match=r"big\.png: 5x6 exceeds the pixel limit"):
        read_image_folder(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_image_folder_names_a_corrupt_file(tmp_path, damage):
    write_image(tmp_path / "a" / "1.png", grey(1))
    write_image(tmp_path / "a" / "2.jpg", grey(1))
    data = (tmp_path / "a" / "2.jpg").read_bytes()
    broken = data[: len(data) // 2] if damage == "truncated" else b"not an image at all"
    (tmp_path / "a" / "2.jpg").write_bytes(broken)
    with pytest.raises(ValueError, match=r"2\.jpg: cannot"):
        read_image_folder(tmp_path)


def test_image_folder_splits_share_the_training_label_order(tmp_path):
    for name in ("cat", "dog", "eel"):
        write_image(tmp_path / "train" / name / "1.png", grey(1))
    write_image(tmp_path / "test" / "eel" / "9.png", grey(2))

    splits = read_image_folder_splits(tmp_path)

    assert splits["test"].classes == ("cat", "dog", "eel")
    assert splits["test"].y.tolist() == [2]
    assert set(read_image_folder_splits(tmp_path / "train")) == {"train"}


def test_image_folder_rejects_a_test_class_unknown_to_training(tmp_path):
    write_image(tmp_path / "train" / "cat" / "1.png", grey(1))
    write_image(tmp_path / "test" / "cow" / "1.png", grey(1))
    with pytest.raises(ValueError, match="cow"):
        read_image_folder_splits(tmp_path)


CSV = """id,colour,height,weight,label
1,3,1.5,60,yes
1,4,1.7,72.5,no
2,5,1.6,55,yes
3,6,1.8,80.25,no
"""


def test_csv_regression_target_features_and_groups(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text(CSV)

    ds = read_csv(path, target="weight", group="id", drop=["label"])

    assert ds.task == "regression" and ds.target == "weight"
    assert ds.y.dtype == np.float32 and ds.y.tolist() == [60, 72.5, 55, 80.25]
    np.testing.assert_allclose(ds.x, [[3, 1.5], [4, 1.7], [5, 1.6], [6, 1.8]], rtol=1e-6)
    assert ds.groups.tolist() == [1, 1, 2, 3]


def test_csv_text_or_integer_target_is_classification(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text(CSV)

    by_text = read_csv(path, target="label", features=["height"])
    by_integer = read_csv(path, target="colour", features=["height", "weight"])

    assert by_text.task == "classification"
    assert by_text.classes == ("no", "yes") and by_text.y.tolist() == [1, 0, 1, 0]
    assert by_integer.classes == ("3", "4", "5", "6") and by_integer.x.shape == (4, 2)


def test_csv_errors_name_the_problem(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text(CSV)
    with pytest.raises(ValueError, match=r"'age'.*columns are: id, colour"):
        read_csv(path, target="age")
    with pytest.raises(ValueError, match=r"people\.csv:2: column 'label' is not numeric: 'yes'"):
        read_csv(path, target="weight")
    with pytest.raises(ValueError, match="cannot also be features"):
        read_csv(path, target="weight", features=["height", "weight"])


@pytest.mark.parametrize(
    ("name", "shape", "task"),
    [
        ("digits", (1797, 8, 8), "classification"),
        ("diabetes", (442, 10), "regression"),
        ("mnist-5k", (5000, 28, 28), "classification"),
    ],
)
def test_packaged_datasets(name, shape, task):
    ds = packaged(name)["train"]
    assert ds.x.shape == shape and ds.task == task
    if task == "classification":
        assert ds.x.dtype == np.uint8 and ds.x.max() == 255
        assert ds.classes == tuple("0123456789")
    if name == "mnist-5k":
        assert np.bincount(ds.y).tolist() == [500] * 10


def test_unknown_packaged_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=", ".join(PACKAGED)):
        packaged("imagenet")


def test_split_is_stratified_and_seeded(digits):
    train, test = split(digits, 0.2, seed=3)

    assert len(train) + len(test) == len(digits)
    assert len(test) == round(0.2 * len(digits))
    share = np.bincount(test.y, minlength=10) / np.bincount(digits.y, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.01)
    again, _ = split(digits, 0.2, seed=3)
    other, _ = split(digits, 0.2, seed=4)
    np.testing.assert_array_equal(train.x, again.x)
    assert not np.array_equal(train.x, other.x)


def test_group_split_never_shares_a_group():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, size=2000)
    ds = ArrayDataset(
        x=rng.normal(size=(2000, 3)).astype(np.float32),
        y=rng.normal(size=2000).astype(np.float32),
        task="regression",
        input_kind="vector",
        classes=None,
        groups=groups,
    )
    for seed in range(5):
        train, test = split(ds, 0.25, seed)
        assert not set(train.groups) & set(test.groups)
        assert len(train) + len(test) == 2000
        assert 0.15 < len(test) / 2000 < 0.35


def test_to_tensors_standardises_images_with_training_statistics_only(digits):
    train, test = split(digits, 0.2, seed=0)
    brighter = ArrayDataset(
        x=np.clip(test.x.astype(int) + 40, 0, 255).astype(np.uint8),
        y=test.y,
        task=test.task,
        input_kind=test.input_kind,
        classes=test.classes,
    )

    train_t, test_t = to_tensors(train, brighter)

    assert train_t.x.shape == (len(train), 1, 8, 8) and train_t.x.dtype == torch.float32
    assert train_t.input_shape == (1, 8, 8)
    assert abs(train_t.x.mean().item()) < 1e-4 and abs(train_t.x.std().item() - 1) < 1e-3
    assert test_t.x.mean().item() > 0.3  # shifted by the train statistics, not re-centred
    pixels = train.x.astype(np.float64) / 255
    expected = (brighter.x[0] / 255 - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(test_t.x[0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert test_t.y.dtype == torch.int64 and test_t.y.tolist() == test.y.tolist()


def test_to_tensors_standardises_regression_targets_invertibly():
    train, test = split(packaged("diabetes")["train"], 0.2, seed=0)

    train_t, test_t = to_tensors(train, test)

    assert (
        abs(train_t.y.mean().item()) < 1e-5 and abs(train_t.y.std(correction=0).item() - 1) < 1e-4
    )
    assert abs(test_t.y.mean().item()) > 1e-3  # test targets use train's mean, not their own
    assert (test_t.target_mean, test_t.target_std) == (train_t.target_mean, train_t.target_std)
    np.testing.assert_allclose(test_t.original_targets(test_t.y).numpy(), test.y, rtol=1e-5)
    assert test_t.mse(1.0) == pytest.approx(float(train.y.std()) ** 2, rel=1e-5)
    assert abs(train_t.x.mean(0)).max().item() < 1e-5


def test_load_extracts_an_image_archive_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for split_name, count in (("train", 5), ("test", 2)):
        for name, value in (("cat", 10), ("dog", 200)):
            for i in range(count):
                colour = np.full((4, 4, 3), value, np.uint8)
                write_image(tmp_path / "src" / split_name / name / f"{i}.png", colour)
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="images")  # one top-level folder, as archives often do

    train, test = load("cifar10", archive)
    load("cifar10", archive)

    assert train.x.shape == (10, 3, 4, 4) and test.x.shape == (4, 3, 4, 4)
    assert train.classes == ("cat", "dog") and test.y.tolist() == [0, 0, 1, 1]
    assert len(list((tmp_path / "cache" / "ally").iterdir())) == 1


def test_load_without_data_says_to_pass_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data"):
        load("mnist")
    with pytest.raises(ValueError, match="mnist, cifar10"):
        load("svhn")
