"""Loading never hides a cause: warnings are shown (once), out-of-memory and bugs are not
reported as bad files, and every offered volume format (.mha, .nrrd) loads.

Real files: NIfTI written with nibabel, MetaImage / NRRD written with ITK.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from partial_api import find_cases, load_cases

from sam_ft.data import readers
from sam_ft.data.folder import VOLUME_SUFFIXES
from sam_ft.data.readers import read_volume
from sam_ft.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _write_itk(path: Path, array: np.ndarray, spacing, is_label: bool = False) -> Path:
    """Save ``array`` (x, y, z) with ITK: voxel (i, j, k) at RAS (i*sx, j*sy, k*sz), i.e. LPS
    direction diag(-1, -1, 1) as ITK stores it."""
    import itk

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))  # ITK arrays are (z, y, x)
    image = itk.image_from_array(data.astype(np.uint8 if is_label else np.float32))
    image.SetSpacing([float(s) for s in spacing])
    direction = np.diag([-1.0, -1.0, 1.0])
    image.SetDirection(itk.matrix_from_array(direction))
    itk.imwrite(image, str(path))
    return path


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_offered_itk_formats_load_like_nifti(tmp_path, h, suffix):
    assert suffix in VOLUME_SUFFIXES  # the folder task offers it, so it must load
    image, label = h.simple_case(shape=(24, 20, 4))
    spacing = (0.8, 0.6, 2.5)
    nifti = h.write_nifti(tmp_path / "ref.nii.gz", image, spacing=spacing)
    other = _write_itk(tmp_path / f"img{suffix}", image, spacing)
    (ref, ref_affine), (got, got_affine) = read_volume(str(nifti)), read_volume(str(other))
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(got_affine, ref_affine, atol=1e-5)

    root = tmp_path / "task"
    for i in range(2):
        _write_itk(root / "imagesTr" / f"c{i}{suffix}", image, spacing)
        _write_itk(root / "labelsTr" / f"c{i}{suffix}", label, spacing, is_label=True)
    task = {"root": str(root)}
    data = load_cases(find_cases(root, task), task, progress=False)
    assert [d.case for d in data] == ["c0", "c1"]
    assert sum(int(s.masks.sum()) for s in data[0].slices) == int((label > 0).sum())


def test_reading_warnings_are_shown_once(tmp_path, monkeypatch, caplog):
    # A complex-valued NIfTI read as float32 loses its imaginary part: numpy warns, and the
    # user must see it. Two such files: shown once.
    monkeypatch.setattr(readers, "_shown_warnings", set())
    cplx = (np.ones((8, 8, 4)) * (1 + 2j)).astype(np.complex64)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(cplx, np.eye(4)), tmp_path / f"{name}.nii.gz")
    with caplog.at_level(logging.WARNING, logger="sam_ft.data.readers"):
        for name in ("a", "b"):
            read_volume(str(tmp_path / f"{name}.nii.gz"))
    shown = [r.getMessage() for r in caplog.records if "imaginary part" in r.getMessage()]
    assert len(shown) == 1, caplog.text
    assert str(tmp_path / "a.nii.gz") in shown[0]


def test_not_the_files_fault_is_raised_as_is():
    # The rule: out of memory and bugs propagate (with the file as a note); anything else from a
    # reader is a bad file.
    for error in (MemoryError("x"), TypeError("x"), AttributeError("x"), AssertionError("x")):
        with pytest.raises(type(error)) as err:
            readers._raise_if_not_the_files_fault(error, "/data/x.nii.gz")
        assert "while reading /data/x.nii.gz" in "".join(getattr(err.value, "__notes__", []))
    for error in (ValueError("x"), OSError("x"), EOFError("x"), RuntimeError("x")):
        readers._raise_if_not_the_files_fault(error, "/data/x.nii.gz")  # returns: a file problem


def test_out_of_memory_while_reading_is_not_a_bad_file(tmp_path, h):
    # A real MemoryError: the address space is capped just above what the process uses, then a
    # 256 MiB (float32) volume is read. It must surface as MemoryError, not as a DataError that
    # data.on_error=skip would quietly skip as "unreadable or truncated".
    h.write_nifti(tmp_path / "small.nii.gz", np.zeros((8, 8, 4), np.float32))
    h.write_nifti(tmp_path / "big.nii.gz", np.zeros((512, 512, 256), np.float32))
    script = textwrap.dedent(
        f"""
        import resource
        from sam_ft.data.readers import read_volume
        from sam_ft.errors import DataError
        read_volume({str(tmp_path / "small.nii.gz")!r})  # imports and readers warmed up
        vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
        cap = vm * 1024 + (96 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            read_volume({str(tmp_path / "big.nii.gz")!r})
            print("LOADED")
        except MemoryError as e:
            print("MEMORYERROR", getattr(e, "__notes__", []))
        except DataError as e:
            print("DATAERROR", e)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert "MEMORYERROR" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "big.nii.gz" in proc.stdout
    assert "unreadable or truncated" not in proc.stdout


def test_truncated_nifti_is_a_data_error_not_read_by_another_reader(tmp_path, h):
    # MONAI falls back to any other installed reader when the chosen one fails, and ITK reads a
    # truncated .nii.gz without error, as zeros: only the chosen reader may read a file.
    image, _ = h.simple_case(shape=(20, 20, 3), box=(slice(2, 12), slice(2, 12), slice(0, 3)))
    path = h.write_nifti(tmp_path / "t.nii.gz", image)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="unreadable or truncated"):
        read_volume(str(path))
