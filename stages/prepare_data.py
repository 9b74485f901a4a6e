"""prepare_data stage: read the configured dataset once, verify it, write one npz for all stages.

Writes data/prepared.npz (uint8 images + labels, class names, mean/std, checksum status) and
metrics/prepare_data.json. Downstream stages depend on the npz, so DVC reruns them when the
data changes.
"""

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig, RunConfig, data_root
from pipeline.data import Dataset, load_dataset, save_prepared
from pipeline.io import write_json
from stages._cli import stage_main


@dataclass(frozen=True)
class Settings:
    common: RunConfig
    data: DataConfig


@dataclass(frozen=True)
class Paths:
    dataset: Path = Path("data/prepared.npz")
    metrics: Path = Path("metrics/prepare_data.json")


def summary(dataset: Dataset, cfg: DataConfig) -> dict:
    return {"dataset": dataset.name, "root": str(data_root(cfg)) if dataset.name != "synthetic"
            else None, "checksum": dataset.checksum, "train_images": len(dataset.train),
            "test_images": len(dataset.test), "classes": list(dataset.classes),
            "mean": list(dataset.mean), "std": list(dataset.std)}


def run(settings: Settings, paths: Paths) -> dict:
    dataset = load_dataset(settings.data, settings.common.seed)
    save_prepared(dataset, paths.dataset)
    result = summary(dataset, settings.data)
    write_json(paths.metrics, result)
    return result


def main() -> None:
    stage_main(__doc__, run, Settings, Paths())


if __name__ == "__main__":
    main()
