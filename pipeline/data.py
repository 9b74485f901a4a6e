"""Datasets as uint8 tensors in memory, and a batch loader that augments whole batches at once.

Small images (CIFAR: 60k x 3 KB) fit in memory, and on a GPU in device memory, so the per-sample
Python path of a `DataLoader` (PIL decode, transform, collate) is replaced by tensor ops on
whole batches: a random 4-pixel-padded crop, a horizontal flip and per-channel normalisation.
Sources: CIFAR-10/100 (python-pickle layout, md5-checked), `synthetic` (offline, deterministic)
and `imagefolder` (one folder per class).
"""

import hashlib
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig, data_root
from pipeline.errors import DataError
from pipeline.io import atomic_output

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CifarLayout:
    folder: str  # folder inside the root, as extracted from the official archive
    url: str  # official archive
    archive_md5: str
    train_files: dict[str, str]  # file name -> official md5
    test_files: dict[str, str]
    meta_file: tuple[str, str]  # (name, md5)
    label_key: bytes  # key of the labels inside a batch
    names_key: bytes  # key of the class names inside the meta file


CIFAR = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        {"data_batch_1": "c99cafc152244af753f735de768cd75f",
         "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
         "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"},
        {"test_batch": "40351d587109b95175f43aff81a1287e"},
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"), b"labels", b"label_names"),
    "cifar100": CifarLayout(
        "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        {"train": "16019d7e3df5f24257cddd939b257f8d"},
        {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        ("meta", "7973b15100ade9c7d40fb424638fde48"), b"fine_labels", b"fine_label_names"),
}


@dataclass(frozen=True)
class ImageSplit:
    images: torch.Tensor  # uint8, (N, 3, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str  # cifar10 | cifar100 | synthetic | imagefolder
    train: ImageSplit
    test: ImageSplit
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]
    checksum: str  # "official" | "mismatch: <files>" | "not applicable"


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"{path}: cannot read CIFAR batch ({err})") from err


def _read_cifar_split(folder: Path, names: list[str], label_key: bytes) -> ImageSplit:
    images, labels = [], []
    for name in names:
        batch = _unpickle(folder / name)
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"{folder / name}: missing b'data' or {label_key!r}; not a CIFAR batch")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return ImageSplit(torch.from_numpy(np.concatenate(images)),
                      torch.from_numpy(np.concatenate(labels)))


def _verify_checksums(folder: Path, layout: CifarLayout) -> str:
    expected = {**layout.train_files, **layout.test_files, layout.meta_file[0]: layout.meta_file[1]}
    bad = sorted(name for name, md5 in expected.items() if md5sum(folder / name) != md5)
    if not bad:
        return "official"
    log.warning("%s: md5 differs from the official release for %s; results are NOT comparable "
                "to published numbers", folder, ", ".join(bad))
    return "mismatch: " + ",".join(bad)


def _ensure_cifar_files(root: Path, layout: CifarLayout, download: bool) -> Path:
    folder = root / layout.folder
    needed = [*layout.train_files, *layout.test_files, layout.meta_file[0]]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not missing:
        return folder
    if download:
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(layout.url, str(root), md5=layout.archive_md5)
            return folder
        except Exception as err:  # noqa: BLE001 - any network/archive failure ends the same way
            log.warning("download of %s failed: %s", layout.url, err)
    raise DataError(
        f"dataset files missing in {folder}: {', '.join(missing)}. Put the python-pickle CIFAR "
        f"files there (from {layout.url}), or point data.root in params.yaml or the "
        f"PIPELINE_DATA_ROOT environment variable at the folder that holds {layout.folder}/."
    )


def load_cifar(root: Path, name: str, download: bool) -> Dataset:
    layout = CIFAR[name]
    folder = _ensure_cifar_files(root, layout, download)
    checksum = _verify_checksums(folder, layout)
    train = _read_cifar_split(folder, list(layout.train_files), layout.label_key)
    test = _read_cifar_split(folder, list(layout.test_files), layout.label_key)
    meta = _unpickle(folder / layout.meta_file[0])
    classes = tuple(c.decode() for c in meta[layout.names_key])
    mean, std = channel_stats(train.images)
    return Dataset(name, train, test, classes, mean, std, checksum)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    scaled = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(scaled.mean(1).tolist()), tuple(scaled.std(1).tolist())


def make_synthetic(train_count: int, test_count: int, num_classes: int, seed: int) -> Dataset:
    """Class-structured random images: each class is a smooth colour pattern plus noise.

    Learnable within a few steps, so smoke runs show a falling loss; deterministic in `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, 3, 4, 4, generator=generator)
    prototypes = F.interpolate(prototypes, size=(32, 32), mode="bilinear", align_corners=False)

    def split(count: int) -> ImageSplit:
        labels = torch.arange(count) % num_classes
        labels = labels[torch.randperm(count, generator=generator)]
        noise = 0.25 * torch.randn(count, 3, 32, 32, generator=generator)
        images = (prototypes[labels] + noise).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return ImageSplit(images, labels)

    train, test = split(train_count), split(test_count)
    mean, std = channel_stats(train.images)
    classes = tuple(f"class_{i}" for i in range(num_classes))
    return Dataset("synthetic", train, test, classes, mean, std, "not applicable")


def load_imagefolder(root: Path, image_size: int, val_fraction: float, seed: int) -> Dataset:
    """root/<class>/<image>; each class split into train and test by `val_fraction`."""
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(class_dirs) < 2:
        raise DataError(f"{root}: imagefolder needs one sub-folder per class (found "
                        f"{len(class_dirs)}); expected root/<class>/<image files>")
    generator = torch.Generator().manual_seed(seed)
    parts = {"train": ([], []), "test": ([], [])}
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        if len(files) < 2:
            raise DataError(f"{class_dir}: needs at least 2 images (one per split)")
        order = torch.randperm(len(files), generator=generator).tolist()
        test_count = max(1, round(val_fraction * len(files)))
        for rank, index in enumerate(order):
            try:
                with Image.open(files[index]) as image:
                    pixels = np.asarray(image.convert("RGB").resize((image_size, image_size)))
            except (OSError, UnidentifiedImageError) as err:
                raise DataError(f"{files[index]}: not a readable image ({err})") from err
            images, labels = parts["test" if rank < test_count else "train"]
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            labels.append(label)
    train, test = (ImageSplit(torch.stack(parts[s][0]), torch.tensor(parts[s][1]))
                   for s in ("train", "test"))
    mean, std = channel_stats(train.images)
    classes = tuple(d.name for d in class_dirs)
    return Dataset("imagefolder", train, test, classes, mean, std, "not applicable")


def balanced_subset(split: ImageSplit, count: int) -> ImageSplit:
    """The first `count` images taking classes in turn (deterministic, class-balanced)."""
    if count == 0 or count >= len(split):
        return split
    labels = split.labels
    rank_in_class = torch.zeros_like(labels)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        rank_in_class[members] = torch.arange(len(members))
    # Sort by (rank within class, position): class-interleaved order, then keep the first count.
    order = torch.argsort(rank_in_class * len(labels) + torch.arange(len(labels)))
    keep = order[:count].sort().values
    return ImageSplit(split.images[keep], split.labels[keep])


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset named by the config, with train/test limits applied."""
    if cfg.dataset in CIFAR:
        dataset = load_cifar(data_root(cfg), cfg.dataset, cfg.download)
    elif cfg.dataset == "synthetic":
        dataset = make_synthetic(cfg.synthetic_train, cfg.synthetic_test,
                                 cfg.synthetic_classes, seed)
    else:
        dataset = load_imagefolder(data_root(cfg), cfg.image_size, cfg.val_fraction, seed)
    train = balanced_subset(dataset.train, cfg.train_limit)
    test = balanced_subset(dataset.test, cfg.test_limit)
    mean, std = channel_stats(train.images)
    return Dataset(dataset.name, train, test, dataset.classes, mean, std, dataset.checksum)


# --- the prepared file: one npz that every downstream stage reads (a DVC-tracked output) ---

def save_prepared(dataset: Dataset, path: Path) -> None:
    """Write atomically (pipeline.io.atomic_output), so a crash leaves no half file."""
    with atomic_output(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, train_images=dataset.train.images.numpy(),
                 train_labels=dataset.train.labels.numpy(),
                 test_images=dataset.test.images.numpy(), test_labels=dataset.test.labels.numpy(),
                 classes=np.array(dataset.classes), mean=np.array(dataset.mean),
                 std=np.array(dataset.std), name=np.array(dataset.name),
                 checksum=np.array(dataset.checksum))


def load_prepared(path: str | Path) -> Dataset:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read prepared dataset ({err}); run the prepare_data "
                        "stage (`dvc repro prepare_data`)") from err
    split = lambda s: ImageSplit(torch.from_numpy(arrays[f"{s}_images"]),  # noqa: E731
                                 torch.from_numpy(arrays[f"{s}_labels"]))
    return Dataset(str(arrays["name"]), split("train"), split("test"),
                   tuple(str(c) for c in arrays["classes"]), tuple(arrays["mean"].tolist()),
                   tuple(arrays["std"].tolist()), str(arrays["checksum"]))


# --- batches ---

def normalize(images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255).sub_(mean).div_(std)


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch plus a random horizontal flip."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=device)
    rows = (dy + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=device))[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


class BatchLoader:
    """Iterates (normalised float images, labels) batches from an in-memory uint8 split.

    Each epoch's shuffle and augmentation draw from a generator seeded by (seed, epoch), so an
    interrupted run resumed at epoch k sees exactly the batches it would have seen.
    """

    def __init__(self, split: ImageSplit, batch_size: int, mean, std, device: torch.device,
                 train: bool, seed: int = 0, channels_last: bool = False):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.device, self.channels_last = device, channels_last
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.batch_size)
        return full if self.train and full else full + bool(rest)  # train drops a ragged tail

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plain_subset(self, count: int) -> "BatchLoader":
        """`count` of this loader's images (class-balanced, in order), without augmentation:
        e.g. a scoring pass over training images that must not touch the test split."""
        split = balanced_subset(ImageSplit(self.images, self.labels), count)
        return BatchLoader(split, self.batch_size, self.mean.flatten().tolist(),
                           self.std.flatten().tolist(), self.device, train=False,
                           channels_last=self.channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device).manual_seed(
            self.seed * 100_003 + self.epoch)
        count = len(self.labels)
        order = (torch.randperm(count, generator=generator, device=self.device) if self.train
                 else torch.arange(count, device=self.device))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if self.train:
                images = random_crop_flip(images, 4, generator)
            images = normalize(images, self.mean, self.std)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[index]
