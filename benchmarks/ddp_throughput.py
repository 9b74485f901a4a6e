"""Data-parallel training throughput: images per second for 1 and N processes.

Each configuration trains a fresh model through the project's own path - `pipeline.training.fit`
with the sharded in-memory loaders, DDP and synchronised BatchNorm (pipeline.distributed) - in
its own process(es): one plain process, or N processes started by torchrun, exactly as a
training stage runs them. The rate is the global images per second of the training epochs after
the first (which includes warm-up); evaluation is not timed. Repeats alternate between the
configurations so that machine noise hits all alike; the result file holds every sample, the
medians, the machine, the package versions and the load average around the run.

    python benchmarks/ddp_throughput.py --out benchmarks/results/ddp_throughput_cpu.json
    python benchmarks/ddp_throughput.py --device cuda --processes 1 2 4 8 --out ...cuda.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project's packages

from pipeline import distributed  # noqa: E402
from pipeline.config import DistributedConfig, TrainConfig  # noqa: E402
from pipeline.data import make_synthetic  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.training import (  # noqa: E402
    TrainingRun,
    cross_entropy_loss,
    fit,
    make_loaders,
    prepare_model,
)

RESULT = "RESULT "
WORKER_ONLY = ("worker", "checkpoint", "threads", "sync_batchnorm", "note")  # not settings
GPU_EXPECTATION = (
    "Not measured: no GPU was available. Expect throughput to grow with the number of GPUs N only "
    "while each GPU's share of the global batch (batch_size / N) keeps it busy: the paper "
    "profile's 256 is 128 per GPU on 2 GPUs but 32 on 8, where small CIFAR ResNets are bound by "
    "kernel launches, the gradient all-reduce and the two collectives per BatchNorm layer "
    "rather than by arithmetic, so expect well below N-fold. Measure it with --device cuda "
    "--processes 1 2 4 8 (one process per GPU, NCCL, nn.SyncBatchNorm).")


def train_once(args) -> None:
    """One configuration, in this process (one of several under torchrun)."""
    cfg = DistributedConfig(nproc_per_node=1, nnodes=1, rdzv_endpoint="",
                            sync_batchnorm=args.sync_batchnorm == "on", max_restarts=0,
                            timeout_s=600)
    env, device = distributed.start(cfg, args.device, __file__, trains=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dataset = make_synthetic(args.images, 256, 10, seed=0)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=256,
                            lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                            schedule="cosine", milestones=(), gamma=0.1, warmup_epochs=0,
                            label_smoothing=0.0, amp="off", channels_last=True)
    train, test = make_loaders(dataset, train_cfg, device, 0, env.rank, env.world_size)
    model = prepare_model(build_model({"arch": args.arch, "num_classes": 10}), train_cfg, device)
    result = fit(model, TrainingRun(
        cfg=train_cfg, train_loader=train, test_loader=test, loss_fn=cross_entropy_loss(),
        checkpoint_path=args.checkpoint, fingerprint="benchmark", title="benchmark"))
    per_epoch = len(train) * args.batch_size
    if env.is_main:
        rates = [per_epoch / row["seconds"] for row in result.history[1:]]
        print(RESULT + json.dumps({"rates": rates, "world_size": env.world_size,
                                   "threads": torch.get_num_threads()}), flush=True)


def configurations(args) -> list[dict]:
    cores = os.cpu_count() or 1
    found = []
    for processes in args.processes:
        if args.device == "cpu" and processes == 1:
            found += [{"processes": 1, "threads": t, "sync_batchnorm": "on"}
                      for t in sorted({1, cores})]
        elif processes == 1:
            found.append({"processes": 1, "threads": 1, "sync_batchnorm": "on"})
        else:
            threads = max(1, cores // processes) if args.device == "cpu" else 1
            found += [{"processes": processes, "threads": threads, "sync_batchnorm": sync}
                      for sync in ("on", "off")]
    return found


def name_of(config: dict) -> str:
    name = f"{config['processes']} process(es) x {config['threads']} thread(s)"
    return name if config["processes"] == 1 else \
        f"{name}, batchnorm sync {config['sync_batchnorm']}"


def run_configuration(args, config: dict, folder: Path) -> list[float]:
    worker = [__file__, "--worker", "--device", args.device, "--arch", args.arch,
              "--images", str(args.images), "--batch-size", str(args.batch_size),
              "--epochs", str(args.epochs), "--threads", str(config["threads"]),
              "--sync-batchnorm", config["sync_batchnorm"],
              "--checkpoint", str(folder / "checkpoint.pt")]
    launcher = [sys.executable] if config["processes"] == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
         f"--nproc-per-node={config['processes']}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"])}
    done = subprocess.run([*launcher, *worker], env=env, capture_output=True, text=True,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"{name_of(config)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len(RESULT):])["rates"]


def measure(args) -> dict:
    samples = {name_of(config): [] for config in configurations(args)}
    for _ in range(args.repeats):
        for config in configurations(args):
            with tempfile.TemporaryDirectory() as folder:
                samples[name_of(config)] += run_configuration(args, config, Path(folder))
    medians = {name: statistics.median(rates) for name, rates in samples.items()}
    return {"median_images_per_second": medians, "samples_images_per_second": samples}


def provenance(args, load_before, load_after) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "backend": "nccl" if gpu else "gloo",
            "settings": {key: str(value) for key, value in vars(args).items()
                         if key not in WORKER_ONLY},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average_1_5_15_min": {"before": load_before, "after": load_after},
            "data": "synthetic 32x32 images (speed does not depend on their content)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="result file (JSON)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--images", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is not timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sync-batchnorm", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train_once(args)
        return
    if args.out is None:
        parser.error("--out is required")
    load_before = os.getloadavg()
    result = measure(args)
    gpus = {"measured": True} if args.device == "cuda" else \
        {"measured": False, "expectation": GPU_EXPECTATION}
    result = {"provenance": provenance(args, load_before, os.getloadavg()), "note": args.note,
              "gpus": gpus, **result}
    write_json(args.out, result)
    print(json.dumps(result["median_images_per_second"], indent=2))


if __name__ == "__main__":
    main()
