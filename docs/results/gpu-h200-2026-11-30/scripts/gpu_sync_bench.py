"""CUDA training throughput through pipeline.training.fit: run with PYTHONPATH at one code version.
Prints one JSON line per (workload, amp): images/s of epochs 2 and 3 (epoch 1 warms up)."""
import json, os, sys, tempfile, time
from pathlib import Path
import torch
from pipeline.config import DistillConfig, TrainConfig
from pipeline.data import make_synthetic
from pipeline.distill import FrozenTeacher
from pipeline.models import build_model
from pipeline.students import distillation_loss_fn
from pipeline.training import TrainingRun, cross_entropy_loss, fit, make_loaders, prepare_model
device = torch.device(os.environ.get("DEV", "cuda"))
N = int(os.environ.get("N", 12800))
data = make_synthetic(N, 1000, 10, seed=0)
distill = DistillConfig(student_arch="resnet20", temperature=3.0, alpha=0.6, teacher_runtime="torch")
def cfg(amp):
    return TrainConfig(epochs=3, batch_size=128, eval_batch_size=500, lr=0.05, momentum=0.9, nesterov=True,
                       weight_decay=5e-4, schedule="cosine", milestones=(), gamma=0.1, warmup_epochs=0,
                       label_smoothing=0.0, amp=amp, channels_last=True)
for workload in ("teacher", "kd"):
    for amp in ("off", "bf16"):
        c = cfg(amp); torch.manual_seed(0)
        train, test = make_loaders(data, c, device, seed=0)
        if workload == "teacher":
            model, loss = prepare_model(build_model({"arch": "resnet56"}), c, device), cross_entropy_loss()
        else:
            t = build_model({"arch": "resnet56"}).to(device).eval().to(memory_format=torch.channels_last)
            model, loss = prepare_model(build_model({"arch": "resnet20"}), c, device), distillation_loss_fn(FrozenTeacher(t), distill, 0.0)
        with tempfile.TemporaryDirectory() as d:
            r = fit(model, TrainingRun(cfg=c, train_loader=train, test_loader=test, loss_fn=loss,
                                       checkpoint_path=Path(d) / "c.pt", fingerprint="x", title=workload))
        images = len(train) * 128
        rates = [images / row["seconds"] for row in r.history[1:]]
        print(json.dumps({"code": os.environ.get("CODE"), "workload": workload, "amp": r.amp,
                          "images_per_s": [round(x) for x in rates],
                          "train_loss": [row["train_loss"] for row in r.history]}), flush=True)
