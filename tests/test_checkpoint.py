"""Checkpoint reading, strict loading with clear errors, export, and verified downloads."""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

from sam_ft.defaults import build_from_yaml
from sam_ft.errors import CheckpointError
from sam_ft.model.builders import build_sam, build_sam_architecture
from sam_ft.model.checkpoint import export_official, read_state_dict
from sam_ft.model.download import fetch
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.types import Prompt


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """Random tiny weights saved exactly as the official .pth files are: a flat state dict."""
    torch.manual_seed(1)
    sam = build_sam_architecture("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_official_then_export_reloads_with_segment_anything(official_tiny, tmp_path):
    sam, path = official_tiny
    loaded = build_sam("tiny", checkpoint=str(path))
    assert _same(loaded.state_dict(), sam.state_dict())
    out = export_official(TrainableSam(loaded), tmp_path / "sam_finetuned.pth")
    # The official format: a flat state dict that plain torch + Sam.load_state_dict accept.
    fresh = build_sam_architecture("tiny")
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert _same(fresh.state_dict(), sam.state_dict())


def test_export_official_vit_b_loads_in_sam_model_registry(tmp_path):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    model = TrainableSam(build_sam_architecture("vit_b"))
    out = export_official(model, tmp_path / "sam_finetuned.pth")
    reloaded = sam_model_registry["vit_b"](checkpoint=str(out))
    assert _same(reloaded.state_dict(), model.sam.state_dict())


@pytest.mark.parametrize("wrap", ["module.", "model.sam.", "sam."])
def test_prefixes_are_stripped(official_tiny, tmp_path, wrap):
    sam, _ = official_tiny
    path = tmp_path / "wrapped.ckpt"
    state = {wrap + k: v for k, v in sam.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)
    assert _same(read_state_dict(path), sam.state_dict())


def test_medsam_style_dict_under_model_key(official_tiny, tmp_path):
    sam, _ = official_tiny
    path = tmp_path / "medsam_train.pth"
    torch.save({"model": sam.state_dict(), "epoch": 1}, path)
    assert _same(read_state_dict(path), sam.state_dict())


def test_wrong_architecture_names_the_likely_cause(tmp_path):
    path = tmp_path / "vit_b.pth"
    torch.save(build_sam_architecture("vit_b").state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_sam("tiny", checkpoint=str(path))
    text = str(err.value)
    assert "this looks like a ViT-B checkpoint; you asked for tiny" in text
    assert "unexpected" in text and "misshaped" in text and str(path) in text


def test_missing_keys_are_listed(official_tiny, tmp_path):
    sam, _ = official_tiny
    state = sam.state_dict()
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing: mask_decoder.iou_token.weight"):
        build_sam("tiny", checkpoint=str(path))


class Payload:
    """A pickled object: loading it with weights_only=False would run its code."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_object_is_refused(official_tiny, tmp_path):
    sam, _ = official_tiny
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": sam.state_dict(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_state_dict(path)


def test_truncated_checkpoint_gives_clear_error(official_tiny, tmp_path):
    _, path = official_tiny
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(cut)


def test_missing_file():
    with pytest.raises(CheckpointError, match="does not exist"):
        build_sam("tiny", checkpoint="/nonexistent/sam.pth")


def test_lora_checkpoint_is_merged_into_plain_weights(tmp_path):
    torch.manual_seed(0)
    model = TrainableSam(build_sam_architecture("tiny"))
    build_from_yaml("finetune", "lora", rank=2).apply(model)
    with torch.no_grad():  # a trained adapter: B non-zero
        for block in model.sam.image_encoder.blocks:
            block.attn.qkv.lora_b.normal_(0, 0.05)
    image = np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    prompts = [Prompt(box=[5, 5, 40, 30])]
    expected, _, _ = model.eval().predict(image, prompts)
    ckpt = tmp_path / "lora.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    plain = TrainableSam(build_sam("tiny", checkpoint=str(ckpt))).eval()
    got, _, _ = plain.predict(image, prompts)
    assert torch.allclose(expected, got, atol=1e-4)
    exported = export_official(model, tmp_path / "sam_finetuned.pth")
    assert not any("lora" in k for k in torch.load(exported, weights_only=True))


def test_export_refuses_non_finite(tmp_path):
    model = TrainableSam(build_sam_architecture("tiny"))
    with torch.no_grad():
        model.sam.mask_decoder.iou_token.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        export_official(model, tmp_path / "x.pth")


# --- downloads -------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    """A real local HTTP server over a folder holding one weights file; counts requests."""
    root = tmp_path / "www"
    root.mkdir()
    payload = np.random.default_rng(0).bytes(300_000)
    (root / "w.pth").write_bytes(payload)
    hits = collections.Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits[self.path] += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/w.pth", payload, hits
    server.shutdown()


def test_download_verifies_hash_and_reuses_file(served, tmp_path):
    url, payload, hits = served
    digest = hashlib.sha256(payload).hexdigest()
    out = fetch(url, "w.pth", digest, tmp_path / "cache")
    assert out.read_bytes() == payload
    assert fetch(url, "w.pth", digest, tmp_path / "cache") == out
    assert hits["/w.pth"] == 1  # second call served from the cache
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["w.pth"]  # no temp files left


def test_download_with_wrong_hash_saves_nothing(served, tmp_path):
    url, _, _ = served
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        fetch(url, "w.pth", "0" * 64, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_from_file_url(tmp_path):
    src = tmp_path / "src.pth"
    src.write_bytes(b"weights")
    out = fetch(src.as_uri(), "src.pth", hashlib.sha256(b"weights").hexdigest(), tmp_path / "c")
    assert out.read_bytes() == b"weights"


def test_offline_message_says_where_to_put_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"put it at .*cache[/\\]w\.pth"):
        fetch("http://127.0.0.1:9/w.pth", "w.pth", None, tmp_path / "cache")


def test_auto_checkpoint_uses_cache_dir(monkeypatch, tmp_path, official_tiny):
    # `auto` for an official model resolves through the cache: a verified file there is reused.
    from sam_ft.model import builders

    _, path = official_tiny
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    spec = builders.SamSpec(
        96, 2, 2, (1,), image_size=256, window_size=8, url=path.as_uri(), sha256=digest
    )
    monkeypatch.setitem(builders.SPECS, "tiny", spec)
    monkeypatch.setenv("SAM_FT_CACHE", str(tmp_path / "c"))
    sam = build_sam("tiny", checkpoint="auto")
    assert (tmp_path / "c" / path.name).is_file()
    assert _same(sam.state_dict(), official_tiny[0].state_dict())
