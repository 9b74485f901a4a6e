"""prepare_data stage: read the configured dataset once, verify it, write one npz for all stages.

Writes data/prepared.npz (uint8 images + labels, class names, mean/std, checksum status) and
metrics/data.json. Downstream stages depend on the npz, so DVC reruns them when the data changes.
"""

import argparse
from pathlib import Path

from pipeline.config import DataConfig, data_root, load_params
from pipeline.data import Dataset, load_dataset, save_prepared
from pipeline.io import write_json
from stages._cli import run_main


def summary(dataset: Dataset, cfg: DataConfig) -> dict:
    return {"dataset": dataset.name, "root": str(data_root(cfg)) if dataset.name != "synthetic"
            else None, "checksum": dataset.checksum, "train_images": len(dataset.train),
            "test_images": len(dataset.test), "classes": list(dataset.classes),
            "mean": list(dataset.mean), "std": list(dataset.std)}


def run(cfg: DataConfig, seed: int, out_path: Path, metrics_path: Path) -> dict:
    dataset = load_dataset(cfg, seed)
    save_prepared(dataset, out_path)
    result = summary(dataset, cfg)
    write_json(metrics_path, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("data/prepared.npz"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/data.json"))
    args = parser.parse_args()

    def body() -> None:
        params = load_params(args.params)
        run(params.data, params.common.seed, args.out, args.metrics)

    run_main(body)


if __name__ == "__main__":
    main()
