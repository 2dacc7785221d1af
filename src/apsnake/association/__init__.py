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

from apsnake.association.forced import forced_photometry
from apsnake.association.match import (NEW_OBJECT_BAD_FLAGS, AssociationResult, associate_sources, can_found_object,
                                       match_one_to_one)
from apsnake.association.pipeline import AssociationConfig, associate_data_id
from apsnake.association.plan import AssociationPlan, association_plan, cells_of, footprint_cells
from apsnake.association.summary import summarise_objects
from apsnake.association.tables import AssociationError

__all__ = [
    "NEW_OBJECT_BAD_FLAGS", "AssociationConfig", "AssociationError", "AssociationPlan", "AssociationResult",
    "associate_data_id", "associate_sources", "association_plan", "can_found_object", "cells_of", "footprint_cells",
    "forced_photometry", "match_one_to_one", "summarise_objects",
]
