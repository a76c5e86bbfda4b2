"""Rehearse ``bench/gpu.sh`` on a CPU against what the lent GPU machine holds: its image's
Python packages and nothing else, plus the wheels ``bench/gpu_wheels.py`` fetches, and no
network.

    python bench/gpu_rehearsal.py [--keep DIR]

Builds, in a temporary folder: a fresh virtual environment of this Python whose only packages
are those of the image's list (``IMAGE``, from the device notes of 2026-11-17) taken from this
environment (linked, not copied: torch comes from local disk); the wheels for this Python's
version (``gpu_wheels.py --python-version``: the GPU image has 3.12); a copy of the checkout's
files as they travel (tracked and untracked-not-ignored, the wheels in ``.whl/``). Then runs
``bench/gpu.sh --dry-run`` there with pip's index off and the proxies pointing nowhere, and
checks that every row was measured.

Last line: ``rehearsal_rows=<rows measured>`` (exit 1 when a row failed or the run did).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The GPU machines' image ("cuda"), as listed on 2026-11-17 (/work/.library/device/KINDS.md).
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split()  # noqa: SIM905


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _in_image(name: str) -> bool:
    # The CUDA libraries under their cu12/cu13 names: the image holds its own build's.
    return name in IMAGE_SET or name.startswith(("nvidia-", "cuda-"))


IMAGE_SET = {_norm(n) for n in IMAGE}


def image_site(dest: Path) -> list[str]:
    """Link this environment's packages that the image also has into ``dest``; their names."""
    dest.mkdir(parents=True)
    linked = []
    for dist in metadata.distributions():
        name = _norm(dist.metadata["Name"] or "")
        if not _in_image(name) or not dist.files:
            continue
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files if not str(f).startswith("..")}
        for top in tops:
            source, target = base / top, dest / top
            if source.exists() and not target.exists() and not top.endswith(".pth"):
                target.symlink_to(source)
        linked.append(name)
    return sorted(set(linked))


def checkout_copy(dest: Path) -> None:
    """The files that travel to the GPU machine: tracked and untracked-not-ignored."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=Path, help="build in this folder and keep it")
    p.add_argument("--budget", type=int, default=600)
    args = p.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu_rehearsal_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _rehearse(work, args.budget)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _rehearse(work: Path, budget: int) -> int:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    repo, venv = work / "repo", work / "venv"
    checkout_copy(repo)
    fetch = [sys.executable, str(ROOT / "bench" / "gpu_wheels.py"), "--python-version", version]
    subprocess.run([*fetch, "--dest", str(repo / ".whl")], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    linked = image_site(work / "image")
    (Path(purelib) / "gpu_image.pth").write_text(str(work / "image") + "\n")
    print(f"image packages linked from this environment: {len(linked)}", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL"))}
    env.update(
        PYTHON=str(python), PIP_NO_INDEX="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
        http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", TMPDIR=str(work),
    )  # fmt: skip
    out = work / "out"
    cmd = ["bash", str(repo / "bench" / "gpu.sh"), "--dry-run", "--budget", str(budget), str(out)]
    proc = subprocess.run(cmd, cwd=work, env=env)
    rows = list(csv.DictReader((out / "gpu_bench.csv").open())) if out.is_dir() else []
    failed = [r for r in rows if r["unit"].startswith("FAILED")]
    for r in failed:
        print(f"row failed: {r['bench']} {r['model']} {r['mode']} {r['precision']}: {r['unit']}")
    print(f"gpu.sh exit {proc.returncode}; {len(rows)} rows, {len(failed)} failed", flush=True)
    print(f"rehearsal_rows={len(rows) - len(failed)}")
    return 0 if proc.returncode == 0 and rows and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
