"""validate_params stage: check all of params.yaml before any stage touches its outputs.

DVC deletes a stage's outputs before running it, so a stage that found bad params itself would
already have lost its old results. Every stage therefore depends on this one, which validates
the whole file first and writes each section's resolved settings (profile applied) to
resolved/<section>.json. A stage depends on the files of the sections it reads, so it reruns
exactly when its effective settings change, whichever profile set them.
"""

import argparse
from pathlib import Path

from pipeline.config import as_dict, load_params
from pipeline.io import write_json
from stages._cli import run_main


def run(params_path: str, out_dir: Path) -> dict:
    resolved = as_dict(load_params(params_path))
    profile = resolved.pop("profile")
    for section, values in resolved.items():
        # `common` carries the profile name: every stage reads common, and records the profile.
        extra = {"profile": profile} if section == "common" else {}
        write_json(out_dir / f"{section}.json", {**extra, **values})
    return {"profile": profile, **resolved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out-dir", type=Path, default=Path("resolved"))
    args = parser.parse_args()
    run_main(lambda: run(args.params, args.out_dir))


if __name__ == "__main__":
    main()
