"""Runs on the edge device, copied there next to the model by targets/ssh.py.

Self-contained on purpose: only the standard library, numpy and onnxruntime, so any device with
a Python 3 + `pip install numpy onnxruntime` can run it. It times with the same rule as
pipeline.timing (warm-up count and time, then at least min_iters calls lasting at least
min_seconds) and returns the raw per-call samples; statistics are computed back home by the
same code as every local target.

    python remote_runner.py probe   --providers CPUExecutionProvider
    python remote_runner.py infer   --model m.onnx --feeds in.npz --out out.npz
    python remote_runner.py bench   --model m.onnx --feeds in.npz --plan '{"warmup_iters": 10, ...}'
    python remote_runner.py predict --model m.onnx --images x.npz --batch 64

The last stdout line is `PRUNE_DEPLOY_RESULT <json>`; on failure the JSON has "error" (and
"missing" when a required module is absent) and the exit status is 3.
"""

import argparse
import json
import os
import platform
import sys
import time

RESULT_TAG = "PRUNE_DEPLOY_RESULT "


class RunnerFailure(Exception):
    """A failure to report back to the caller as {"error": ...}."""


def emit(payload):
    sys.stdout.write(RESULT_TAG + json.dumps(payload) + "\n")
    sys.stdout.flush()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_info():
    import numpy

    info = {"host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model(), "numpy": numpy.__version__,
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    info["available_providers"] = onnxruntime.get_available_providers()
    return info


def open_session(model, providers, threads):
    """An ONNX Runtime session that really uses the first requested provider (no fallback)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model, sess_options=options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise RunnerFailure(f"requested execution provider {providers[0]} but ONNX Runtime "
                            f"runs on {session.get_providers()}")
    return session


def load_npz(path):
    import numpy

    with numpy.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def run_plan(timed_call, plan, clock=time.perf_counter):
    """pipeline.timing.run_plan, restated here because this file must stand alone."""
    started, done = clock(), 0
    while done < plan["warmup_iters"] or clock() - started < plan["warmup_seconds"]:
        timed_call()
        done += 1
    samples, started = [], clock()
    while len(samples) < plan["min_iters"] or clock() - started < plan["min_seconds"]:
        samples.append(timed_call())
    return samples


def bench(session, feeds, plan):
    def timed_call():
        begin = time.perf_counter()
        session.run(None, feeds)
        return time.perf_counter() - begin

    return {"samples_s": run_plan(timed_call, plan)}


def predict(session, images, batch):
    """Arg-max class of every image, in chunks of `batch` (the tail padded for fixed batches)."""
    import numpy

    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
    batch = fixed or batch
    labels = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        count = len(chunk)
        if fixed and count < fixed:
            chunk = numpy.concatenate([chunk, numpy.repeat(chunk[:1], fixed - count, axis=0)])
        logits = session.run(None, {spec.name: chunk})[0]
        labels.extend(int(v) for v in logits[:count].argmax(axis=1))
    return {"labels": labels}


def dispatch(args):
    providers = args.providers or ["CPUExecutionProvider"]
    if args.command == "probe":
        return device_info()
    session = open_session(args.model, providers, args.threads)
    if args.command == "infer":
        import numpy

        outputs = session.run(None, load_npz(args.feeds))
        names = [output.name for output in session.get_outputs()]
        numpy.savez(args.out, **dict(zip(names, outputs, strict=False)))
        return {"outputs": names}
    if args.command == "bench":
        return bench(session, load_npz(args.feeds), json.loads(args.plan))
    images = load_npz(args.images)["images"]
    return predict(session, images, args.batch)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="prune-deploy runner for edge devices")
    parser.add_argument("command", choices=["probe", "infer", "bench", "predict"])
    parser.add_argument("--model")
    parser.add_argument("--feeds")
    parser.add_argument("--out")
    parser.add_argument("--plan")
    parser.add_argument("--images")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--providers", nargs="*")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        emit(dispatch(args))
    except ImportError as err:
        emit({"error": f"cannot import {err.name} on the device: {err}", "missing": err.name})
        return 3
    except Exception as err:  # noqa: BLE001 - every failure is reported back, typed by name
        emit({"error": f"{type(err).__name__}: {err}"})
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
