"""The Pain Management guideline as data-driven rules: load, query and evaluate."""

from cds_service.guideline.engine import Guideline
from cds_service.guideline.schema import RuleFileError
from cds_service.guideline.valuesets import normalize_system

__all__ = ["Guideline", "RuleFileError", "normalize_system"]
