"""Defaults live in one place, the YAML: the Python paths that build a config group without Hydra
(``task_options``, ``data_options``, ``eval_options``, ``SliceAugment``) read theirs from it."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import shutil
import types
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

import sam_ft
from sam_ft.config import parse_config
from sam_ft.data.augment import SliceAugment
from sam_ft.data.tasks import data_options, task_options
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.prompts.jitter import jitter_levels

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _yaml(path: Path) -> dict:
    """The file as written (PyYAML, independent of the loader under test)."""
    return yaml.safe_load(path.read_text())


def test_python_fallbacks_equal_the_yaml():
    data = _yaml(CONF / "data" / "default.yaml")
    seed = _yaml(CONF / "train.yaml")["seed"]
    # Values only a Hydra run knows: ${seed} -> train.yaml's seed, ${paths...} and ??? -> None.
    assert data["seed"] == "${seed}" and data["cache_dir"].startswith("${paths.")
    assert data_options({}) == {**data, "seed": seed, "cache_dir": None}

    task = _yaml(CONF / "task" / "folder.yaml")
    assert task["root"] == "???"
    # The name is the root's folder name (a resolver); with no root, "folder".
    assert task["name"].startswith("${sam_ft.folder_name:")
    assert task_options({}) == {**task, "root": None, "name": "folder"}
    assert task_options({"root": "/data/Task02_Heart"})["name"] == "Task02_Heart"
    assert task_options({})["intensity"]["keep_zero"] is True  # the study's rule, now in the YAML

    assert SliceAugment({}).cfg == data["augment"]
    assert {"elastic_alpha", "elastic_sigma"} <= set(data["augment"])

    ev = _yaml(CONF / "eval" / "default.yaml")
    opts = eval_options({})
    assert opts.prompts == tuple(ev["prompts"]) and opts.levels == tuple(
        jitter_levels(ev["jitter_px"])
    )
    for key in ("mask_selection", "point_sampling", "nsd_tolerance_mm", "nsd_method", "clicks"):
        assert getattr(opts, key) == ev[key], key
    for key in ("save_predictions", "max_prompts_per_call", "overlays", "volume_gt"):
        assert getattr(opts, key) == ev[key], key
    assert opts.grid == ev["grid"]
    # Bad files follow data.on_error (one key for loading and scoring), whose default is raise.
    assert "on_error" not in ev and opts.on_error == data["on_error"] == "raise"
    for key, value in ev["everything"].items():
        assert getattr(opts.everything, key) == value, key


def test_changing_the_yaml_changes_the_python_defaults(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    edits = {
        ("data", "default"): {"min_object_pixels": 77, "affine_atol": 0.5},
        ("task", "folder"): {"images_dir": "scans", "slice_axis": 1},
        ("eval", "default"): {"grid": 12, "mask_selection": "single", "overlays": 3},
    }
    for (group, name), values in edits.items():
        path = conf / group / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**_yaml(path), **values}))
    data_path = conf / "data" / "default.yaml"
    data = _yaml(data_path)
    data["augment"].update(hflip_p=0.25, elastic_sigma=3.5)
    data_path.write_text(yaml.safe_dump(data))
    train_path = conf / "train.yaml"
    train_path.write_text(train_path.read_text().replace("seed: 42", "seed: 7"))
    monkeypatch.setenv("SAM_FT_CONFIG_DIR", str(conf))

    dopts = data_options({})
    assert dopts["min_object_pixels"] == 77 and dopts["affine_atol"] == 0.5 and dopts["seed"] == 7
    topts = task_options({"root": "/x"})
    assert topts["images_dir"] == "scans" and topts["slice_axis"] == 1
    eopts = eval_options({})
    assert eopts.grid == 12 and eopts.mask_selection == "single"
    assert eopts.overlays == 3
    aug = SliceAugment({"enabled": True})
    assert aug.cfg["hflip_p"] == 0.25 and aug.cfg["elastic_sigma"] == 3.5
    # A caller's value still wins over the YAML.
    assert data_options({"min_object_pixels": 5})["min_object_pixels"] == 5


def _yaml_values() -> dict[str, list[tuple[str, object]]]:
    """Every key of every file under conf/ -> [(where, value)], by the key's own name (a
    parameter is named by the leaf: ``eval.everything.grid`` -> ``grid``). Values that say
    "nothing" or "decided per run" (null, [], ``???``, ``${...}``) are no copyable value."""
    found: dict[str, list[tuple[str, object]]] = {}

    def walk(node: object, where: str, path: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            key = str(key)
            if key.startswith("_") or (key == "defaults" and isinstance(value, list)):
                continue  # Hydra's _target_/_partial_ and defaults lists
            dotted = f"{path}{key}"
            if _is_value(value):
                found.setdefault(key, []).append((f"conf/{where} {dotted}", value))
            walk(value, where, dotted + ".")

    for path in sorted(CONF.rglob("*.yaml")):
        walk(_yaml(path), str(path.relative_to(CONF)), "")
    return found


def _is_value(value: object) -> bool:
    if value is None or (isinstance(value, str | list | tuple | dict) and not value):
        return False
    return not (isinstance(value, str) and ("${" in value or value == "???"))


def _same(a: object, b: object) -> bool:
    """YAML-equal: bools only equal bools, 4 equals 4.0, a tuple equals a list."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, str | dict) and type(a) is type(b):
        return a == b
    return False


def _defaults(module: types.ModuleType):
    """(qualified name, parameter or field, default) of every function, method and dataclass
    field defined in ``module`` (not those it imports)."""
    for obj in vars(module).values():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield from _parameters(obj)
        elif inspect.isclass(obj):
            for name, member in vars(obj).items():
                member = getattr(member, "__func__", member)  # staticmethod, classmethod
                if name == "__init__" and dataclasses.is_dataclass(obj):
                    continue  # its fields, below
                if inspect.isfunction(member):
                    yield from _parameters(member)
            if dataclasses.is_dataclass(obj):
                for f in dataclasses.fields(obj):
                    if f.default is not dataclasses.MISSING:
                        yield obj.__qualname__, f.name, f.default
                    elif f.default_factory is not dataclasses.MISSING:
                        yield obj.__qualname__, f.name, f.default_factory()


def _parameters(function):
    for p in inspect.signature(function).parameters.values():
        if p.default is not p.empty:
            yield function.__qualname__, p.name, p.default


def _fallbacks(module: types.ModuleType):
    """(enclosing function, key, fallback) of each ``x.get("key", CONSTANT)`` and
    ``getattr(x, "key", CONSTANT)`` in the module's source: a default read in the code."""
    if not getattr(module, "__file__", None):
        return []
    tree = ast.parse(Path(module.__file__).read_text())
    stack: list[str] = []

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node):
            stack.append(node.name)
            self.generic_visit(node)
            stack.pop()

        visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

        def visit_Call(self, node):
            args = node.args
            if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and len(args) == 2:
                key, fallback = args
            elif isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(args) == 3:
                key, fallback = args[1:]
            else:
                key = fallback = None
            if isinstance(key, ast.Constant) and isinstance(fallback, ast.Constant):
                yield_.append((".".join(stack) or "<module>", str(key.value), fallback.value))
            self.generic_visit(node)

    yield_: list[tuple[str, str, object]] = []
    Visitor().visit(tree)
    return yield_


def _copies(module: types.ModuleType, values: dict) -> list[tuple[str, str, str]]:
    """(owner, key, message) of each default in ``module`` that equals a YAML value of its key."""
    out = []
    found = [(o, k, d, "=") for o, k, d in _defaults(module)]
    found += [(o, k, d, " fallback ") for o, k, d in _fallbacks(module)]
    for owner, key, default, how in found:
        if (module.__name__, owner, key) in ALLOWED:
            continue
        for where, value in values.get(key, ()):
            if _is_value(default) and _same(default, value):
                message = f"{module.__name__}.{owner}: {key}{how}{default!r} copies {where}"
                out.append((owner, key, message))
                break
    return out


# Defaults that equal a YAML value for another reason than copying it (keep this tiny).
ALLOWED = {
    # The synthetic demo's own random generator (each function's seed=0), not a run's `seed`;
    # it only shares its name and value with eval.bootstrap.seed.
    **{("sam_ft.data.demo", f, "seed"): "demo generator" for f in (
        "make_demo_case", "make_demo_2d_case", "is_complete", "generate_demo", "ensure_demo")},
    # The architecture table is the source of these facts (a row states only what differs from
    # SAM ViT's); conf/model/<name>.yaml restates them for the data pipeline and reports, and
    # test_model_yamls_agree_with_the_architecture_table holds every file to its row.
    **{("sam_ft.model.specs", "SamSpec", k): "architecture table" for k in (
        "image_size", "preprocess", "multimask_output")},
}  # fmt: skip


def _sam_ft_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(sam_ft.__path__, "sam_ft."))


def test_no_python_default_copies_a_yaml_value():
    """A default of a function, method or dataclass field named like a key of conf/ and equal to
    its YAML value is a second copy of that default: the caller passes the typed config's value.
    Every module of the package is imported (an import error fails the test too)."""
    values = _yaml_values()
    copies = []
    for name in _sam_ft_modules():
        copies += [message for _, _, message in _copies(importlib.import_module(name), values)]
    assert not copies, "Python defaults copying the YAML:\n" + "\n".join(copies)


def test_model_yamls_agree_with_the_architecture_table():
    """Each conf/model/<name>.yaml names a row of ``sam_ft.model.specs.SPECS`` and restates its
    input side, preprocessing and mask outputs as the row says."""
    from sam_ft.model.specs import SPECS

    files = {p.stem: _yaml(p) for p in (CONF / "model").glob("*.yaml")}
    assert set(files) == set(SPECS)
    for stem, cfg in files.items():
        spec = SPECS[cfg["name"]]
        assert cfg["name"] == stem
        for key in ("image_size", "preprocess", "multimask_output"):
            assert _same(cfg[key], getattr(spec, key)), (stem, key, cfg[key])


def test_the_defaults_guard_finds_a_planted_copy():
    """The guard sees a signature, a method's, a dataclass field's and a nested key's copy, and
    not a different value, a None or a parameter no key is named after."""
    module = types.ModuleType("planted")

    def build(grid=32, min_object_pixels=49, checkpoint=None, unrelated=50):
        pass

    class Loss:
        def __init__(self, kind="focal_dice", ce_weight=2.0):
            pass

    @dataclasses.dataclass
    class Options:
        pred_iou_thresh: float = 0.88
        mask_selection: str = "single"

    for obj in (build, Loss, Options):
        obj.__module__ = "planted"
        setattr(module, obj.__name__, obj)
    found = [message for _, _, message in _copies(module, _yaml_values())]
    assert len(found) == 3, found
    assert found[0].endswith("<locals>.build: grid=32 copies conf/eval/default.yaml grid")
    assert "Loss.__init__: kind='focal_dice' copies conf/loss/focal_dice.yaml kind" in found[1]
    assert "Options: pred_iou_thresh=0.88 copies conf/" in found[2]
    assert "everything.pred_iou_thresh" in found[2]


def test_elastic_options_are_ordinary_overrides(tmp_path):
    """Declared in the YAML, so Hydra takes them without ``+`` and the parse checks them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            ["task=demo", f"paths.data_dir={tmp_path}", "data.augment.elastic_sigma=4.0"],
        )
    run = parse_config(cfg, "train")
    assert run.data.augment["elastic_sigma"] == 4.0 and run.data.augment["elastic_alpha"] == 30.0
