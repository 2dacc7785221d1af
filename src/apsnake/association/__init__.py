"""Association of DIA sources into DiaObjects, and the order in which data IDs associate.

Modules
-------
``pipeline``  ``associate_data_id``: one data ID's whole step (load, match, summarise, forced
              photometry, commit to the APDB); ``AssociationConfig``
``plan``      HEALPix sky cells and the chains that order associations in the DAG
``match``     one-to-one matching and new DiaObjects (``associate_sources``)
``summary``   DiaObject summaries from the source history (``summarise_objects``)
``forced``    forced PSF photometry of DiaObjects on one data ID
``tables``    null-safe column access, ``AssociationError``

The APDB storage itself is ``apsnake.apdb``. docs/architecture.md (APDB, association order)
and docs/algorithms.md (association) describe the design.
"""

from apsnake.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "forced_photometry": "forced",
    "NEW_OBJECT_BAD_FLAGS": "match", "AssociationResult": "match", "associate_sources": "match",
    "can_found_object": "match", "match_one_to_one": "match",
    "AssociationConfig": "pipeline", "associate_data_id": "pipeline",
    "AssociationPlan": "plan", "association_plan": "plan", "cells_of": "plan", "footprint_cells": "plan",
    "summarise_objects": "summary",
    "AssociationError": "tables",
})

__all__ = [
    "NEW_OBJECT_BAD_FLAGS", "AssociationConfig", "AssociationError", "AssociationPlan", "AssociationResult",
    "associate_data_id", "associate_sources", "association_plan", "can_found_object", "cells_of", "footprint_cells",
    "forced_photometry", "match_one_to_one", "summarise_objects",
]
