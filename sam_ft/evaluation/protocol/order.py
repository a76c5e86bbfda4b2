"""The one row order of every table: models zero-shot first, prompts S1..S6, jitter numerically.

The engine's CSVs, the summary, the study's tables and the merged ``sam-ft-report`` all sort
with :func:`sort_table`, so the same rows come out in the same order everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from sam_ft.prompts.strategies import STRATEGIES

BASELINE_MODEL = "zero_shot"
PROMPT_ORDER = STRATEGIES
"""S1..S6: the strategies' own order (one vocabulary, defined with the strategies)."""
JITTER_ORDER = ("none", "0-10", "10-20", "20-30")
"""The default levels, in order; any other levels sort by :func:`jitter_key` the same way."""


def rank_by_order(values: pd.Series, order: Sequence[str]) -> pd.Series:
    """Position in ``order``; unknown values after the known ones, alphabetically."""
    known = {v: i for i, v in enumerate(order)}
    extra = sorted(set(values.astype(str)) - set(known))
    known.update({v: len(order) + i for i, v in enumerate(extra)})
    return values.astype(str).map(known)


def jitter_key(name: str) -> tuple:
    """Sort key of a jitter level: ``none`` first, then ``LO-HI`` ranges by (LO, HI) as NUMBERS
    (``0-5 < 5-10 < 10-20``, where text order would put ``10-20`` before ``5-10``); an
    unparsable name last, by text."""
    from sam_ft.prompts.jitter import parse_jitter_name

    try:
        level = parse_jitter_name(str(name))
    except ValueError:
        return (2, 0.0, 0.0, str(name))
    return (0, 0.0, 0.0, "") if level is None else (1, level[0], level[1], "")


def jitter_levels_sorted(values) -> list[str]:
    """The distinct jitter names of ``values`` in :func:`jitter_key` order."""
    return sorted({str(v) for v in values}, key=jitter_key)


def jitter_rank(values: pd.Series) -> pd.Series:
    """Position of each jitter name in :func:`jitter_key` order: the one sort every table uses
    (per_object, per_case, summary, summary.md, the merged report)."""
    order = jitter_levels_sorted(values)
    return values.astype(str).map({v: i for i, v in enumerate(order)})


SORT_KEYS = ("model", "task", "case", "slice", "label", "prompt", "jitter", "click")
"""The canonical row order of the engine's tables (columns a table lacks are left out)."""


def _rank(column: str, values: pd.Series) -> pd.Series:
    """Sort rank of one key column: models and settings zero-shot first then by name, prompts
    S1..S6, jitter levels numerically; ``task``, ``model_size``, ``modality``, ``object`` by
    name; any other column (case, slice, label, click) by its own values."""
    if column in ("model", "setting", "finetune"):
        return rank_by_order(values, (BASELINE_MODEL,))
    if column == "prompt":
        return rank_by_order(values, PROMPT_ORDER)
    if column == "jitter":
        return jitter_rank(values)
    if column in ("task", "model_size", "modality", "object"):
        return rank_by_order(values, ())
    return values


def sort_table(df: pd.DataFrame, by: Sequence[str] = SORT_KEYS) -> pd.DataFrame:
    """``df`` in the one row order every table uses: by the columns of ``by`` that it has, each
    ranked by :func:`_rank` (model zero-shot first, prompt S1..S6, jitter numerically, ...);
    stable, so rows equal on all keys keep their order."""
    keys = pd.DataFrame({c: _rank(c, df[c]) for c in by if c in df}, index=df.index)
    if df.empty or keys.empty:
        return df.reset_index(drop=True)
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return df.loc[order].reset_index(drop=True)
