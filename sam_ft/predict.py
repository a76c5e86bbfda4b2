"""The prediction task: ``python predict.py`` / ``sam-ft-predict`` load the model as it was
trained, predict every input, write one label map per input (``predict``; ``main`` is its Hydra
entry point; the per-image work is in :mod:`sam_ft.inference.label_maps`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sam_ft.config import PredictConfig, parse_predict_config
from sam_ft.data.skips import SkipLog, check_on_error, raise_or_skip
from sam_ft.data.tasks import data_options, task_options, to_plain
from sam_ft.defaults import config_dir
from sam_ft.errors import CheckpointError, ConfigError, DataError, exit_on_own_error
from sam_ft.evaluation.protocol.everything import EverythingConfig
from sam_ft.inference.card import card_for, read_card
from sam_ft.inference.frames import file_geometry
from sam_ft.inference.inputs import companion, list_inputs, load_image, stem_of
from sam_ft.inference.label_maps import (
    Settings,
    predict_everything,
    predict_from_labels,
    predict_from_prompts,
)
from sam_ft.inference.output import write_prediction
from sam_ft.inference.prompt_file import parse_prompt_objects, read_prompt_file
from sam_ft.inference.propagate import check_propagate, propagate_from_prompts
from sam_ft.model.trainable import TrainableSam
from sam_ft.reproducible import thread_independent

log = logging.getLogger(__name__)

_LABEL_SUFFIXES = (".nii", ".nii.gz", ".png", ".tif", ".tiff", ".bmp")
_TASK_KEYS = ("modality", "intensity", "slice_axis", "channel", "labels", "label_binarize")
# Options of predict.yaml that override the checkpoint's task settings (``labels`` there is the
# label map file, not the task's object groups).
_OPTION_KEYS = ("modality", "intensity", "slice_axis", "channel")


def _run_dir(ckpt: Path) -> Path:
    """The run dir of a Lightning ``.ckpt`` (``RUN/checkpoints/x.ckpt``, or ``RUN/x.ckpt``)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _run_config(ckpt: Path) -> dict[str, Any] | None:
    """The ``.hydra/config.yaml`` of the run a Lightning ``.ckpt`` belongs to (unresolved)."""
    path = _run_dir(ckpt) / ".hydra" / "config.yaml"
    if path.is_file():
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore
    return None


def trained_settings(cfg: PredictConfig) -> tuple[dict[str, Any], str | None]:
    """What the checkpoint says about itself: {model, task, min_object_pixels, multimask} and
    the file to load (or ``auto``: the official download of ``model=``).

    A ``sam_finetuned.pth`` is described by its card (checked against the weights), a ``.ckpt``
    by its run's ``.hydra/config.yaml`` (and the task facts of the run's card, which hold the
    modality found in the data); other files by ``model=`` and the options given.
    """
    model = to_plain(cfg.model)
    ckpt = cfg.checkpoint
    facts: dict[str, Any] = {"model": model, "task": {}, "min_object_pixels": None}
    if ckpt is None or str(ckpt) in ("null", "none", ""):
        raise ConfigError("checkpoint= is required: a sam_finetuned.pth, a run's .ckpt or auto")
    if str(ckpt) == "auto":
        return facts, "auto"
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint={path}: file not found")
    card = card_for(path)
    if card is not None:
        model.update(
            name=card["architecture"],
            image_size=int(card["image_size"]),
            preprocess=card["preprocess"],
            hq_token_only=card.get("hq_token_only"),
        )
        facts.update(
            task=dict(card.get("task") or {}),
            min_object_pixels=card.get("min_object_pixels"),
            multimask_output=card.get("multimask_output"),
        )
        log.info("model card %s: %s, %s preprocessing", path.with_suffix(".json"),
                 card["architecture"], card["preprocess"])  # fmt: skip
    elif path.suffix == ".ckpt" and (run := _run_config(path)) is not None:
        trained = run.get("model") or {}
        model.update({k: trained[k] for k in ("name", "image_size", "preprocess") if k in trained})
        model["hq_token_only"] = trained.get("hq_token_only")  # SAM-HQ only
        task = run.get("task") or {}
        facts.update(
            task={k: task[k] for k in _TASK_KEYS if k in task},
            min_object_pixels=(run.get("data") or {}).get("min_object_pixels"),
            multimask_output=True,  # SamFinetuneModule's default
        )
        run_card = _run_dir(path) / "sam_finetuned.json"
        if run_card.is_file():  # same run, so the same data settings (the weights differ)
            card = read_card(run_card)
            facts.update(
                task=dict(card.get("task") or {}),
                min_object_pixels=card.get("min_object_pixels"),
                multimask_output=card.get("multimask_output"),
            )
        log.info("run config of %s: model %s", path, model.get("name"))
    else:
        log.warning(
            "%s has no model card (%s) nor run config: fed as model=%s (%s preprocessing) with "
            "the intensity options given; a model trained otherwise gives wrong masks",
            path,
            path.with_suffix(".json").name,
            model.get("name"),
            model.get("preprocess"),
        )
    return facts, str(path)


def build_model(facts: dict[str, Any], checkpoint: str | None) -> TrainableSam:
    """The model described by ``facts["model"]`` with the weights of ``checkpoint``."""
    from sam_ft.model.builders import build_trainable_sam

    m = facts["model"]
    return build_trainable_sam(
        name=m["name"],
        checkpoint=checkpoint,
        image_size=m.get("image_size"),
        preprocess=m.get("preprocess"),
        grad_checkpointing=False,  # no training here
        compile_encoder=bool(m["compile_encoder"]),
        encoder_bf16=bool(m["encoder_bf16"]),
        hq_token_only=m.get("hq_token_only"),
    )


def build_settings(cfg: PredictConfig, facts: dict[str, Any]) -> Settings:
    """Explicit options, then the checkpoint's facts, then the defaults."""
    trained = facts.get("task") or {}
    task: dict[str, Any] = {"name": "predict", "source": "folder"}
    for key in _TASK_KEYS:
        given = getattr(cfg, key) if key in _OPTION_KEYS else None
        if given is not None:
            task[key] = to_plain(given)
        elif trained.get(key) is not None:
            task[key] = trained[key]
    min_pixels = cfg.min_object_pixels
    if min_pixels is None:
        min_pixels = facts.get("min_object_pixels")
    data = {"on_error": "raise", "min_object_pixels": 50 if min_pixels is None else min_pixels}
    selection = str(cfg.mask_selection)
    if selection == "auto":
        selection = "single" if facts.get("multimask_output") is False else "predicted_iou"
    everything = dict(cfg.everything)
    try:
        generator = EverythingConfig(
            grid=int(everything.pop("grid")),
            points_per_batch=cfg.max_prompts_per_call,
            **everything,
        )
    except (KeyError, TypeError) as err:
        raise ConfigError(f"everything={cfg.everything}: {err}") from None
    return Settings(
        task=task_options(task),  # complete here, once: the loaders read no default
        data=data_options(data),
        prompt=str(cfg.strategy),
        mask_selection=selection,
        seed=int(cfg.seed),
        max_prompts_per_call=int(cfg.max_prompts_per_call),
        everything=generator,
        overlay=bool(cfg.overlay),
    )


def typed_prompt(cfg: PredictConfig) -> dict[str, Any] | None:
    """The object given as ``box=`` / ``points=`` (+ ``point_labels=``, ``slice=``, ``label=``)
    on the command line, in a prompts file's form; None when neither box nor points is given."""
    if cfg.box is None and cfg.points is None:
        for key in ("point_labels", "slice"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"{key}= needs box= or points= (the prompt it belongs to)")
        return None
    obj: dict[str, Any] = {"label": cfg.label}
    for key in ("box", "points", "point_labels", "slice"):
        value = getattr(cfg, key)
        if value is not None:
            obj[key] = value
    return obj


def predict_one(
    model: TrainableSam,
    image_path: Path,
    settings: Settings,
    out_dir: Path,
    labels: Path | None,
    prompts: Path | dict[str, Any] | None,
    propagate: str | None = None,
) -> list[Path]:
    """One input -> its label map (and overlay) in ``out_dir``; ``prompts`` is a prompts file
    or one object typed on the command line (:func:`typed_prompt`); ``propagate="box"`` carries
    each prompted object through the whole volume (:mod:`sam_ft.inference.propagate`)."""
    if labels is not None:
        case, stack, images, used = predict_from_labels(model, image_path, labels, settings)
        first = next(iter(images.values()))
        return write_prediction(
            out_dir,
            image_path,
            stack,
            case.slice_axis,
            case.affine,
            lambda s: images.get(s, first),
            settings.overlay,
            used,
        )
    image = load_image(image_path, settings.task)
    name = stem_of(image_path)
    by_slice = None
    if prompts is not None:
        if isinstance(prompts, dict):
            typed = "box=/points= on the command line"
            by_slice = parse_prompt_objects([prompts], typed, file_geometry(image_path), image)
        else:
            by_slice = read_prompt_file(prompts, file_geometry(image_path), image)
        if propagate is not None:
            stack = propagate_from_prompts(
                model, image, by_slice, settings.mask_selection, settings.max_prompts_per_call
            )
        else:
            stack = predict_from_prompts(model, image, by_slice, settings, name)
    else:
        stack = predict_everything(model, image, settings, name)
    return write_prediction(
        out_dir,
        image_path,
        stack,
        image.slice_axis,
        image.ras_affine,
        image.slice_image,
        settings.overlay,
        by_slice,
    )


def predict(hydra_cfg: DictConfig) -> list[Path]:
    """Predict every input of ``input=``; returns the files written.

    Raises:
        ConfigError / CheckpointError: bad options or weights (before any input is read).
        DataError: a bad input with ``on_error=raise``, or when every input failed.
    """
    cfg = parse_predict_config(hydra_cfg)
    on_error = check_on_error(str(cfg.on_error), "on_error")
    typed = typed_prompt(cfg)
    if sum(bool(x) for x in (cfg.labels, cfg.prompts, typed)) > 1:
        raise ConfigError("give one of labels=, prompts= or box=/points=, not several")
    everything = str(cfg.strategy) == "everything"
    if everything and (cfg.labels or cfg.prompts or typed):
        raise ConfigError("prompt=everything takes no labels=, prompts= or box=/points=")
    if not (everything or cfg.labels or cfg.prompts or typed):
        raise ConfigError(
            "give labels=LABEL_MAP, prompts=PROMPTS.json, box=[x0,y0,x1,y1] (and/or "
            "points=[[x,y]]) or prompt=everything"
        )
    propagate = check_propagate(cfg.propagate)
    if propagate is not None and not (cfg.prompts or typed):
        raise ConfigError("propagate= carries prompts= or box=/points= through a volume: give one")
    inputs = list_inputs(cfg.input)
    single = len(inputs) == 1 and Path(str(cfg.input)).expanduser().resolve() == inputs[0].resolve()
    if typed and not single:
        raise ConfigError(f"box=/points= prompt one image; input={cfg.input} is a folder")
    facts, checkpoint = trained_settings(cfg)
    settings = build_settings(cfg, facts)
    if settings.mask_selection == "oracle" and not cfg.labels:
        raise ConfigError("mask_selection=oracle needs labels= (the reference it picks against)")
    model = build_model(facts, checkpoint)
    import torch

    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    out_dir = Path(str(cfg.output)).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    skips = SkipLog(out_dir)
    written: list[Path] = []
    from tqdm.auto import tqdm

    # thread_independent: the numbers of evaluate.py's forward, on any core count.
    with torch.inference_mode(), thread_independent():
        for image_path in tqdm(inputs, desc="predict", unit="file", disable=len(inputs) < 2):
            try:
                lab, pro = None, typed
                if cfg.labels:
                    lab = companion(cfg.labels, image_path, single, _LABEL_SUFFIXES)
                if cfg.prompts:
                    pro = companion(cfg.prompts, image_path, single, (".json",))
                written += predict_one(model, image_path, settings, out_dir, lab, pro, propagate)
            except (ConfigError, CheckpointError):
                raise
            except Exception as err:
                raise_or_skip(on_error, stem_of(image_path), err, skips, image_path)
    if skips.entries and not written:
        first = skips.entries[0]
        raise DataError(first.path, f"{first.reason} (all {len(skips)} inputs failed)")
    log.info("wrote %d file(s) to %s; %d input(s) skipped", len(written), out_dir, len(skips))
    print(f"predictions in {out_dir}" + (f"; {len(skips)} skipped (skipped.csv)" if skips else ""))
    return written


def predict_overrides(args: list[str]) -> list[str]:
    """``prompt=X`` -> ``strategy=X``: ``prompt`` names the training-prompt config group, so
    Hydra would read ``prompt=everything`` as a group choice; predict's key is ``strategy``."""
    return [f"strategy={a.split('=', 1)[1]}" if a.startswith("prompt=") else a for a in args]


@hydra.main(config_path=config_dir(), config_name="predict", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_own_error(predict)(cfg)


def main() -> None:
    """``python predict.py`` / ``sam-ft-predict`` (``prompt=`` accepted for ``strategy=``)."""
    sys.argv = [sys.argv[0], *predict_overrides(sys.argv[1:])]
    _hydra_main()
