"""Training throughput: this project's in-memory tensor data path vs the usual DataLoader path.

Both paths train the same model (ResNet56 by default) with the same batch size, optimizer and
augmentation (4-pixel pad + random crop, horizontal flip, normalisation); only the data path
differs. The usual path is torchvision's CIFAR10 dataset with PIL transforms behind a DataLoader.
Repeats alternate between the two paths so that machine noise hits both alike; the medians and
their ratio are written with the machine and package versions.

    python benchmarks/train_speed.py --data-root ../shared/data --out benchmarks/results/x.json
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

from pipeline.data import BatchLoader, load_cifar
from pipeline.models import build_model


class UncheckedCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10, minus the md5 check (the local copy is rebuilt, see data docs)."""

    def _check_integrity(self) -> bool:
        return True


def dataloader_path(root: Path, batch_size: int, workers: int, mean, std):
    augment = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(mean, std)])
    dataset = UncheckedCIFAR10(str(root), train=True, transform=augment, download=False)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0)


def time_steps(batches, model, optimizer, device, steps: int, train_model: bool) -> float:
    """Images per second over `steps` batches (after one warm-up batch)."""
    iterator = iter(batches)
    count, started = 0, None
    for step in range(steps + 1):
        images, labels = next(iterator)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if train_model:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            started = time.perf_counter()
        else:
            count += len(labels)
    return count / (time.perf_counter() - started)


def measure(args) -> dict:
    device = torch.device(args.device)
    cifar = load_cifar(args.data_root, "cifar10", download=False)
    ours = BatchLoader(cifar.train, args.batch_size, cifar.mean, cifar.std, device, train=True)
    usual = dataloader_path(args.data_root, args.batch_size, args.workers, cifar.mean, cifar.std)
    model = build_model({"arch": args.arch}).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    results = {name: {"train": [], "data_only": []} for name in ("ours", "dataloader")}
    for _ in range(args.repeats):
        for name, batches in (("ours", ours), ("dataloader", usual)):
            for kind in ("data_only", "train"):
                rate = time_steps(batches, model, optimizer, device, args.steps, kind == "train")
                results[name][kind].append(rate)
    summary = {f"{name}_{kind}_median_images_per_s": statistics.median(rates)
               for name, kinds in results.items() for kind, rates in kinds.items()}
    for kind in ("train", "data_only"):
        summary[f"{kind}_speedup_ours_vs_dataloader"] = (
            summary[f"ours_{kind}_median_images_per_s"]
            / summary[f"dataloader_{kind}_median_images_per_s"])
    return {"summary": summary, "samples": results}


def provenance(args) -> dict:
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpu": gpu, "python":
            platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": "JPEG-reconstructed CIFAR-10 copy (md5 mismatch); speed does not depend on it"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args()
    result = {"provenance": provenance(args), **measure(args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
