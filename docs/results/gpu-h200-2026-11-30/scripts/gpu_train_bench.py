"""First CUDA run of the project's own training and benchmark code (device check, not shipped).

Usage (cwd: a scratch folder; PYTHONPATH: the committed snapshot + carried wheels):
    python3 gpu_train_bench.py OUT_DIR

1. CIFAR-shaped synthetic data (pipeline.data.make_synthetic, 32x32x3, 10 classes), saved as
   data/prepared.npz exactly as the prepare_data stage writes it.
2. stages.teacher.run (ResNet56) and stages.student_dense.run (ResNet20, KD from the amp-off
   teacher) on CUDA, each with amp off / bf16 / fp16 (channels_last as params.yaml: true), plus
   the teacher with channels_last false; every variant in its own folder; failures recorded.
3. stages.benchmark.run (-> targets.measure) for torch-cuda and torch-cuda-graphs on the
   amp-off teacher and student, batch 1, 64 and 256, params.yaml's timing plan.
Writes OUT_DIR/gpu_results.json and OUT_DIR/benchmark_<target>.json.
"""

import csv
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from pipeline.config import (
    BenchmarkConfig,
    DistillConfig,
    DistributedConfig,
    RunConfig,
    TeacherConfig,
    TimingPlan,
    TrainConfig,
)
from pipeline.data import make_synthetic, save_prepared

OUT = Path(sys.argv[1]).resolve()
ROOT = Path.cwd().resolve()
TRAIN_IMAGES = int(os.environ.get("GPU_CHECK_TRAIN", 12800))  # small values: a CPU dry run
TEST_IMAGES = int(os.environ.get("GPU_CHECK_TEST", 2000))
EPOCHS, BATCH = 3, 128
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
results: dict = {"conditions": {}, "training": {}, "benchmark": {}, "errors": {}}


def dump() -> None:
    (OUT / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))


def common() -> RunConfig:
    return RunConfig(seed=0, device=DEVICE, threads=0 if CUDA else 1, profile="quick",
                     distributed=DistributedConfig(nproc_per_node=1, nnodes=1, rdzv_endpoint="",
                                                   sync_batchnorm=True, max_restarts=0,
                                                   timeout_s=600))


def schedule(amp: str, channels_last: bool, lr: float) -> dict:
    return dict(epochs=EPOCHS, batch_size=BATCH, eval_batch_size=500, lr=lr, momentum=0.9,
                nesterov=True, weight_decay=5.0e-4, schedule="cosine", milestones=(), gamma=0.1,
                warmup_epochs=1, label_smoothing=0.0, amp=amp, channels_last=channels_last)


def epoch_rates(folder: Path, stage: str) -> list[float]:
    """Training images/s of each epoch, from the stage's own per-epoch curve (plots/<stage>.csv)."""
    steps = TRAIN_IMAGES // BATCH
    with (folder / "plots" / f"{stage}.csv").open() as handle:
        return [round(steps * BATCH / float(row["seconds"]), 1) for row in csv.DictReader(handle)]


def variant(name: str, stage: str, body) -> None:
    folder = ROOT / name
    (folder / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "prepared.npz", folder / "data" / "prepared.npz")
    os.chdir(folder)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    try:
        metrics = body()
        rates = epoch_rates(folder, stage)
        results["training"][name] = {
            "status": "ok", "wall_s": round(time.perf_counter() - began, 2),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if CUDA else None,
            "epoch_images_per_s": rates,
            "steady_images_per_s": round(sum(rates[1:]) / len(rates[1:]), 1),
            "metrics": metrics}
        print(f"[train] {name}: ok, per-epoch images/s {rates}, top1 {metrics['top1']:.3f}, "
              f"amp {metrics['amp']}", flush=True)
    except Exception as err:  # noqa: BLE001 - record and go on with the other variants
        results["training"][name] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        results["errors"][name] = traceback.format_exc()
        print(f"[train] {name}: FAILED\n{traceback.format_exc()}", flush=True)
    finally:
        os.chdir(ROOT)
        dump()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results["conditions"] = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0) if CUDA else None,
        "capability": torch.cuda.get_device_capability(0) if CUDA else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "data": f"pipeline.data.make_synthetic({TRAIN_IMAGES}, {TEST_IMAGES}, 10, seed=0): "
                "CIFAR-shaped 3x32x32 uint8, 10 classes (not CIFAR-10)",
        "schedule": f"{EPOCHS} epochs, batch {BATCH}, SGD nesterov, cosine, 1 warm-up epoch; "
                    "images/s per epoch = training-loop images / the epoch's training seconds "
                    "(plots/<stage>.csv), evaluation excluded; epoch 1 includes CUDA/cuDNN "
                    "warm-up, steady = mean of epochs 2..",
    }
    save_prepared(make_synthetic(TRAIN_IMAGES, TEST_IMAGES, 10, seed=0), ROOT / "prepared.npz")

    import stages.student_dense as dense_stage
    import stages.teacher as teacher_stage
    from stages._common import TrainingPaths

    def teacher(amp: str, channels_last: bool):
        cfg = TeacherConfig(arch="resnet56", **schedule(amp, channels_last, 0.1))
        return lambda: teacher_stage.run(teacher_stage.Settings(common(), cfg),
                                         TrainingPaths("teacher"))

    for amp in ("off", "bf16", "fp16"):
        variant(f"teacher_{amp}", "teacher", teacher(amp, True))
    variant("teacher_off_nchw", "teacher", teacher("off", False))

    teacher_file = ROOT / "teacher_off" / "models" / "teacher.pt"
    if teacher_file.is_file():
        def student(amp: str):
            cfg = TrainConfig(**schedule(amp, True, 0.05))
            distill = DistillConfig(student_arch="resnet20", temperature=3.0, alpha=0.6)
            return lambda: dense_stage.run(dense_stage.Settings(common(), distill, cfg),
                                           TrainingPaths("student_dense", teacher=teacher_file))
        for amp in ("off", "bf16", "fp16"):
            variant(f"student_dense_{amp}", "student_dense", student(amp))

    # ---- benchmark stage on the GPU targets (stages.benchmark.run -> targets.measure)
    from stages.benchmark import BenchPaths
    from stages.benchmark import run as bench_run
    from targets.registry import make_target
    from targets.torch_eager import TorchSettings

    bench = ROOT / "bench"
    (bench / "models").mkdir(parents=True, exist_ok=True)
    (bench / "data").mkdir(exist_ok=True)
    shutil.copy(ROOT / "prepared.npz", bench / "data" / "prepared.npz")
    for model, source in (("teacher", "teacher_off"), ("student_dense", "student_dense_off")):
        file = ROOT / source / "models" / f"{model}.pt"
        if file.is_file():
            shutil.copy(file, bench / "models" / f"{model}.pt")
        else:  # training failed: a randomly initialised model is as good for latency
            from pipeline.checkpoint import save_model
            from pipeline.data import load_prepared
            from pipeline.models import build_model
            data = load_prepared(bench / "data" / "prepared.npz")
            arch = "resnet56" if model == "teacher" else "resnet20"
            spec = {"arch": arch, "num_classes": 10}
            save_model(bench / "models" / f"{model}.pt", build_model(spec).eval(), spec,
                       {"classes": list(data.classes), "mean": list(data.mean),
                        "std": list(data.std), "input_shape": [3, 32, 32], "top1": 0.0,
                        "random_init": True})
            results["benchmark"][f"{model}_random_init"] = True
    os.chdir(bench)
    timing = TimingPlan(warmup_iters=10, warmup_seconds=0.5, min_iters=20, min_seconds=1.0)
    for name in ("torch-cuda", "torch-cuda-graphs"):
        began = time.perf_counter()
        try:
            cfg = BenchmarkConfig(targets={name: ("fp32",)}, models=("teacher", "student_dense"),
                                  batch_sizes=(1, 64, 256), eval_images=TEST_IMAGES, timing=timing)
            rows = bench_run(cfg, make_target(name, TorchSettings(threads=2)),
                             BenchPaths.for_target(name))
            shutil.copy(bench / "metrics" / f"benchmark_{name}.json",
                        OUT / f"benchmark_{name}.json")
            results["benchmark"][name] = [
                {k: r.get(k) for k in ("model", "batch_size", "status", "reason", "p50_ms",
                                       "p90_ms", "p99_ms", "n", "images_per_s", "h2d_p50_ms",
                                       "compute_p50_ms", "d2h_p50_ms", "top1", "agreement",
                                       "clock")} for r in rows]
            for r in rows:
                print(f"[bench] {name} {r['model']} b{r['batch_size']}: {r['status']} "
                      f"p50 {r.get('p50_ms')} ms, compute {r.get('compute_p50_ms')} ms, "
                      f"{r.get('images_per_s')} img/s, agreement {r.get('agreement')} "
                      f"{r.get('reason') or ''}", flush=True)
        except Exception as err:  # noqa: BLE001
            results["benchmark"][name] = {"status": "failed",
                                          "error": f"{type(err).__name__}: {err}"}
            results["errors"][f"bench_{name}"] = traceback.format_exc()
            print(f"[bench] {name}: FAILED\n{traceback.format_exc()}", flush=True)
        results["benchmark"][f"{name}_wall_s"] = round(time.perf_counter() - began, 1)
        dump()
    os.chdir(ROOT)
    dump()


if __name__ == "__main__":
    main()
