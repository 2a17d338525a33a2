"""Postprocessing: logits -> clean labels, then back onto the input's own grid.

Steps (labels 0 background, 1 liver parenchyma, 2 tumor):

1. argmax of the logits;
2. the liver region (liver plus tumor) is its largest 26-connected component (given
   the tissue mask, the one with the most voxels in tissue), with holes filled (the
   volume of the other components is reported, see :func:`clean_labels`);
3. tumor is kept only inside that region, with the holes it encloses filled as tumor
   (a necrotic or cystic core is tumor, as LiTS labels it);
4. the two masks (liver region, tumor) are resampled onto the input grid by linear
   interpolation and thresholded at 0.5 (smoother than nearest neighbour), slab by slab
   to bound memory. That trims convex corners, which costs small lesions much of their
   volume on input grids finer than the model's, and can miss them altogether on
   coarser ones, so tumor components under :data:`SMALL_LESION_VOXELS` model voxels are
   then mapped, one by one, keeping their volume on the model grid and at least one
   input voxel (:func:`_map_lesions`). A lesion whose model voxels touch only at
   an edge or a corner can come out of the 0.5 rule in pieces; every lesion, of any
   size, is joined back into one;
5. tumor components (26-connected) smaller than ``min_lesion_ml`` become liver.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .boxes import bounding_box
from .volume import Volume

LIVER, TUMOR = 1, 2
SLAB_VOXELS = 32 * 1024 * 1024
#: Tumor components with fewer model voxels keep their volume when mapped back (for
#: larger ones, linear interpolation at 0.5 loses under 2 %: README).
SMALL_LESION_VOXELS = 1000


def argmax_labels(logits: np.ndarray) -> np.ndarray:
    """(K, Z, Y, X) logits -> (Z, Y, X) uint8 labels."""
    return np.argmax(logits, axis=0).astype(np.uint8)


def largest_component(mask: np.ndarray, counted: Optional[np.ndarray] = None) -> np.ndarray:
    """The largest 26-connected component of a boolean (z, y, x) mask.

    With ``counted`` (a boolean mask of the same shape), the component with the most
    voxels in ``counted`` wins, the larger one on a tie.
    """
    import SimpleITK as sitk

    if not mask.any():
        return mask.copy()
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    relabelled = sitk.GetArrayFromImage(sitk.RelabelComponent(cc, sortByObjectSize=True))  # 1 = largest
    best = 1
    if counted is not None:
        counted = np.asarray(counted, dtype=bool)
        inside = np.bincount(relabelled[counted & mask].ravel(), minlength=int(relabelled.max()) + 1)
        best = int(np.argmax(inside[1:])) + 1 if inside[1:].any() else 1  # argmax: the first = larger on a tie
    return relabelled == best


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill cavities fully enclosed by ``mask`` in 3D."""
    import SimpleITK as sitk

    if not mask.any():
        return mask.copy()
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask.astype(np.uint8)), True, 1)
    return sitk.GetArrayFromImage(filled).astype(bool)


def clean_labels(labels: np.ndarray, tissue: Optional[np.ndarray] = None) -> tuple:
    """Steps 2-3 on the model grid: largest liver region, holes filled, tumor inside
    with its enclosed holes filled. Returns (labels, voxels of the liver-labelled
    components left out): a lobe that looks disconnected at the model's resolution is
    one of them, so the caller reports a large number.

    ``tissue`` (boolean, the model grid's voxels above -500 HU): the liver region is
    then the one with the most voxels in tissue, so that a network's false liver in a
    large frame of air (padding around an oblique scan) cannot win over the real liver.
    """
    found = labels > 0
    region = fill_holes(largest_component(found, tissue))
    left_out = int(np.count_nonzero(found & ~region))
    out = np.zeros(labels.shape, dtype=np.uint8)
    out[region] = LIVER
    out[fill_holes(region & (labels == TUMOR)) & region] = TUMOR
    return out, left_out


def to_input_grid(labels: Volume, reference: Volume, small_lesion_voxels: int = SMALL_LESION_VOXELS) -> np.ndarray:
    """Map model-grid labels onto ``reference``'s grid; returns (z, y, x) uint8.

    Each mask (liver region, tumor) is interpolated linearly and thresholded at 0.5.
    Only the part of the output grid that the labelled voxels can reach is resampled
    (outside it the interpolated masks are 0), one slab at a time so memory stays
    bounded for big inputs. Tumor components (26-connected) of fewer than
    ``small_lesion_voxels`` model voxels are then mapped one at a time keeping their
    model-grid volume, and at least one input voxel (:func:`_map_lesions`); 0
    turns this off. Larger ones that the 0.5 rule left in pieces are joined again, so
    every lesion of the model grid is one lesion of the input grid.
    """
    import SimpleITK as sitk

    if labels.same_grid(reference):
        return np.asarray(labels.array, dtype=np.uint8).copy()
    out = np.zeros(reference.array.shape[:3], dtype=np.uint8)
    src_box = bounding_box(labels.array > 0, margin=1)  # linear interpolation reaches one voxel out
    if src_box is None:
        return out
    crop = labels.array[src_box]
    m_src = labels.ijk_to_lps()
    start = np.array([src_box[2].start, src_box[1].start, src_box[0].start], dtype=np.float64)
    sub = Volume(array=crop, spacing=labels.spacing, origin=tuple(m_src[:3, :3] @ start + m_src[:3, 3]),
                 direction=labels.direction)
    out_box = _reachable_box(sub, reference)
    if out_box is None:
        return out
    region_img = _as_float_image(sub, crop > 0)
    # On finer grids the 0.5 rule trims small lesions; on coarser ones it can miss them
    # altogether (no input voxel centre close enough): both are mended below.
    small = small_components(crop == TUMOR, small_lesion_voxels)
    tumor_img = _as_float_image(sub, crop == TUMOR) if (crop == TUMOR).any() else None
    (z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi) = out_box
    ny, nx = y_hi - y_lo, x_hi - x_lo
    step = max(1, SLAB_VOXELS // max(nx * ny, 1))
    m = reference.ijk_to_lps()
    for z0 in range(z_lo, z_hi, step):
        z1 = min(z0 + step, z_hi)
        ref = sitk.Image([nx, ny, z1 - z0], sitk.sitkUInt8)
        ref.SetSpacing(reference.spacing)
        ref.SetOrigin(tuple(m[:3, :3] @ np.array([x_lo, y_lo, z0], dtype=np.float64) + m[:3, 3]))
        ref.SetDirection(tuple(reference.direction.flatten()))
        region = _resample_mask(region_img, ref)
        slab = region.astype(np.uint8)
        if tumor_img is not None:
            slab[region & _resample_mask(tumor_img, ref)] = TUMOR
        out[z0:z1, y_lo:y_hi, x_lo:x_hi] = slab
    if small.any():
        _map_lesions(small, sub, reference, out)
    large = (crop == TUMOR) & ~small
    if large.any():
        _map_lesions(large, sub, reference, out, keep_volume=False)
    return out


def small_components(mask: np.ndarray, below: int) -> np.ndarray:
    """The 26-connected components of ``mask`` with fewer than ``below`` voxels (labelled
    inside the mask's bounding box)."""
    import SimpleITK as sitk

    out = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask) if below > 0 else None
    if box is None:
        return out
    cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask[box].astype(np.uint8)), True))
    sizes = np.bincount(cc.ravel())
    keep = np.flatnonzero(sizes < below)
    out[box] = np.isin(cc, keep[keep > 0])
    return out


def _map_lesions(small: np.ndarray, geometry: Volume, reference: Volume, out: np.ndarray,
                 keep_volume: bool = True) -> None:
    """Grow each component of ``small`` (on ``geometry``'s grid), already in ``out`` as
    mapped at 0.5, to its model-grid volume (``keep_volume=False``: only join its
    pieces, below).

    A component's volume in input voxels is the volume of the part of its model voxels
    inside the scan, rounded, and at least one voxel when half of it or more is inside.
    It grows from what the 0.5 rule wrote (else from its best voxel) in layers, each
    added voxel touching the lesion's own (26-connected), so that it stays one lesion;
    within a layer, the voxels where its linearly interpolated mask is highest go
    first, ties broken by distance to its centre. Where the mask is 0 on every input
    voxel centre (a lesion between two thick slices), it gets the input voxel holding
    its centroid. Added voxels never touch another lesion, so lesions stay apart: on a
    grid coarser than the model's, a lesion whose only voxels would touch another one is
    left out (two lesions less than about an input voxel apart come out as one). A
    lesion on the liver's surface may add voxels outside the liver region as mapped at
    0.5; they are tumor, hence liver too. A lesion whose model voxels touch only at an
    edge or a corner (one lesion, 26-connected) can map at 0.5 to pieces apart; they are
    joined through the fewest voxels where its mask is above 0, so it stays one lesion,
    a voxel or two above its volume. At 0.5 alone a lesion of one model
    voxel kept about a fifth of its volume on a 0.8 mm grid, and on grids a little
    coarser than the model's most lesions of one to three model voxels were lost.
    On an input grid much coarser than the model's, a lesion smaller than one input
    voxel is one input voxel, so its volume is that voxel's.
    """
    import SimpleITK as sitk

    cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(small.astype(np.uint8)), True))
    m_src, m_ref = geometry.ijk_to_lps(), reference.ijk_to_lps()
    src_to_ref = np.linalg.inv(m_ref) @ m_src
    ratio = float(np.prod(geometry.spacing) / np.prod(reference.spacing))
    size = np.array(reference.shape_xyz, dtype=np.float64)
    half = 0.5 * np.abs(src_to_ref[:3, :3]).sum(axis=1)  # a model voxel's half-extent, in input voxels
    for label in range(1, int(cc.max()) + 1):
        component = cc == label
        box = bounding_box(component, margin=1)
        crop = component[box]
        start = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)
        piece = Volume(array=crop, spacing=geometry.spacing, origin=tuple(m_src[:3, :3] @ start + m_src[:3, 3]),
                       direction=geometry.direction)
        reach = _reachable_box(piece, reference)
        if reach is None:
            continue
        (z0, z1), (y0, y1), (x0, x1) = reach
        ref = sitk.Image([x1 - x0, y1 - y0, z1 - z0], sitk.sitkUInt8)
        ref.SetSpacing(reference.spacing)
        ref.SetOrigin(tuple(m_ref[:3, :3] @ np.array([x0, y0, z0], dtype=np.float64) + m_ref[:3, 3]))
        ref.SetDirection(tuple(reference.direction.flatten()))
        values = sitk.GetArrayFromImage(sitk.Resample(_as_float_image(piece, crop), ref, sitk.Transform(),
                                                      sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        view = out[z0:z1, y0:y1, x0:x1]
        tumor = view == TUMOR
        own = (values >= 0.5) & tumor  # what the 0.5 rule wrote for this lesion
        # the component's model voxel centres, as continuous input (x, y, z) indices
        ijk = np.argwhere(component)[:, ::-1].T.astype(np.float64)
        centres = (src_to_ref[:3, :3] @ ijk + src_to_ref[:3, 3:4]).T
        # the share of each model voxel inside the scan (exact on grids parallel to the model's)
        share = np.prod(np.clip((np.minimum(centres + half, size - 0.5) - np.maximum(centres - half, -0.5))
                                / (2.0 * half), 0.0, 1.0), axis=1)
        inside = float(share.sum())
        least = 1 if inside >= 0.5 * share.size else 0  # a lesion mostly outside the scan may vanish
        missing = max(least, int(round(inside * ratio))) - int(np.count_nonzero(own)) if keep_volume else 0
        free = ~tumor & ~_touching(tumor & ~own)
        passable = (values > 0) & free
        candidates = np.flatnonzero(passable)
        if candidates.size == 0:
            if own.any() or missing <= 0:
                continue
            # no input voxel centre near it: the voxel holding its centroid
            at = np.floor(centres.mean(axis=0) + 0.5).astype(np.int64)
            at = np.clip(at, 0, size.astype(np.int64) - 1) - np.array([x0, y0, z0])
            if np.all(at >= 0) and np.all(at < np.array(view.shape[::-1])) and free[at[2], at[1], at[0]]:
                view[at[2], at[1], at[0]] = TUMOR
            continue
        held = own.copy()
        if missing > 0:
            zyx = np.stack(np.unravel_index(candidates, values.shape), axis=1).astype(np.float64)
            centre = np.argwhere(values >= values.max()).mean(axis=0)
            distance = np.linalg.norm((zyx - centre) * np.asarray(reference.spacing[::-1]), axis=1)
            order = np.lexsort((distance, -values.ravel()[candidates]))  # highest value first, then nearest
            rank = np.full(values.size, values.size, dtype=np.int64)
            rank[candidates[order]] = np.arange(candidates.size)
            allowed = rank.reshape(values.shape) < values.size
            if not held.any():  # nothing at 0.5: start from the best voxel
                held.flat[candidates[order[0]]] = True
                missing -= 1
            while missing > 0:  # layer by layer, so the lesion stays one piece
                layer = np.flatnonzero(_touching(held) & allowed & ~held)
                if layer.size == 0:
                    break
                take = layer[np.argsort(rank[layer], kind="stable")[:missing]]
                held.flat[take] = True
                missing -= take.size
        # model voxels that touch only at an edge or a corner map at 0.5 to pieces apart
        _join_pieces(held, passable, values)
        view[held & ~own] = TUMOR


def _join_pieces(held: np.ndarray, passable: np.ndarray, values: np.ndarray) -> None:
    """Join the 26-connected pieces of ``held`` into one, in place, each through the
    fewest ``passable`` voxels (the highest ``values`` where several chains are as
    short); a piece that no chain of passable voxels reaches stays apart."""
    import SimpleITK as sitk

    while True:
        pieces = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(held.astype(np.uint8)), True))
        if pieces.max() <= 1:
            return
        reached = pieces == 1
        others = pieces > 1
        layers = []
        while True:  # breadth first, a layer of passable voxels at a time
            grown = _touching(reached) & ~reached
            if (grown & others).any():
                break
            layer = grown & passable & ~others
            if not layer.any():
                return  # nothing joins the rest
            layers.append(layer)
            reached |= layer
        # back from a voxel of another piece to the first piece, one layer at a time
        at = tuple(np.argwhere(_touching(reached) & others)[0])
        for layer in reversed(layers):
            z, y, x = at
            window = (slice(max(z - 1, 0), z + 2), slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2))
            near = np.argwhere(layer[window])
            best = near[np.argmax(values[window][tuple(near.T)])]
            at = (window[0].start + best[0], window[1].start + best[1], window[2].start + best[2])
            held[at] = True


def _touching(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one voxel in all 26 directions."""
    padded = np.pad(mask, 1)
    out = np.zeros(mask.shape, dtype=bool)
    nz, ny, nx = mask.shape
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                out |= padded[dz:dz + nz, dy:dy + ny, dx:dx + nx]
    return out


def _reachable_box(source: Volume, reference: Volume):
    """((z0, z1), (y0, y1), (x0, x1)) of ``reference`` voxels inside ``source``'s grid
    extent, grown by one voxel; None when they miss it. The extent reaches half a voxel
    beyond the corner voxel centres, as far as ITK's linear interpolation still returns
    the edge value."""
    nz, ny, nx = source.array.shape[:3]
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, nx - 0.5) for j in (-0.5, ny - 0.5)
                        for k in (-0.5, nz - 0.5)]).T
    to_ref = np.linalg.inv(reference.ijk_to_lps()) @ source.ijk_to_lps()
    ijk = (to_ref @ corners)[:3]
    lo = np.floor(ijk.min(axis=1)).astype(np.int64) - 1
    hi = np.ceil(ijk.max(axis=1)).astype(np.int64) + 2
    size = np.array(reference.shape_xyz)
    lo, hi = np.clip(lo, 0, size), np.clip(hi, 0, size)
    if np.any(hi <= lo):
        return None
    return (int(lo[2]), int(hi[2])), (int(lo[1]), int(hi[1])), (int(lo[0]), int(hi[0]))


def _as_float_image(geometry: Volume, mask: np.ndarray):
    return geometry.with_array(mask.astype(np.float32)).to_sitk()


def _resample_mask(image, reference) -> np.ndarray:
    import SimpleITK as sitk

    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled) >= 0.5


def drop_small_lesions(labels: np.ndarray, voxel_volume_ml: float, min_lesion_ml: float) -> int:
    """Turn tumor components below ``min_lesion_ml`` into liver, in place; returns how many.

    Works inside the tumor's bounding box so big inputs need little extra memory.
    """
    import SimpleITK as sitk

    if min_lesion_ml <= 0:
        return 0
    box = bounding_box(labels == TUMOR)
    if box is None:
        return 0
    crop = labels[box]
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray((crop == TUMOR).astype(np.uint8)), True)
    components = sitk.GetArrayFromImage(cc)
    sizes = np.bincount(components.ravel())
    small = np.flatnonzero(sizes * voxel_volume_ml < min_lesion_ml)
    small = small[small > 0]
    if small.size:
        crop[np.isin(components, small)] = LIVER
    return int(small.size)

