"""validate_params stage: check all of params.yaml before any stage touches its outputs.

DVC deletes a stage's outputs before running it, so a stage that found bad params itself would
already have lost its old results. Every stage therefore depends on this one, which validates
the whole file first - every section, every runtime's settings, the rules across sections -
and writes each section's resolved settings (profile applied) to resolved/<section>.json and
each target's settings to resolved/targets/<target>.json. A stage depends on exactly the files
it reads, so it reruns exactly when its effective settings change, whichever profile set them.

It also writes resolved/targets/<target>.code: the hash of the code target <target> runs
(pipeline.codebase.code_hash of its module). The benchmark stage imports its target's module by
name at run time, and DVC cannot give each item of a foreach stage its own list of code files,
so benchmark@<target> depends on this hash instead: editing targets/ssh.py re-runs the ssh-*
benchmarks and no other (this stage imports every target, so it re-runs too, in seconds).

Three files are derived for stages that read a few keys of other sections and take minutes:
resolved/latency_networks.json (the teacher's and the student's architectures, the input shape,
the export opset and simplifier: all latency_table reads), resolved/program_batches.json
(benchmark.batch_sizes: all export_executorch reads) and resolved/teacher_views.json (the
student stages' epochs, batch sizes, precision and memory format, the teacher's runtime and
distill.teacher_cache: all teacher_logits reads). A new learning rate, temperature or benchmark
timing re-runs none of them.

Pruning methods work the same way: resolved/methods/<method>.json holds what
student_pruned@<method> reads (the method's section plus the common MACs target and rounding,
so adding a method to prune.methods re-runs no other method), and resolved/methods/<method>.code
the hash of the method's module (pipeline/prune/<method>.py and what it imports), for every
method whether listed or not.
"""

import argparse
from pathlib import Path
from typing import Any

from pipeline.codebase import code_hash
from pipeline.config import METHOD_NAMES, as_dict, method_document
from pipeline.io import atomic_write_text, write_json
from pipeline.prune.registry import method_module
from stages._cli import RESOLVED, run_main
from stages._params import METHOD_SECTIONS, SECTIONS, Params, load_params
from targets.registry import target_module, target_names


def resolved_documents(params: Params) -> dict[str, Any]:
    """File stem under resolved/ -> its content."""
    documents: dict[str, Any] = {section: as_dict(getattr(params, section))
                                 for section in SECTIONS if section not in METHOD_SECTIONS}
    # `common` carries the profile name: every stage reads common, and records the profile.
    documents["common"] = {"profile": params.profile, **documents["common"]}
    documents["latency_networks"] = as_dict(params.latency_networks())
    documents["program_batches"] = as_dict(params.program_batches())
    documents["teacher_views"] = as_dict(params.teacher_views())
    for name in target_names():
        documents[f"targets/{name}"] = as_dict(params.target_settings(name))
    for name in METHOD_NAMES:
        documents[f"methods/{name}"] = method_document(*params.method_settings(name))
    return documents


def code_hashes() -> dict[str, str]:
    """File stem under resolved/ -> hash of the code the target (or pruning method) runs."""
    return {**{f"targets/{name}": code_hash(target_module(name)) for name in target_names()},
            **{f"methods/{name}": code_hash(method_module(name)) for name in METHOD_NAMES}}


def run(params_path: str, out_dir: Path) -> dict[str, Any]:
    documents = resolved_documents(load_params(params_path))  # raises before anything is written
    for stem, content in documents.items():
        write_json(out_dir / f"{stem}.json", content)
    for stem, digest in code_hashes().items():
        atomic_write_text(out_dir / f"{stem}.code", digest + "\n")
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out-dir", type=Path, default=RESOLVED)
    args = parser.parse_args()
    run_main(lambda: run(args.params, args.out_dir))


if __name__ == "__main__":
    main()
