"""Templates: the fixed sky grid of patches, warping, coaddition, and the template of a calexp.

Modules
-------
``skygrid``  ``SkyGrid``: patches of a fixed sky grid, their ids, WCSs and look-ups (no pixels)
``mapping``  the target -> source pixel mapping of a warp, exact at nodes
``warp``     ``warp_exposure``: resampling an Exposure onto another pixel grid (Lanczos-3)
``coadd``    ``make_coadd``: clipped, weighted mean of warps on one patch; ``CoaddConfig``
``select``   the template of a science calexp: ``template_for_exposure`` (coadd patches) or
             ``best_single_visit_template`` (one template visit)
``errors``   ``TemplateError``

All functions take and return ``apsnake.exposure.Exposure`` objects; nothing here reads or
writes files. docs/algorithms.md (templates) describes the methods.
"""

from apsnake.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "CoaddConfig": "coadd", "homogenize_psfs": "coadd", "make_coadd": "coadd",
    "TemplateError": "errors",
    "best_single_visit_template": "select", "merge_warps": "select", "single_visit_template": "select",
    "template_for_exposure": "select",
    "SkyGrid": "skygrid",
    "warp_exposure": "warp",
})

__all__ = [
    "CoaddConfig", "SkyGrid", "TemplateError", "best_single_visit_template", "homogenize_psfs", "make_coadd",
    "merge_warps", "single_visit_template", "template_for_exposure", "warp_exposure",
]
