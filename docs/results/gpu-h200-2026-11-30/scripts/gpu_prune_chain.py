"""Second CUDA device check: the whole training chain through the stages' own run() functions.

Usage (cwd: an empty scratch folder; PYTHONPATH: the committed snapshot + carried wheels):
    python3 gpu_prune_chain.py OUT_DIR

One work folder, as DVC lays it out (data/, models/, metrics/, plots/, checkpoints/):
  teacher (amp auto) -> student_dense (amp auto, teacher_runtime auto)
  -> for pdd and netslim: student_pruned -> student_slim -> student_final
Data: pipeline.data.make_synthetic (CIFAR-shaped, not CIFAR-10; top-1 means nothing).
Every stage's failure is recorded with its traceback and the chain goes on where it can.
Writes OUT_DIR/gpu_chain_results.json.
Env: GPU_CHECK_DEVICE (cuda), GPU_CHECK_TRAIN/TEST (images), GPU_CHECK_BATCH, GPU_CHECK_TEACHER
(arch), GPU_CHECK_AMP / GPU_CHECK_RUNTIME (auto / auto) - the non-default values are only for a
CPU dry run of this script.
"""

import csv
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from pipeline.config import (
    DistillConfig,
    DistributedConfig,
    MethodBudget,
    NetslimConfig,
    PddConfig,
    RunConfig,
    SlimConfig,
    TeacherConfig,
    TrainConfig,
)
from pipeline.data import make_synthetic, save_prepared

OUT = Path(sys.argv[1]).resolve()
ROOT = Path.cwd().resolve()
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
TRAIN_IMAGES = int(os.environ.get("GPU_CHECK_TRAIN", 5120))
TEST_IMAGES = int(os.environ.get("GPU_CHECK_TEST", 1000))
BATCH = int(os.environ.get("GPU_CHECK_BATCH", 128))
TEACHER_ARCH = os.environ.get("GPU_CHECK_TEACHER", "resnet56")
AMP = os.environ.get("GPU_CHECK_AMP", "auto")
RUNTIME = os.environ.get("GPU_CHECK_RUNTIME", "auto")
METHODS = ("pdd", "netslim")
results: dict = {"conditions": {}, "stages": {}, "errors": {}}


def dump() -> None:
    (OUT / "gpu_chain_results.json").write_text(json.dumps(results, indent=1, default=str))


def common() -> RunConfig:
    return RunConfig(seed=0, device=DEVICE, threads=0 if CUDA else 1, profile="quick",
                     distributed=DistributedConfig(nproc_per_node=1, nnodes=1, rdzv_endpoint="",
                                                   sync_batchnorm=True, max_restarts=0,
                                                   timeout_s=600))


def schedule(epochs: int, lr: float, warmup: int) -> dict:
    return dict(epochs=epochs, batch_size=BATCH, eval_batch_size=500, lr=lr, momentum=0.9,
                nesterov=True, weight_decay=5.0e-4, schedule="cosine", milestones=(), gamma=0.1,
                warmup_epochs=warmup, label_smoothing=0.0, amp=AMP, channels_last=True)


def epoch_rates(stage: str) -> list[float] | None:
    """Training images/s per epoch from the stage's own curve (plots/<stage>.csv)."""
    file = ROOT / "plots" / f"{stage}.csv"
    if not file.is_file():
        return None
    images = (TRAIN_IMAGES // BATCH) * BATCH
    with file.open() as handle:
        return [round(images / float(row["seconds"]), 1) for row in csv.DictReader(handle)]


KEEP = ("amp", "teacher_runtime", "top1", "top1_trained", "top1_before_finetune", "epochs",
        "train_seconds", "images_per_second", "device", "processes", "method", "arch",
        "params", "macs", "params_before", "params_after", "macs_before", "macs_after",
        "decision", "max_abs_diff", "rel_diff", "check_images", "round_to", "widths",
        "recovery_teacher", "sparsity", "structured", "target_macs")


def stage(name: str, plot: str | None, body) -> dict | None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    print(f"=== stage {name}", flush=True)
    try:
        metrics = body()
        entry = {"status": "ok", "wall_s": round(time.perf_counter() - began, 2),
                 "peak_gpu_mib": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                  if CUDA else None),
                 "epoch_images_per_s": epoch_rates(plot) if plot else None,
                 "metrics": {k: metrics[k] for k in KEEP if k in metrics}}
        if "alternatives" in metrics:
            entry["metrics"]["alternatives"] = {
                k: {kk: v.get(kk) for kk in ("top1", "macs_after", "params_after")}
                for k, v in metrics["alternatives"].items()}
        results["stages"][name] = entry
        m = entry["metrics"]
        print(f"[ok] {name}: {entry['wall_s']} s, amp {m.get('amp')}, teacher_runtime "
              f"{m.get('teacher_runtime')}, top1 {m.get('top1')}, img/s "
              f"{m.get('images_per_second')} (per epoch {entry['epoch_images_per_s']}), "
              f"rel_diff {m.get('rel_diff')}, macs {m.get('macs_before')}->{m.get('macs_after')}",
              flush=True)
        return metrics
    except BaseException as err:  # noqa: BLE001 - record it, go on with what does not depend on it
        results["stages"][name] = {"status": "failed", "wall_s": round(time.perf_counter() - began,
                                                                      2),
                                   "error": f"{type(err).__name__}: {err}"}
        results["errors"][name] = traceback.format_exc()
        print(f"[FAILED] {name}\n{traceback.format_exc()}", flush=True)
        if isinstance(err, KeyboardInterrupt):
            raise
        return None
    finally:
        dump()


def tf32_diagnosis(method: str) -> None:
    """Gated vs slimmed logits on 256 test images with cuDNN TF32 on and off (CUDA only):
    how much of the slim exactness gap is TF32 rounding."""
    if not CUDA:
        return
    try:
        from types import SimpleNamespace

        from pipeline.data import load_prepared
        from pipeline.prune.slimming import exactness, slim
        from pipeline.students import load_gated
        from stages.student_slim import check_images

        device = torch.device("cuda")
        gated, _, _ = load_gated(Path(f"models/student_pruned_{method}.pt"), device)
        slimmed, _ = slim(gated, 8, verify=False)
        ctx = SimpleNamespace(dataset=load_prepared(ROOT / "data" / "prepared.npz"),
                              device=device)
        images = check_images(ctx, 256)
        row = {}
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            with torch.no_grad():
                row[f"tf32_{'on' if tf32 else 'off'}"] = exactness(gated, slimmed, images)
        torch.backends.cudnn.allow_tf32 = True
        results.setdefault("tf32_diagnosis", {})[method] = row
        print(f"[diag] {method}: gated vs slimmed (max_abs, relative): {row}", flush=True)
    except Exception:  # noqa: BLE001
        torch.backends.cudnn.allow_tf32 = True
        results["errors"][f"tf32_diagnosis {method}"] = traceback.format_exc()
        print(f"[diag] {method} FAILED\n{traceback.format_exc()}", flush=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results["conditions"] = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0) if CUDA else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if CUDA else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "data": f"pipeline.data.make_synthetic({TRAIN_IMAGES}, {TEST_IMAGES}, 10, seed=0) "
                "(CIFAR-shaped, NOT CIFAR-10: top-1 means nothing)",
        "batch": BATCH, "amp_requested": AMP, "teacher_runtime_requested": RUNTIME,
        "methods": METHODS,
    }
    (ROOT / "data").mkdir(exist_ok=True)
    save_prepared(make_synthetic(TRAIN_IMAGES, TEST_IMAGES, 10, seed=0),
                  ROOT / "data" / "prepared.npz")

    import stages.student_dense as dense_stage
    import stages.student_final as final_stage
    import stages.student_pruned as pruned_stage
    import stages.student_slim as slim_stage
    import stages.teacher as teacher_stage
    from stages._common import TrainingPaths

    distill = DistillConfig(student_arch="resnet20", temperature=3.0, alpha=0.6,
                            teacher_runtime=RUNTIME)
    teacher_cfg = TeacherConfig(arch=TEACHER_ARCH, **schedule(2, 0.1, 1))
    stage("teacher", "teacher", lambda: teacher_stage.run(
        teacher_stage.Settings(common(), teacher_cfg), TrainingPaths("teacher")))
    if not (ROOT / "models" / "teacher.pt").is_file():
        return
    # student_dense's epochs = student_pruned's + student_final's, as params.yaml requires
    stage("student_dense", "student_dense", lambda: dense_stage.run(
        dense_stage.Settings(common(), distill, TrainConfig(**schedule(3, 0.05, 1))),
        TrainingPaths("student_dense")))

    budget = MethodBudget(target_macs=0.5, round_to=8)
    own = {"pdd": PddConfig(gate_lr=0.05, flops_target=0.0, flops_weight=0.0),
           "netslim": NetslimConfig(l1=1.0e-5, percent=0.4, normalize="none")}
    pruned_settings = pruned_stage.Settings(common(), distill, TrainConfig(**schedule(2, 0.05, 1)))
    slim_settings = slim_stage.Settings(common(), SlimConfig(round_to=8, check_images=256,
                                                             tolerance=1.0e-4))
    final_settings = final_stage.Settings(common(), distill, TrainConfig(**schedule(1, 0.02, 0)))
    for method in METHODS:
        settings = pruned_stage.MethodSettings(method, budget, own[method])
        pruned_paths = pruned_stage.paths_for(method)
        if stage(f"student_pruned@{method}", pruned_paths.stage, lambda: pruned_stage.run(
                pruned_settings, settings, pruned_paths)) is None:
            continue
        slimmed = stage(f"student_slim@{method}", None, lambda: slim_stage.run(
            slim_settings, slim_stage.Paths.for_method(method)))
        tf32_diagnosis(method)
        if slimmed is None and CUDA and torch.backends.cudnn.allow_tf32:
            # diagnosis: the same stage with cuDNN TF32 off (fp32 convolutions), so that the
            # chain can go on to student_final
            torch.backends.cudnn.allow_tf32 = False
            try:
                slimmed = stage(f"student_slim@{method} (cudnn.allow_tf32=False)", None,
                                lambda: slim_stage.run(slim_settings,
                                                       slim_stage.Paths.for_method(method)))
            finally:
                torch.backends.cudnn.allow_tf32 = True
        if slimmed is None:
            continue
        final_paths = final_stage.paths_for(method)
        stage(f"student_final@{method}", final_paths.stage, lambda: final_stage.run(
            final_settings, method, final_paths))
    results["files"] = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file())
    dump()


if __name__ == "__main__":
    main()
