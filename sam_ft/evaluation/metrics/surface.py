"""Surface distances of a prediction to its ground truth: HD95 and NSD, as MONAI and DeepMind.

The numbers of :func:`sam_ft.evaluation.metrics.object_metrics.slice_metrics` for non-empty masks
(see :mod:`sam_ft.evaluation.metrics.object_metrics` for the definitions). MONAI's HD95 and NSD
need, for every surface voxel of each mask, the distance to the nearest surface voxel of the other.
Here they come from scipy's exact Euclidean feature transform, with the distances evaluated exactly
as scipy's ``distance_transform_edt`` does (float64, then float32 like MONAI), but only over
bounding boxes and only where they are needed:

- pred -> GT: one float32 distance map to the GT surface per ground truth, over a box holding
  the GT and the predictions; it is exact at every voxel of the box because the whole GT
  surface lies inside it, so each prediction of the object just looks its surface up.
- GT -> pred: per prediction, a feature transform of its surface over the box of both masks,
  or, for a prediction spread far beyond the GT, over the GT's box grown until every distance
  that matters is certain (see :meth:`GtSurface.gt_to_pred`).

scipy's transform costs about 60 bytes per voxel in 3D with its distances; here the map keeps
4 (float32) and is built from the 12-byte feature transform a slab at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.spatial import cKDTree

from sam_ft.evaluation.metrics.overlap import (
    conformity,
    dice_from_counts,
    empty_rule,
    iou_from_counts,
)


class GtSurface:
    """One ground-truth mask's side of the metrics, computed once and shared by its predictions.

    Args:
        gt: bool ground truth, (H, W) indexed (row, col) or (D, H, W) indexed (slice, row, col).
        spacing: voxel spacing in mm, in the same axis order.
        tol: NSD tolerance in mm.
        nsd_method: ``area`` (DeepMind's surface Dice) or ``count`` (surface voxels).
    """

    def __init__(
        self, gt: np.ndarray, spacing: Sequence[float], tol: float, nsd_method: str
    ) -> None:
        self.gt = gt
        self.nsd_method = nsd_method
        self.shape = np.array(gt.shape)
        self.sampling = tuple(float(s) for s in spacing)
        self.tol = tol
        self.count = int(np.count_nonzero(gt))
        self._map: np.ndarray | None = None  # float32 distance (mm) to the GT surface
        self._map_lo = self._map_hi = self.shape  # inclusive corners of the map's box
        self._surfels: _Surfels | None = None  # the area-based NSD's GT side, built once
        if self.count == 0:
            return
        self.lo, self.hi = _bbox(gt)
        self.box = _box(self.lo, self.hi)
        # The GT is all background outside its box, so the surface is found within the box.
        self.edge = _surface(gt[self.box])
        # (ndim, K) array coordinates of the K GT surface voxels.
        self.points = np.stack(np.nonzero(self.edge)) + self.lo[:, None]
        self.ranks = _quantile_ranks(self.points.shape[1])

    def cover(self, preds: np.ndarray) -> None:
        """Build the distance map once over the box of the GT and all ``preds`` (N, *gt.shape)."""
        if self.count == 0 or len(preds) == 0:
            return
        union = np.logical_or.reduce(preds, axis=0)
        if union.any():
            lo, hi = _bbox(union)
            self._build(np.minimum(lo, self.lo), np.maximum(hi, self.hi))

    def score(self, pred: np.ndarray) -> dict:
        """All metrics of one bool prediction of the GT's shape (module table for empty masks)."""
        n_pred = int(np.count_nonzero(pred))
        if n_pred == 0 or self.count == 0:
            return empty_rule(n_pred == 0, self.count == 0)
        inter = int(np.count_nonzero(pred[self.box] & self.gt[self.box]))
        total = n_pred + self.count
        lo, hi = _bbox(pred)
        p_edge = _surface(pred[_box(lo, hi)])  # in the prediction's box, corner ``lo``
        d_pg = self.pred_to_gt(p_edge, lo)
        d_gp = self.gt_to_pred(p_edge, lo)
        # float32 tolerance, as MONAI compares its float32 distances with it.
        tol = np.float32(self.tol)
        if self.nsd_method == "area":
            nsd = _area_nsd(pred, lo, hi, self)
        else:
            within = np.count_nonzero(d_pg <= tol) + np.count_nonzero(d_gp <= tol)
            nsd = within / (d_pg.size + d_gp.size)
        dice = float(dice_from_counts(inter, total))
        return {
            "dice": dice,
            "iou": float(iou_from_counts(inter, total)),
            "hd95": float(max(_quantile95(d_pg), _quantile95(d_gp, self.ranks))),
            "hd": float(max(d_pg.max(), d_gp.max())),
            # Directed, prediction surface -> GT surface, as the official asd(result, reference)
            # and MONAI's compute_average_surface_distance(symmetric=False).
            "asd": float(d_pg.mean(dtype=np.float64)),
            "nsd": nsd,
            "conformity": float(conformity(dice)),
            "empty_pred": False,
            "empty_gt": False,
            "hd95_missing": False,
        }

    def pred_to_gt(self, p_edge: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """(M,) float32 distances (mm) from the M voxels of ``p_edge`` to the GT surface.

        ``p_edge`` is a bool array whose [0, ..., 0] voxel sits at array index ``lo``.
        """
        hi = lo + np.array(p_edge.shape) - 1
        if self._map is None or (lo < self._map_lo).any() or (hi > self._map_hi).any():
            self._grow(lo, hi)
        near = self._map[_box(lo - self._map_lo, hi - self._map_lo)]
        # np.compress on flat arrays: the values of near[p_edge] (C order), several times faster.
        return np.compress(p_edge.ravel(), near.ravel())

    def gt_to_pred(self, p_edge: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """(K,) float32 distances (mm) from each GT surface voxel to the nearest ``p_edge`` voxel.

        ``p_edge`` is a bool array whose [0, ..., 0] voxel sits at array index ``lo``. The
        feature transform of ``p_edge`` is exact over any window holding all of ``p_edge``, such
        as the box of the GT and the prediction: that box serves a prediction hugging the GT.
        A prediction spread far from it (noise all over the image, a stray blob) would make that
        box large, so it gets the GT's box grown by ``radius`` mm on every side instead (a
        per-axis number of voxels): a voxel outside that window is more than ``radius`` from
        every GT voxel, so each distance found up to ``radius`` is exact and each one beyond it
        stands for a true distance beyond it too. That is enough once the two order statistics
        HD95 interpolates and the NSD count are certain; otherwise the radius grows.
        """
        hi = lo + np.array(p_edge.shape) - 1
        union_lo, union_hi = np.minimum(lo, self.lo), np.maximum(hi, self.hi)
        union_size = int(np.prod(union_hi - union_lo + 1))
        spacing = np.array(self.sampling)
        # NSD is certain once the radius exceeds the tolerance: any distance left uncertain
        # (beyond the radius) is then beyond the tolerance too, in float32 as well.
        nsd_safe = self.tol * (1 + 1e-6)
        radius = max(nsd_safe, 4.0 * float(spacing.min()))
        above = self.ranks[1]
        while True:
            margin = np.floor(radius / spacing).astype(np.int64) + 1
            w_lo = np.maximum(self.lo - margin, 0)
            w_hi = np.minimum(self.hi + margin, self.shape - 1)
            exact = bool((w_lo <= lo).all() and (w_hi >= hi).all())
            # A window that may fail costs about as much as the union box that cannot.
            if not exact and union_size <= 2 * np.prod(w_hi - w_lo + 1):
                w_lo, w_hi, exact = union_lo, union_hi, True
            near = np.zeros(w_hi - w_lo + 1, dtype=bool)
            a, b = np.maximum(lo, w_lo), np.minimum(hi, w_hi)
            if (a <= b).all():
                near[_box(a - w_lo, b - w_lo)] = p_edge[_box(a - lo, b - lo)]
                if near.any():
                    ft = distance_transform_edt(
                        ~near, sampling=self.sampling, return_distances=False, return_indices=True
                    )
                    d = _feature_distances(ft, self.points - w_lo[:, None], self.sampling)
                    certain = np.count_nonzero(d <= radius)
                    if exact or certain == d.size or (certain > above and radius >= nsd_safe):
                        return d.astype(np.float32)
            radius *= 4.0

    def _grow(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Rebuild the distance map over a box holding the current one and ``lo``..``hi``."""
        if self._map is None:
            self._build(np.minimum(lo, self.lo), np.maximum(hi, self.hi))
            return
        new_lo = np.minimum(lo, self._map_lo)
        new_hi = np.maximum(hi, self._map_hi)
        # Predictions of one object spread by a few voxels; growing a side by an eighth more
        # than needed keeps the rebuilds of a batch to one or two.
        extra = (new_hi - new_lo + 1) // 8
        new_lo = np.where(new_lo < self._map_lo, np.maximum(new_lo - extra, 0), new_lo)
        new_hi = np.where(new_hi > self._map_hi, np.minimum(new_hi + extra, self.shape - 1), new_hi)
        self._build(new_lo, new_hi)

    def _build(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Distance map (float32, mm) to the GT surface over the box ``lo``..``hi`` (inclusive)."""
        self._map = None  # free the old map before the new one is made
        edge = np.zeros(hi - lo + 1, dtype=bool)
        edge[_box(self.lo - lo, self.hi - lo)] = self.edge
        self._map = _distance_map(edge, self.sampling)
        self._map_lo, self._map_hi = lo, hi


@functools.lru_cache(maxsize=64)
def _measure_table(spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(area or length per neighbour code (2^(2^d),) float64, code weight per corner offset
    (2,)*d int) for a voxel spacing: MONAI's copy of DeepMind's lookup tables."""
    from monai.metrics.utils import get_code_to_measure_table

    table, kernel = get_code_to_measure_table(spacing)
    weights = kernel.reshape((2,) * len(spacing)).cpu().numpy().astype(np.int64)
    return table.cpu().numpy().astype(np.float64), weights


def _surfel_points(
    mask: np.ndarray, lo: np.ndarray, hi: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Surface elements of a bool mask whose foreground lies in box ``lo``..``hi``.

    As DeepMind's ``compute_surface_distances``: each corner of the voxel grid gets the code of
    its 2^d neighbouring voxels (a local binary pattern); corners with a mixed neighbourhood are
    surface elements, with the area (3D) or contour length (2D) the lookup table gives their
    code. Corner c of an axis lies between voxels c - 1 and c, the same grid for every mask.

    Returns:
        ((K, ndim) int64 corner indices, (K,) float64 areas or lengths in mm).
    """
    table, weights = _measure_table(spacing)
    crop = mask[_box(lo, hi)]
    padded = np.pad(crop, 1).view(np.uint8)
    out_shape = tuple(n + 1 for n in crop.shape)
    code = np.zeros(out_shape, dtype=np.uint8)  # codes < 2^(2^d) <= 256
    for offset in np.ndindex(*weights.shape):
        window = tuple(slice(o, o + n) for o, n in zip(offset, out_shape, strict=True))
        code += padded[window] * np.uint8(weights[offset])
    full = len(table) - 1
    corners = np.nonzero((code != 0) & (code != full))
    return np.stack(corners, axis=-1) + lo, table[code[corners]]


class _Surfels:
    """Surface-element corners of one mask, their areas, and what finds the nearest ones fast:
    the sorted linear indices of the corners (exact matches) and a k-d tree (the rest).

    Args:
        corners: (K, ndim) int corner indices on the grid of ``grid`` corners per axis.
        areas: (K,) areas (3D) or lengths (2D) in mm.
        spacing: voxel spacing in mm.
        grid: corners per axis (the mask's shape + 1), for the linear indices.
    """

    def __init__(
        self,
        corners: np.ndarray,
        areas: np.ndarray,
        spacing: tuple[float, ...],
        grid: Sequence[int],
    ) -> None:
        self.corners = corners
        self.areas = areas
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.keys = np.ravel_multi_index(tuple(corners.T), tuple(grid)) if len(corners) else None
        self.sorted_keys = np.sort(self.keys) if self.keys is not None else None
        self._tree: cKDTree | None = None

    @property
    def tree(self) -> cKDTree:
        if self._tree is None:
            self._tree = cKDTree(self.corners * self.spacing)
        return self._tree

    def area_within(self, other: _Surfels, tol: float) -> float:
        """Total area of ``other``'s elements lying within ``tol`` mm of this surface.

        An element on a corner this surface also has is at distance 0 (most of them when the
        two surfaces overlap). For the others the tree finds the nearest corner here, searching
        only a hair beyond the tolerance; its distance is then recomputed from the integer
        corner offsets exactly as scipy's distance transform (``(di * spacing)^2`` summed,
        float64), so a distance equal to the tolerance on the voxel grid is within it, as in
        DeepMind's code.
        """
        if other.keys is None or self.keys is None:
            return 0.0
        pos = np.searchsorted(self.sorted_keys, other.keys)
        same = self.sorted_keys[np.minimum(pos, len(self.sorted_keys) - 1)] == other.keys
        within = float(other.areas[same].sum())
        rest = ~same
        if not rest.any():
            return within
        corners, areas = other.corners[rest], other.areas[rest]
        bound = tol * (1 + 1e-6) + 1e-9
        d, index = self.tree.query(corners * self.spacing, k=1, distance_upper_bound=bound)
        found = np.isfinite(d)
        diff = (self.corners[index[found]] - corners[found]).astype(np.float64)
        diff *= self.spacing
        exact = np.sqrt((diff * diff).sum(axis=1))
        return within + float(areas[found][exact <= tol].sum())


def _area_nsd(pred: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: GtSurface) -> float:
    """DeepMind's surface Dice of a non-empty prediction (foreground in box ``lo``..``hi``)
    against ``target``'s non-empty ground truth.

    As ``surface_distance.compute_surface_distances``: surface elements on the grid of voxel
    corners from the 2^d neighbour codes, each with its area (3D) or length (2D); distances are
    Euclidean in mm between element corners. Only whether a distance is within the tolerance
    matters, so nearest neighbours come from k-d trees of the surface corners searched up to the
    tolerance (the ground truth's tree is built once for all its predictions) instead of two
    distance transforms over the box of both masks. Returns (GT area within tol of the
    prediction's surface + prediction area within tol of the GT's) / (total area of both).
    """
    spacing = target.sampling
    grid = target.shape + 1
    if target._surfels is None:
        target._surfels = _Surfels(
            *_surfel_points(target.gt, target.lo, target.hi, spacing), spacing, grid
        )
    gt = target._surfels
    corners, areas = _surfel_points(pred, lo, hi, spacing)
    total = gt.areas.sum() + areas.sum()
    if total <= 0:
        return 0.0
    # Only prediction elements near the GT's box can lie within the tolerance of its surface:
    # the others (noise far away) count in the total area but need no search.
    margin = np.floor(target.tol / np.asarray(spacing)).astype(np.int64) + 1
    w_lo, w_hi = target.lo - margin, target.hi + 1 + margin
    near = np.all((corners >= w_lo) & (corners <= w_hi), axis=1)
    pr = _Surfels(corners[near], areas[near], spacing, grid)
    within = gt.area_within(pr, target.tol) + pr.area_within(gt, target.tol)
    return float(within / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour in the background or beyond the array.

    Equals ``mask & ~binary_erosion(mask)`` (face connectivity, border value 0), as MONAI finds
    edges, at a fraction of the cost: the erosion is the AND of the mask shifted by one voxel
    along each axis both ways.
    """
    inner = mask.copy()
    for axis in range(mask.ndim):
        below = _along(mask.ndim, axis, slice(None, -1))
        above = _along(mask.ndim, axis, slice(1, None))
        np.logical_and(inner[below], mask[above], out=inner[below])
        np.logical_and(inner[above], mask[below], out=inner[above])
        inner[_along(mask.ndim, axis, 0)] = False
        inner[_along(mask.ndim, axis, -1)] = False
    return np.logical_xor(mask, inner, out=inner)  # inner lies within mask: mask & ~inner


def _along(ndim: int, axis: int, index: slice | int) -> tuple:
    return (slice(None),) * axis + (index,) + (slice(None),) * (ndim - axis - 1)


def _box(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
    """Index of the box with inclusive corners ``lo`` and ``hi``."""
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): first and last index of a non-empty mask's foreground along each axis.

    Axis by axis: the foreground's extent along the leading axis, then the mask cropped to it
    and collapsed along that axis, so each step reads less than the last.
    """
    lo, hi = [], []
    m = mask
    while True:
        lead = m.reshape(len(m), -1).any(axis=1) if m.ndim > 1 else m
        idx = np.flatnonzero(lead)
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
        if m.ndim == 1:
            return np.array(lo), np.array(hi)
        m = np.logical_or.reduce(m[idx[0] : idx[-1] + 1], axis=0)


def _distance_map(feature: np.ndarray, sampling: tuple[float, ...]) -> np.ndarray:
    """float32 distance (mm) from every voxel to the nearest True voxel of ``feature``.

    The values of ``distance_transform_edt(~feature, sampling).astype(np.float32)``, from the
    same feature transform, but evaluated a slab of leading-axis planes at a time: peak memory
    is the int32 transform plus the result, instead of about 60 bytes per voxel in 3D.
    """
    ft = distance_transform_edt(
        ~feature, sampling=sampling, return_distances=False, return_indices=True
    )
    out = np.empty(feature.shape, dtype=np.float32)
    plane = int(np.prod(feature.shape[1:]))
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    # Open per-axis index grids, broadcasting against a slab as np.indices would.
    grid = [
        np.arange(n, dtype=np.int32).reshape([n if i == a else 1 for i in range(feature.ndim)])
        for a, n in enumerate(feature.shape)
    ]
    for start in range(0, feature.shape[0], step):
        stop = min(start + step, feature.shape[0])
        coords = [grid[0][start:stop], *grid[1:]]
        out[start:stop] = _feature_distances(ft[:, start:stop], coords, sampling)
    return out


_SLAB_VOXELS = 1 << 21  # voxels per slab of _distance_map: a few 16 MB float64 temporaries


def _feature_distances(
    ft: np.ndarray, coords: np.ndarray | list[np.ndarray], sampling: tuple[float, ...]
) -> np.ndarray:
    """float64 distance (mm) from voxels at ``coords`` to their nearest feature ``ft[:, voxel]``.

    ``ft`` holds one nearest-feature index per axis (leading axis), either over a box (then
    ``coords`` are broadcastable per-axis index grids) or gathered at points (then ``coords`` is
    an (ndim, M) integer array and ``ft`` is a whole-box transform indexed there). The arithmetic
    is scipy's ``distance_transform_edt`` step for step, so the values are bit-identical.
    """
    if isinstance(coords, np.ndarray):
        ft = ft[(slice(None), *coords)]
    total = None
    for axis, step in enumerate(sampling):
        d = (ft[axis] - coords[axis]).astype(np.float64)
        d *= step
        np.multiply(d, d, out=d)
        total = d if total is None else np.add(total, d, out=total)
    return np.sqrt(total, out=total)


def _quantile_ranks(n: int) -> tuple[int, int, float]:
    """Indices below/above and weight of the 0.95 quantile of ``n`` sorted values, as torch does.

    ``torch.quantile`` on float32 takes the rank ``q * (n - 1)`` in float64 from the float32
    ``q``, its floor and ceiling as the indices and the fraction as the interpolation weight.
    """
    rank = float(np.float32(0.95)) * (n - 1)
    below, above = math.floor(rank), math.ceil(rank)
    return below, above, rank - below


def _quantile95(d: np.ndarray, ranks: tuple[int, int, float] | None = None) -> np.float32:
    """``torch.quantile(torch.from_numpy(d), 0.95)`` of non-empty float32 ``d``, bit for bit.

    The two order statistics come from a selection (``np.partition``, linear time) instead of
    torch's sort; the interpolation between them is torch's ``lerp`` with a float64 weight: the
    difference of the end points in float32, the rest in float64, rounded to float32.
    ``tests/test_metrics.py`` checks the two agree on the installed torch.
    """
    below, above, weight = ranks if ranks is not None else _quantile_ranks(d.size)
    part = np.partition(d, (below, above)) if above != below else np.partition(d, below)
    lo, hi = part[below], part[above]
    step = float(hi - lo)  # float32 subtraction, as torch's lerp takes it
    # torch's lerp anchors the formula at the end point nearer the weight.
    value = float(lo) + weight * step if weight < 0.5 else float(hi) - step * (1.0 - weight)
    return np.float32(value)
