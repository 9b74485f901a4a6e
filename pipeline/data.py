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
from pipeline.errors import ConfigError, DataError
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
    num_classes: int


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
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"), b"labels", b"label_names", 10),
    "cifar100": CifarLayout(
        "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        {"train": "16019d7e3df5f24257cddd939b257f8d"},
        {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        ("meta", "7973b15100ade9c7d40fb424638fde48"), b"fine_labels", b"fine_label_names", 100),
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


# The globals the official CIFAR pickles (Python 2, numpy) and numpy-written copies of them
# reference: numpy array reconstruction only. Anything else - os.system, builtins.eval, any
# class with a __reduce__ - would run code while loading, so it is refused.
CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
})


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, str, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"it references {module}.{name}; a CIFAR batch holds only dicts, lists, bytes, "
                "numbers and numpy arrays, so nothing else is loaded (it could run code)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids, which a CIFAR batch never has")


def _unpickle(path: Path) -> dict:
    """A CIFAR pickle, read with an unpickler that can only build plain data and arrays."""
    try:
        with path.open("rb") as handle:
            content = _CifarUnpickler(handle, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(f"{path}: cannot read CIFAR batch ({err})") from err
    if not isinstance(content, dict):
        raise DataError(f"{path}: holds a {type(content).__name__}, expected the dict of a "
                        "CIFAR batch")
    return content


def _integer_labels(labels: object) -> bool:
    if isinstance(labels, list):
        return all(type(label) is int for label in labels)  # bool is not a label
    return (isinstance(labels, np.ndarray) and labels.ndim == 1
            and np.issubdtype(labels.dtype, np.integer))


def _batch_arrays(path: Path, batch: dict, label_key: bytes,
                  num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images (N, 3, 32, 32) uint8 and labels (N,) int64, after checking both."""
    if b"data" not in batch or label_key not in batch:
        raise DataError(f"{path}: missing b'data' or {label_key!r}; not a CIFAR batch")
    data, labels = batch[b"data"], batch[label_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32 and len(data) > 0):
        shown = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
                 else type(data).__name__)
        raise DataError(f"{path}: b'data' is {shown}; expected a uint8 array of shape "
                        f"(N, 3072) with N >= 1 (32x32 RGB images, one per row)")
    if not _integer_labels(labels):
        raise DataError(f"{path}: {label_key!r} is not a list of integer labels")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images; expected one "
                        "label per image")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise DataError(f"{path}: label {int(outside[0])} is outside 0..{num_classes - 1} "
                        f"({num_classes} classes)")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_split(folder: Path, names: list[str], label_key: bytes,
                      num_classes: int) -> ImageSplit:
    images, labels = [], []
    for name in names:
        batch_images, batch_labels = _batch_arrays(folder / name, _unpickle(folder / name),
                                                   label_key, num_classes)
        images.append(batch_images)
        labels.append(batch_labels)
    return ImageSplit(torch.from_numpy(np.concatenate(images)),
                      torch.from_numpy(np.concatenate(labels)))


def _class_names(path: Path, meta: dict, names_key: bytes, expected: int) -> tuple[str, ...]:
    names = meta.get(names_key)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{path}: {names_key!r} is not a list of class names")
    if len(names) != expected:
        raise DataError(f"{path}: {len(names)} class names; this dataset has {expected}")
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


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
    meta_path = folder / layout.meta_file[0]
    classes = _class_names(meta_path, _unpickle(meta_path), layout.names_key, layout.num_classes)
    train = _read_cifar_split(folder, list(layout.train_files), layout.label_key, len(classes))
    test = _read_cifar_split(folder, list(layout.test_files), layout.label_key, len(classes))
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
        if test_count >= len(files):
            raise DataError(f"{class_dir}: {len(files)} images with data.val_fraction "
                            f"{val_fraction} leave none for training; every class needs images "
                            "in both splits (add images or lower data.val_fraction)")
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


def check_split(split: ImageSplit, name: str, limit_key: str) -> None:
    """A split must hold images of at least two classes: one class trains and measures nothing."""
    classes = split.labels.unique().numel()
    if classes < 2:
        raise DataError(f"the {name} split holds {len(split)} images of {classes} class(es); "
                        f"expected images of at least 2 classes (check the dataset and "
                        f"{limit_key} in params.yaml)")


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
    check_split(train, "training", "data.train_limit")
    check_split(test, "test", "data.test_limit")
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


def draw_crop_flip(count: int, pad: int, generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random numbers of `random_crop_flip` for `count` images: (dy, dx, flip)."""
    dy = torch.randint(0, 2 * pad + 1, (count, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (count, 1), generator=generator, device=device)
    flip = torch.rand(count, generator=generator, device=device) < 0.5
    return dy, dx, flip


def apply_crop_flip(images: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor,
                    flip: torch.Tensor) -> torch.Tensor:
    """Crop image i of the zero-padded batch at (dy[i], dx[i]) and mirror it where flip[i]."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (dy + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=device))[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch plus a random horizontal flip."""
    dy, dx, flip = draw_crop_flip(len(images), pad, generator, images.device)
    return apply_crop_flip(images, pad, dy, dx, flip)


class BatchLoader:
    """Iterates (normalised float images, labels) batches from an in-memory uint8 split.

    Each epoch's shuffle and augmentation draw from a generator seeded by (seed, epoch), so an
    interrupted run resumed at epoch k sees exactly the batches it would have seen.

    Data-parallel training (`rank` of `world` processes, pipeline.distributed): every process
    holds the whole split and draws the same shuffle and the same crop/flip numbers for the
    whole global batch of `batch_size` images, then keeps its own contiguous slice of
    batch_size / world images. The slices of all processes are exactly the single-process
    batch, and every process runs the same number of steps. A test loader gives each process
    whole batches in turn (rank, rank + world, ...): their union is the test set, once.
    """

    def __init__(self, split: ImageSplit, batch_size: int, mean, std, device: torch.device,
                 train: bool, seed: int = 0, channels_last: bool = False, rank: int = 0,
                 world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} processes")
        if train and batch_size % world:
            raise ConfigError(f"batch_size={batch_size} does not split evenly over {world} "
                              "processes (common.distributed: nnodes x nproc_per_node); use a "
                              f"multiple of {world}")
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.device, self.channels_last = device, channels_last
        self.rank, self.world = rank, world
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.epoch = 0

    def _global_batches(self) -> int:
        full, rest = divmod(len(self.labels), self.batch_size)
        return full if self.train and full else full + bool(rest)  # train drops a ragged tail

    def __len__(self) -> int:
        """Batches this process yields: every step of an epoch (training), or its test batches."""
        if self.train:
            return self._global_batches()
        return len(range(self.rank, self._global_batches(), self.world))

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
        batches = range(self._global_batches()) if self.train else \
            range(self.rank, self._global_batches(), self.world)
        share = self.batch_size // self.world
        mine = slice(self.rank * share, (self.rank + 1) * share)
        for batch in batches:
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            if self.train:
                # The whole global batch's numbers, in the single-process order, then our slice.
                dy, dx, flip = draw_crop_flip(len(index), 4, generator, self.device)
                index = index[mine]
                images = apply_crop_flip(self.images[index], 4, dy[mine], dx[mine], flip[mine])
            else:
                images = self.images[index]
            images = normalize(images, self.mean, self.std)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[index]
