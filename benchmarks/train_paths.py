"""Training throughput of the stages' real code paths on this machine: today's path vs faster ones.

Three workloads, each run through the project's own training code (`pipeline.training.fit`, the
stages' loaders, loss functions and teacher wrappers), on CIFAR-sized images:

    teacher  ResNet56 trained with cross-entropy              (stage teacher)
    kd       ResNet20 trained by KD from a frozen ResNet56    (student_dense, student_final)
    pdd      gated ResNet20 trained by PDD from the teacher   (student_pruned@pdd)

A path is (autocast precision, memory format, what runs the teacher's forward, and whether the
teacher's logits come from a table). `today` is the code path before the speed work (fp32,
channels_last, teacher in PyTorch eager). A `logit-table` path serves the teacher from the
table the teacher_logits stage would make (pipeline.teacher_cache), built before the timed
epochs over exactly their views (`logit-table` alone: today's teacher, the stages' default;
`onnxruntime-teacher+logit-table`: the table built by ONNX Runtime); its build rate (teacher
forwards per second, paid once per view for all student stages) is recorded apart under
`logit_table_views_per_second`. Each
measurement trains 2 epochs of `--images` images and times the second (the first warms up
oneDNN/ONNX Runtime); repeats cycle through all paths so that machine noise hits them alike.
The result file records medians, ratios to `today`, the samples, the CPU, its ISA flags and
caps, threads and package versions.

    python benchmarks/train_paths.py --out benchmarks/results/train_paths_<host>.json
"""

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline import cpu, provenance
from pipeline.checkpoint import load_model
from pipeline.config import DistillConfig, PddConfig, TrainConfig
from pipeline.data import balanced_subset, load_cifar, make_synthetic
from pipeline.models import build_model
from pipeline.prune.method import PruneJob
from pipeline.prune.pdd import Method as Pdd
from pipeline.students import distillation_loss_fn, freeze_teacher
from pipeline.teacher_cache import CachedTeacher, TableBuilder, table_context, teacher_mode
from pipeline.training import (
    TrainingRun,
    autocast,
    cross_entropy_loss,
    effective_amp,
    fit,
    make_loaders,
    prepare_model,
    training_loader,
)

INPUT_SHAPE = (3, 32, 32)
TODAY = "today"


@dataclass(frozen=True)
class TrainPath:
    """One way to run a training step."""

    name: str
    amp: str  # autocast precision requested (effective_amp decides what runs)
    channels_last: bool
    teacher_runtime: str  # torch | onnxruntime
    logit_table: bool = False  # teacher answered from a table of the measured views


PATHS = (
    TrainPath(TODAY, "off", True, "torch"),
    TrainPath("onnxruntime-teacher", "off", True, "onnxruntime"),
    TrainPath("channels-first", "off", False, "torch"),
    TrainPath("channels-first+onnxruntime-teacher", "off", False, "onnxruntime"),
    TrainPath("bf16", "bf16", True, "torch"),
    TrainPath("bf16+onnxruntime-teacher", "bf16", True, "onnxruntime"),
    TrainPath("logit-table", "off", True, "torch", logit_table=True),  # the stages' default
    TrainPath("onnxruntime-teacher+logit-table", "off", True, "onnxruntime", logit_table=True),
    TrainPath("bf16+logit-table", "bf16", True, "torch", logit_table=True),
)
WORKLOAD_PATHS = {  # the teacher trains alone: its path has no teacher runtime to vary
    "teacher": (TODAY, "channels-first", "bf16"),
    "kd": tuple(p.name for p in PATHS),
    "pdd": (TODAY, "onnxruntime-teacher", "channels-first+onnxruntime-teacher", "bf16",
            "logit-table", "onnxruntime-teacher+logit-table", "bf16+logit-table"),
}


def schedule(batch_size: int, path: TrainPath) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=batch_size, eval_batch_size=500, lr=0.05,
                       momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
                       milestones=(), gamma=0.1, warmup_epochs=0, label_smoothing=0.0,
                       amp=path.amp, channels_last=path.channels_last)


class Bench:
    def __init__(self, dataset, teacher_state: dict | None, batch_size: int, workdir: Path):
        self.dataset, self.batch_size, self.workdir = dataset, batch_size, workdir
        self.device = torch.device("cpu")
        self.teacher_model = build_model({"arch": "resnet56", "num_classes": 10})
        if teacher_state is not None:
            self.teacher_model.load_state_dict(teacher_state)
        self.teachers = {}  # (runtime, channels_last, amp, table) -> FrozenTeacher, built once
        self.table_rates: dict[str, list[float]] = {}  # path -> views/s of its table builds
        self.distill = DistillConfig(student_arch="resnet20", temperature=3.0, alpha=0.6,
                                     teacher_runtime="torch", teacher_cache=False)
        self.count = 0

    def teacher(self, cfg: TrainConfig, path: TrainPath):
        key = (path.teacher_runtime, cfg.channels_last, cfg.amp, path.logit_table)
        if key not in self.teachers:
            live = freeze_teacher(copy.deepcopy(self.teacher_model), self.device, cfg,
                                  path.teacher_runtime, INPUT_SHAPE)
            self.teachers[key] = self._tabled(live, cfg, path) if path.logit_table else live
        return self.teachers[key]

    def _tabled(self, live, cfg: TrainConfig, path: TrainPath) -> CachedTeacher:
        """`live` behind a table of every view the measurement's epochs draw (the same each
        repeat: same seed), as the teacher_logits stage builds it; the build is timed apart."""
        amp = effective_amp(self.device, cfg.amp)
        context = table_context("benchmark", teacher_mode(live.runtime, self.device, amp,
                                                         cfg.channels_last))
        builder = TableBuilder(live, context)
        loader = training_loader(self.dataset, cfg.batch_size, cfg.channels_last, self.device, 0)
        began = time.perf_counter()
        for epoch in range(cfg.epochs):
            loader.set_epoch(epoch)
            builder.add((images for images, _ in loader), lambda: autocast(self.device, amp))
        rate = len(builder.keys) / (time.perf_counter() - began)
        self.table_rates.setdefault(path.name, []).append(round(rate, 1))
        table = builder.table(len(self.dataset.classes))
        return CachedTeacher(live.teacher, live.runtime, table, context, make_live=lambda: live)

    def _fresh_run(self, cfg: TrainConfig):
        """Loaders and a checkpoint path no earlier measurement used (nothing resumes)."""
        self.count += 1
        train, test = make_loaders(self.dataset, cfg, self.device, seed=0)
        return train, test, self.workdir / f"{self.count}.pt"

    def _run(self, cfg: TrainConfig, model, loss_fn, title: str) -> float:
        train, test, checkpoint = self._fresh_run(cfg)
        result = fit(model, TrainingRun(cfg=cfg, train_loader=train, test_loader=test,
                                        loss_fn=loss_fn, checkpoint_path=checkpoint,
                                        fingerprint=checkpoint.stem, title=title))
        checkpoint.unlink()
        return second_epoch_rate(result.history, len(train) * cfg.batch_size)

    def measure(self, workload: str, path: TrainPath) -> float:
        cfg = schedule(self.batch_size, path)
        torch.manual_seed(0)
        if workload == "teacher":
            model = prepare_model(build_model({"arch": "resnet56"}), cfg, self.device)
            return self._run(cfg, model, cross_entropy_loss(), workload)
        teacher = self.teacher(cfg, path)
        student = prepare_model(build_model({"arch": "resnet20"}), cfg, self.device)
        if workload == "kd":
            rate = self._run(cfg, student, distillation_loss_fn(teacher, self.distill, 0.0),
                             workload)
        else:
            rate = self._pdd(cfg, student, teacher)
        if isinstance(teacher, CachedTeacher) and teacher.computed:
            raise RuntimeError(f"{path.name}: the table missed {teacher.computed} views; the "
                               "measurement ran the teacher live")
        return rate

    def _pdd(self, cfg: TrainConfig, student, teacher) -> float:
        train, test, checkpoint = self._fresh_run(cfg)
        job = PruneJob(student=student, teacher=teacher, train=cfg, distill=self.distill,
                       target_macs=None, round_to=1, seed=0, train_loader=train,
                       test_loader=test, example_input=torch.zeros(1, *INPUT_SHAPE),
                       checkpoint=checkpoint, fingerprint=checkpoint.stem, title="pdd")
        outcome = Pdd(PddConfig(gate_lr=0.05, flops_target=0.0, flops_weight=0.0)).prune(job)
        checkpoint.unlink()
        return second_epoch_rate(outcome.result.history, len(train) * cfg.batch_size)


def second_epoch_rate(history: list[dict], images: int) -> float:
    return images / history[1]["seconds"]


def dataset_for(args):
    if args.data_root is None:
        dataset = make_synthetic(args.images, 500, 10, seed=0)
        return dataset, "synthetic CIFAR-shaped images (speed does not depend on content)"
    dataset = load_cifar(args.data_root, "cifar10", download=False)
    dataset = replace(dataset, train=balanced_subset(dataset.train, args.images),
                      test=balanced_subset(dataset.test, 500))
    return dataset, f"CIFAR-10 from {args.data_root}"


def measure_all(bench: Bench, paths: list[TrainPath], workloads: list[str], repeats: int) -> dict:
    samples = {w: {p.name: [] for p in paths if p.name in WORKLOAD_PATHS[w]} for w in workloads}
    for repeat in range(repeats):
        for workload in workloads:
            for path in paths:
                if path.name not in samples[workload]:
                    continue
                rate = bench.measure(workload, path)
                samples[workload][path.name].append(rate)
                print(f"repeat {repeat + 1}/{repeats} {workload:8s} {path.name:26s} "
                      f"{rate:7.1f} images/s", flush=True)
    return samples


def summarise(samples: dict) -> dict:
    summary = {}
    for workload, by_path in samples.items():
        medians = {name: statistics.median(rates) for name, rates in by_path.items()}
        summary[workload] = {name: {"median_images_per_s": round(rate, 1),
                                    "vs_today": round(rate / medians[TODAY], 3)}
                             for name, rate in medians.items()}
    return summary


def runnable_paths() -> tuple[list[TrainPath], dict[str, str]]:
    """Paths that run as named here; bf16 without native instructions would silently be fp32."""
    if cpu.native_bf16():
        return list(PATHS), {}
    skipped = {p.name: "no native bf16 on this CPU (or capped): training would run in fp32"
               for p in PATHS if p.amp == "bf16"}
    return [p for p in PATHS if p.amp != "bf16"], skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, help="CIFAR-10 root; default: synthetic")
    parser.add_argument("--teacher", type=Path, help="a trained teacher (models/teacher.pt) "
                        "for the ONNX Runtime parity check; default: a fresh ResNet56")
    parser.add_argument("--images", type=int, default=2560, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=provenance.usable_cores())
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOAD_PATHS),
                        choices=list(WORKLOAD_PATHS))
    parser.add_argument("--paths", nargs="+", default=[p.name for p in PATHS],
                        choices=[p.name for p in PATHS], help="default: all (today always)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset, data_note = dataset_for(args)
    state = None if args.teacher is None else load_model(args.teacher).model.state_dict()
    paths, skipped = runnable_paths()
    paths = [p for p in paths if p.name in {TODAY, *args.paths}]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        bench = Bench(dataset, state, args.batch_size, Path(workdir))
        samples = measure_all(bench, paths, args.workloads, args.repeats)
    runtime = f"torch {torch.__version__}"
    result = {"provenance": {**provenance.collect(args.threads, runtime), "data": data_note,
                             "teacher": str(args.teacher or "fresh ResNet56 (untrained)"),
                             "settings": {k: str(v) for k, v in vars(args).items()},
                             "wall_seconds": round(time.perf_counter() - began, 1)},
              "paths": {p.name: {"amp": p.amp, "channels_last": p.channels_last,
                                 "teacher_runtime": p.teacher_runtime,
                                 "logit_table": p.logit_table} for p in PATHS},
              "logit_table_views_per_second": bench.table_rates,
              "skipped": skipped, "summary": summarise(samples), "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
