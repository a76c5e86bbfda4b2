"""Best / worst overlays, persisted so that a resumed run shows the same ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sam_ft.atomic import atomic_write


class OverlayPool:
    """The ``k`` best and ``k`` worst objects seen so far (ties by case, slice, label)."""

    def __init__(self, path: Path, k: int) -> None:
        self.path, self.k = path, k
        self.items: dict[tuple, dict] = {}
        if k > 0 and path.exists():
            with np.load(path, allow_pickle=False) as z:
                for i, meta in enumerate(json.loads(str(z["meta"]))):
                    item = {**meta, "image": z[f"image{i}"], "gt": z[f"gt{i}"]}
                    item["pred"], item["box"] = z[f"pred{i}"], z[f"box{i}"]
                    self.items[self._key(item)] = item

    @staticmethod
    def _key(item: dict) -> tuple:
        return (item["case"], item["slice"], item["label"])

    def _ranked(self, best: bool) -> list[dict]:
        items = sorted(self.items.values(), key=self._key)
        return sorted(items, key=lambda it: -it["dice"] if best else it["dice"])[: self.k]

    def offer(self, candidates: list[dict]) -> None:
        if self.k <= 0 or not candidates:
            return
        for item in candidates:
            self.items[self._key(item)] = item
        keep = {self._key(it) for it in self._ranked(True) + self._ranked(False)}
        self.items = {key: it for key, it in self.items.items() if key in keep}
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        arrays, meta = {}, []
        for i, item in enumerate(self.items.values()):
            meta.append({c: item[c] for c in ("case", "slice", "label", "name", "dice")})
            arrays.update(
                {
                    f"image{i}": item["image"],
                    f"gt{i}": item["gt"],
                    f"pred{i}": item["pred"],
                    f"box{i}": np.asarray(item["box"], dtype=np.float64),
                }
            )
        atomic_write(
            self.path, lambda f: np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
        )

    def grids(self) -> tuple[list, list]:
        """(best, worst) as ``plots.OverlayItem`` tuples."""

        def as_item(it: dict) -> tuple:
            title = f"{it['case']} s{it['slice']} {it['name']}: Dice {it['dice']:.3f}"
            return it["image"], it["gt"], it["pred"], {"box": it["box"]}, title

        return [as_item(i) for i in self._ranked(True)], [as_item(i) for i in self._ranked(False)]


# --------------------------------------------------------------------------------------------
