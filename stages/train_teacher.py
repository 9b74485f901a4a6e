"""train_teacher stage: train the teacher CNN on the prepared dataset.

Writes models/teacher.pt (spec + weights, loadable with weights_only=True), metrics/teacher.json
and plots/train_teacher.csv (per-epoch curves); keeps checkpoints/train_teacher.pt so that an
interrupted run resumes from its last completed epoch.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import save_model
from pipeline.config import Params, as_dict, load_params
from pipeline.data import load_prepared
from pipeline.flops import model_cost
from pipeline.io import (
    file_sha256,
    fingerprint,
    seed_everything,
    set_threads,
    write_csv,
    write_json,
)
from pipeline.models import build_model
from pipeline.training import (
    TrainingRun,
    cross_entropy_loss,
    fit,
    make_loaders,
    prepare_model,
    resolve_device,
)
from stages._cli import run_main


@dataclass(frozen=True)
class Paths:
    dataset: Path = Path("data/prepared.npz")
    model: Path = Path("models/teacher.pt")
    metrics: Path = Path("metrics/teacher.json")
    plots: Path = Path("plots/train_teacher.csv")
    checkpoint: Path = Path("checkpoints/train_teacher.pt")


def run(params: Params, paths: Paths) -> dict:
    cfg, common = params.train_teacher, params.common
    seed_everything(common.seed)
    set_threads(common.threads)
    device = resolve_device(common.device)
    dataset = load_prepared(paths.dataset)
    spec = {"arch": cfg.arch, "num_classes": len(dataset.classes)}
    model = build_model(spec)
    cost = model_cost(model, tuple(dataset.train.images.shape[1:]))
    model = prepare_model(model, cfg, device)
    train_loader, test_loader = make_loaders(dataset, cfg, device, common.seed)
    run_cfg = TrainingRun(
        cfg=cfg, train_loader=train_loader, test_loader=test_loader,
        loss_fn=cross_entropy_loss(cfg.label_smoothing), checkpoint_path=paths.checkpoint,
        fingerprint=fingerprint(as_dict(cfg), spec, common.seed, file_sha256(paths.dataset)),
        title="teacher")
    result = fit(model, run_cfg)
    top1 = result.history[-1]["test_top1"]
    metrics = {"top1": top1, "params": cost.params, "macs": cost.macs, "epochs": cfg.epochs,
               "train_seconds": round(result.train_seconds, 2),
               "images_per_second": round(result.images_per_second, 1), "device": str(device),
               "amp": result.amp, "arch": cfg.arch, "dataset": dataset.name,
               "data_checksum": dataset.checksum, "test_images": len(dataset.test),
               "train_images": len(dataset.train), "profile": params.profile}
    meta = {"classes": list(dataset.classes), "mean": list(dataset.mean),
            "std": list(dataset.std), "input_shape": list(dataset.train.images.shape[1:]),
            "dataset": dataset.name, **{k: metrics[k] for k in ("top1", "params", "macs")}}
    save_model(paths.model, model, spec, meta)
    write_csv(paths.plots, result.history)
    write_json(paths.metrics, metrics)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    run_main(lambda: run(load_params(args.params), Paths()))


if __name__ == "__main__":
    main()
