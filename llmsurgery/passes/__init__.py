"""The passes. Register a new one here: its config class (a `base.PassConfig`) in `PASSES`, nothing else.

The command line, recipes, the recipe schema and the Python API are built from this table.
"""

from .absorb import Absorb
from .base import CalibConfig, PassConfig, Report
from .heal import Heal
from .kv_compress import KVCompress
from .prune_bi import PruneBI
from .rotate_sparsify import RotateSparsify

PASSES: dict[str, type[PassConfig]] = {
    cls.pass_name(): cls for cls in (PruneBI, RotateSparsify, Absorb, KVCompress, Heal)
}

__all__ = [
    "PASSES",
    "Absorb",
    "CalibConfig",
    "Heal",
    "KVCompress",
    "PassConfig",
    "PruneBI",
    "Report",
    "RotateSparsify",
]
