"""predict.py propagate=box: one box on one slice of a real NIfTI volume in tmp -> a label volume
in the input's shape and affine, the prompted slice as without propagation and each next slice
prompted by the previous mask's box (tiny model, random weights)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import lps_affine, make_volume, run_predict, save, weights  # noqa: F401

from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.propagation import next_box

KEY = 2


def _read(path):
    return np.asarray(nib.load(path).dataobj)


def test_one_box_on_one_slice_gives_a_label_volume(tmp_path, weights):  # noqa: F811
    image, label = make_volume()  # RAS-like diagonal affine below: file indices = loader's
    affine = np.diag([0.8, 1.2, 4.0, 1.0])
    img = save(tmp_path / "case.nii.gz", image, affine)
    rows, cols = np.nonzero(label[:, :, KEY] == 1)  # rows = file i, cols = file j
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    typed = [f"box=[{','.join(map(str, box))}]", f"slice={KEY}", "label=4", "overlay=false"]
    run_predict(weights, tmp_path / "prop", f"input={img}", "propagate=box", *typed)
    out = nib.load(tmp_path / "prop" / "case.nii.gz")
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, affine)
    pred = np.asarray(out.dataobj)
    assert set(np.unique(pred)) <= {0, 4} and (pred[:, :, KEY] == 4).any()
    # The prompted slice is the plain prediction's.
    run_predict(weights, tmp_path / "plain", f"input={img}", *typed)
    plain = _read(tmp_path / "plain" / "case.nii.gz")
    np.testing.assert_array_equal(pred[:, :, KEY], plain[:, :, KEY])
    assert not plain[:, :, KEY + 1].any()
    # The next slice up: prompted by the prompted slice's mask's box + 3 px (256 frame).
    from pathlib import Path

    from partial_api import load_image
    from test_predict import _compose

    from sam_ft.config import parse_predict_config
    from sam_ft.evaluation.protocol.decode_select import decode_masks
    from sam_ft.inference.label_maps import _embed
    from sam_ft.predict import build_model, build_settings, trained_settings
    from sam_ft.prompts.types import Prompt

    cfg = parse_predict_config(
        _compose("predict", [f"checkpoint={weights}", f"input={img}", "output=x"])
    )
    facts, checkpoint = trained_settings(cfg)
    settings = build_settings(cfg, facts)
    model = build_model(facts, checkpoint).eval()
    loaded = load_image(Path(img), settings.task)
    box = next_box(pred[:, :, KEY] == 4, 3)
    with torch.inference_mode():
        (mask,) = decode_masks(
            model, _embed(model, loaded.slice_image(KEY + 1)), [Prompt(box=box)], loaded.size,
            settings.mask_selection, 256,
        )  # fmt: skip
    np.testing.assert_array_equal(pred[:, :, KEY + 1] == 4, mask)
    # Contiguous around the prompted slice: a chain stops at its first empty mask.
    on = np.flatnonzero(pred.any(axis=(0, 1)))
    assert list(on) == list(range(on[0], on[-1] + 1)) and on[0] <= KEY <= on[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["propagate=memory", "box=[3,4,20,30]", "slice=2"], r"^propagate=memory is not in predi"),
        (["propagate=sideways", "box=[3,4,20,30]", "slice=2"], r"^propagate='sideways' must"),
        (["propagate=box", "prompt=everything"], r"^propagate= carries prompts="),
    ],
)
def test_propagate_errors_name_the_option(tmp_path, weights, args, message):  # noqa: F811
    image, _ = make_volume()
    img = save(tmp_path / "case.nii.gz", image, lps_affine())
    with pytest.raises(ConfigError, match=message):
        run_predict(weights, tmp_path / "out", f"input={img}", *args)
