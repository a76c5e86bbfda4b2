"""Fetch, where pip reaches PyPI, the wheels ``bench/gpu.sh`` installs on the lent GPU machine
(no network there; its image has Python 3.12, torch, lightning, numpy, scipy, pandas, OpenCV, ...
but not the packages below), into ``.whl/`` of this checkout (ignored by git; it travels with
the working tree: 64 MiB at most).

    python bench/gpu_wheels.py [--python-version 3.12] [--dest .whl]

Each package at the version installed here (the versions the tests pass with), else the newest;
``--no-deps``: their needs that the image holds are not fetched. antlr4-python3-runtime 4.9.3
(omegaconf's pin) exists only as a source archive: it is pure Python, so its wheel is built here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# What sam_ft imports (for gpu.py: models, training, evaluate.py) that the image lacks, and their
# own needs that it lacks (albumentations -> albucore, pydantic, ...; hydra-core -> antlr4).
PACKAGES = [
    "segment-anything",
    "monai",
    "nibabel",
    "hydra-core",
    "omegaconf",
    "albumentations",
    "albucore",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "simsimd",
    "stringzilla",
]
SOURCE_ONLY = ["antlr4-python3-runtime==4.9.3"]
PLATFORMS = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
]  # fmt: skip
LIMIT_MIB = 64


def pinned(name: str) -> str:
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default="3.12", help="the GPU image's Python (3.12)")
    p.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / ".whl")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    platforms = [a for plat in PLATFORMS for a in ("--platform", plat)]
    for spec in map(pinned, PACKAGES):
        cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation",
               "cp", "--python-version", args.python_version, *platforms, "-d", str(args.dest),
               spec]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            print(f"gpu_wheels.py: no wheel of {spec} for Python {args.python_version}")
            return 1
    with tempfile.TemporaryDirectory() as tmp:
        for spec in SOURCE_ONLY:
            cmd = [*pip, "wheel", "-q", "--no-deps", "-w", str(args.dest), "--cache-dir", tmp, spec]
            if subprocess.run(cmd).returncode != 0:
                print(f"gpu_wheels.py: could not build the wheel of {spec}")
                return 1
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {args.dest} (limit {LIMIT_MIB} MiB)")
    return 0 if size <= LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
