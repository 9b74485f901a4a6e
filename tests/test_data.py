"""Datasets: CIFAR pickle reading and checksums, synthetic, imagefolder, limits, batch loader."""

import hashlib
import logging
import pickle

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import (
    CIFAR,
    BatchLoader,
    balanced_subset,
    load_cifar,
    load_dataset,
    load_imagefolder,
    load_prepared,
    make_synthetic,
    random_crop_flip,
    save_prepared,
)
from pipeline.errors import DataError


def data_config(**changes) -> DataConfig:
    settings = dict(dataset="synthetic", root="unused", download=False, train_limit=0,
                    test_limit=0, synthetic_train=64, synthetic_test=32, synthetic_classes=4,
                    val_fraction=0.25, image_size=16)
    return DataConfig(**{**settings, **changes})


def write_fake_cifar10(root, images_per_batch=20):
    """A tiny CIFAR-10 in the official pickle layout (wrong md5s, on purpose)."""
    folder = root / CIFAR["cifar10"].folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*CIFAR["cifar10"].train_files, *CIFAR["cifar10"].test_files]:
        batch = {b"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(images_per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def test_cifar_pickles_load_as_uint8_nchw_and_mismatch_warns(tmp_path, caplog):
    folder = write_fake_cifar10(tmp_path)
    with caplog.at_level(logging.WARNING):
        dataset = load_cifar(tmp_path, "cifar10", download=False)
    assert dataset.train.images.shape == (100, 3, 32, 32)
    assert dataset.train.images.dtype == torch.uint8
    assert dataset.test.labels.tolist()[:3] == [0, 1, 2]
    assert dataset.classes[:2] == ("c0", "c1")
    assert dataset.checksum.startswith("mismatch")
    assert "NOT comparable" in caplog.text
    # Pixel order: the first 1024 bytes of a row are the red plane.
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][0]
    assert torch.equal(dataset.test.images[0, 0].flatten(), torch.from_numpy(raw[:1024]))


def test_official_checksums_are_recognised(tmp_path, monkeypatch):
    folder = write_fake_cifar10(tmp_path)
    real = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    layout = CIFAR["cifar10"]
    patched = type(layout)(**{**layout.__dict__,
                              "train_files": {n: real[n] for n in layout.train_files},
                              "test_files": {n: real[n] for n in layout.test_files},
                              "meta_file": ("batches.meta", real["batches.meta"])})
    monkeypatch.setitem(CIFAR, "cifar10", patched)
    assert load_cifar(tmp_path, "cifar10", download=False).checksum == "official"


def test_missing_cifar_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"missing in .*cifar-10-batches-py.*PIPELINE_DATA_ROOT"):
        load_cifar(tmp_path, "cifar10", download=False)


def test_env_variable_overrides_the_root(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    monkeypatch.setenv("PIPELINE_DATA_ROOT", str(tmp_path))
    dataset = load_dataset(data_config(dataset="cifar10", root="/nonexistent"), seed=0)
    assert len(dataset.train) == 100


def test_synthetic_is_deterministic_and_class_structured():
    a, b = make_synthetic(40, 20, 4, seed=3), make_synthetic(40, 20, 4, seed=3)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)
    # Same-class images are closer to their class mean than to other classes' means.
    images = a.train.images.float()
    means = torch.stack([images[a.train.labels == c].mean(0) for c in range(4)])
    distance = ((images[:, None] - means[None]) ** 2).flatten(2).sum(2)
    assert (distance.argmin(1) == a.train.labels).float().mean() > 0.9


def test_imagefolder_split_and_resize(tmp_path):
    from PIL import Image

    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
    dataset = load_imagefolder(tmp_path, image_size=16, val_fraction=0.25, seed=0)
    assert dataset.classes == ("cats", "dogs")
    assert dataset.train.images.shape == (6, 3, 16, 16)
    assert dataset.test.labels.tolist().count(0) == 1


def test_imagefolder_without_class_folders_is_an_error(tmp_path):
    with pytest.raises(DataError, match="one sub-folder per class"):
        load_imagefolder(tmp_path, 16, 0.25, 0)


def test_balanced_subset_takes_classes_in_turn():
    dataset = make_synthetic(100, 10, 5, seed=0)
    subset = balanced_subset(dataset.train, 25)
    assert subset.labels.bincount().tolist() == [5, 5, 5, 5, 5]


def test_prepared_file_round_trip(tmp_path):
    dataset = make_synthetic(16, 8, 4, seed=0)
    save_prepared(dataset, tmp_path / "d.npz")
    loaded = load_prepared(tmp_path / "d.npz")
    assert torch.equal(loaded.train.images, dataset.train.images)
    assert loaded.classes == dataset.classes and loaded.mean == pytest.approx(dataset.mean)


def test_crop_flip_keeps_pixels_from_the_padded_image():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    for i in range(2):  # every output pixel is zero padding or a pixel of its own image
        assert set(out[i].unique().tolist()) <= set(images[i].unique().tolist()) | {0.0}


def test_loader_is_reproducible_per_epoch_and_normalises():
    dataset = make_synthetic(64, 16, 4, seed=0)
    loader = BatchLoader(dataset.train, 16, dataset.mean, dataset.std, torch.device("cpu"),
                         train=True, seed=1)
    loader.set_epoch(3)
    first = [y for _, y in loader]
    loader.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader], strict=True))
    test = BatchLoader(dataset.test, 16, dataset.mean, dataset.std, torch.device("cpu"),
                       train=False)
    x = torch.cat([x for x, _ in test])
    assert x.mean().abs() < 0.1 and (x.std() - 1).abs() < 0.1


# --- hostile and malformed files ---

class _RunsCode:
    """Pickles as a call of os.system: what a crafted CIFAR batch can carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_batch_that_would_run_code_is_refused_without_running_it(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    marker = tmp_path / "code-ran"
    batch = {b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 20,
             b"batch_label": _RunsCode(marker)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"data_batch_1: cannot read CIFAR batch \(it references "
                                        r"(posix|os)\.system"):
        load_cifar(tmp_path, "cifar10", download=False)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batches_written_at_any_pickle_protocol_load(tmp_path, protocol):
    folder = write_fake_cifar10(tmp_path)
    batch = {b"data": np.full((20, 3072), 7, np.uint8), b"labels": list(range(10)) * 2,
             b"batch_label": b"training batch 1 of 5", b"filenames": [b"a.png"] * 20}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
    dataset = load_cifar(tmp_path, "cifar10", download=False)
    assert dataset.train.images[:20].eq(7).all() and len(dataset.train) == 100


def rewrite_batch(folder, name="data_batch_2", **changes):
    batch = pickle.loads((folder / name).read_bytes())
    batch.update({key.encode(): value for key, value in changes.items()})
    (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize(("changes", "message"), [
    ({"data": np.zeros((20, 3072), np.float32)},
     r"b'data' is float32 \(20, 3072\); expected a uint8 array of shape \(N, 3072\)"),
    ({"data": np.zeros((20, 1024), np.uint8)}, r"b'data' is uint8 \(20, 1024\)"),
    ({"data": np.zeros((0, 3072), np.uint8), "labels": []},
     r"b'data' is uint8 \(0, 3072\).*with N >= 1"),
    ({"data": [1, 2, 3]}, r"b'data' is list"),
    ({"labels": [1] * 19}, r"19 labels for 20 images"),
    ({"labels": [10] * 20}, r"label 10 is outside 0\.\.9 \(10 classes\)"),
    ({"labels": [-1] * 20}, r"label -1 is outside"),
    ({"labels": ["cat"] * 20}, r"b'labels' is not a list of integer labels"),
    ({"labels": np.zeros(20, np.float32)}, r"b'labels' is not a list of integer labels"),
])
def test_batch_content_is_checked_and_the_file_named(tmp_path, changes, message):
    folder = write_fake_cifar10(tmp_path)
    rewrite_batch(folder, **changes)
    with pytest.raises(DataError, match=r"data_batch_2: " + message):
        load_cifar(tmp_path, "cifar10", download=False)


def test_meta_file_must_name_every_class(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 9}))
    with pytest.raises(DataError, match=r"batches.meta: 9 class names; this dataset has 10"):
        load_cifar(tmp_path, "cifar10", download=False)
    (folder / "batches.meta").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match=r"batches.meta: holds a list, expected the dict"):
        load_cifar(tmp_path, "cifar10", download=False)


def image_classes(root, counts: dict[str, int]):
    from PIL import Image

    for name, count in counts.items():
        (root / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")


def test_imagefolder_split_without_training_images_is_a_named_error(tmp_path):
    image_classes(tmp_path, {"cats": 2, "dogs": 10})
    # 90 % of 2 images rounds to 2: no training image of cats would be left.
    with pytest.raises(DataError, match=r"cats: 2 images with data.val_fraction 0.9 leave none "
                                        r"for training"):
        load_imagefolder(tmp_path, image_size=8, val_fraction=0.9, seed=0)


def test_imagefolder_with_one_class_is_a_named_error(tmp_path):
    image_classes(tmp_path, {"cats": 4})
    with pytest.raises(DataError, match=r"one sub-folder per class \(found 1\)"):
        load_imagefolder(tmp_path, image_size=8, val_fraction=0.25, seed=0)


def test_limits_that_leave_one_class_are_refused():
    with pytest.raises(DataError, match=r"the test split holds 1 images of 1 class\(es\).*"
                                        r"data\.test_limit"):
        load_dataset(data_config(test_limit=1), seed=0)
