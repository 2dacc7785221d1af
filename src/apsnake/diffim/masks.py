"""The mask of a difference image, built from the science and template masks.

The difference mask is the science mask OR the template planes: ``NO_DATA``, ``BAD`` and
``HIGH_VARIANCE`` keep their names (as in Rubin: HIGH_VARIANCE only comes from templates),
``DETECTED`` and ``DETECTED_NEGATIVE`` are dropped, every other plane ``P`` becomes
``P_TEMPLATE`` (``SAT`` -> ``SAT_TEMPLATE``). Planes of the convolved image are grown by the
kernel half-width (a convolved pixel takes the OR of the masks under the kernel, as afw
does). Pixels within that distance of the border get ``EDGE``.
"""

from __future__ import annotations

import numpy as np

from apsnake.exposure import Exposure, add_mask_plane
from apsnake.numerics import grow_bits

_TEMPLATE_PLANES_KEPT = ("NO_DATA", "BAD", "HIGH_VARIANCE")  # template planes keeping their name


def _map_template_mask(template: Exposure, planes: dict, tmask: np.ndarray | None = None) -> np.ndarray | None:
    """Template mask bits (``tmask``, default the template's mask, in its plane numbering) mapped
    to difference planes (NO_DATA, BAD, HIGH_VARIANCE kept; DETECTED* dropped; others renamed
    ``<PLANE>_TEMPLATE``, added to ``planes``). Returns the mapped int32 mask, None when no bit
    maps. The map acts on each bit alone, so it commutes with growing the mask."""
    tmask = np.asarray(template.mask if tmask is None else tmask, np.int32)
    present = int(np.bitwise_or.reduce(tmask.ravel())) if tmask.size else 0
    lut = np.zeros(1 << 16, np.int32)
    lut_hi = np.zeros(1 << 16, np.int32)
    any_hi = False
    for name, bit in template.mask_planes.items():
        if not present & (1 << bit) or name in ("DETECTED", "DETECTED_NEGATIVE"):
            continue
        target = name if name in _TEMPLATE_PLANES_KEPT else f"{name}_TEMPLATE"
        value = add_mask_plane(planes, target)
        table = lut if bit < 16 else lut_hi
        any_hi |= bit >= 16
        idx = np.arange(1 << 16)
        table[(idx >> (bit % 16)) & 1 == 1] |= np.int32(value)
    if not (lut.any() or lut_hi.any()):
        return None
    mapped = lut[tmask & 0xFFFF]
    if any_hi:
        mapped |= lut_hi[(tmask >> 16) & 0xFFFF]
    return mapped


def kernel_footprint_radius(kernel: np.ndarray, fraction: float) -> int:
    """Half-width (px) of the smallest centred square holding ``fraction`` of the kernel's
    absolute weight: how far a masked pixel's influence reaches through the convolution."""
    weight = np.abs(np.asarray(kernel, float))
    h = kernel.shape[-1] // 2
    total = weight.sum()
    if not total > 0:
        return h
    for r in range(h + 1):
        if weight[h - r:h + r + 1, h - r:h + r + 1].sum() >= fraction * total:
            return r
    return h


def mark_edge(mask: np.ndarray, width: int, bit) -> None:
    """OR ``bit`` into the ``width``-pixel border of ``mask`` (in place)."""
    if width <= 0:
        return
    for sl in ((slice(None, width),), (slice(-width, None),), (slice(None), slice(None, width)),
               (slice(None), slice(-width, None))):
        mask[sl] |= bit


def assemble_mask(science: Exposure, template: Exposure, grow_template: int, grow_science: int,
                   covered: np.ndarray, fully_covered: bool, edge: int, grown_template_mask=None):
    """Difference mask and plane dictionary; also the NO_DATA selector of the difference (None
    when no pixel is NO_DATA). ``grown_template_mask``: the template's mask already grown by
    ``grow_template`` (the matched template's mask), to grow it only once."""
    planes = dict(science.mask_planes)
    grown_once = grown_template_mask is not None and grow_template > 0
    mapped = _map_template_mask(template, planes, grown_template_mask if grown_once else None)
    no_data_bit = np.int32(add_mask_plane(planes, "NO_DATA"))
    edge_bit = np.int32(add_mask_plane(planes, "EDGE"))
    if grown_once:
        # Growing commutes with the plane map: only uncovered pixels that the template does not
        # mark NO_DATA (NO_DATA keeps its name) need growing here.
        extra = ~covered & ~template.mask_of("NO_DATA") if not fully_covered else None
        if extra is not None and extra.any():
            grown = grow_bits(np.where(extra, no_data_bit, np.int32(0)), grow_template)
            mapped = grown if mapped is None else mapped | grown
    else:
        if not fully_covered:
            uncovered = np.where(covered, np.int32(0), no_data_bit)
            mapped = uncovered if mapped is None else mapped | uncovered
        if mapped is not None and grow_template:
            mapped = grow_bits(mapped, grow_template)
    mask = np.array(science.mask, dtype=np.int32, copy=True)
    if grow_science:
        keep = science.bits("DETECTED", "DETECTED_NEGATIVE")
        grown = grow_bits(mask & np.int32(~keep), grow_science)
        mask &= np.int32(keep)
        mask |= grown
    if mapped is not None:
        mask |= mapped
    mark_edge(mask, edge, edge_bit)
    if mapped is None and not (science.mask_planes.get("NO_DATA") is not None
                               and np.bitwise_or.reduce(science.mask.ravel()) & no_data_bit):
        no_data = None
    else:
        no_data = (mask & no_data_bit) != 0
    return mask, planes, no_data
