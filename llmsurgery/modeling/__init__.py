"""Run-time code that transformed models need; `modeling_llmsurgery.py` is also written next to their weights.

Trust: a folder's own code never runs without --trust-remote-code. A folder written by llmsurgery loads without
the flag only when config.json's auto_map names nothing but llmsurgery's classes and the folder's copies of the
run-time files are byte-identical to the ones installed here; it is then loaded with the installed classes, so
no file from the folder is imported even then. Nothing a folder holds (a history file, say) can grant trust.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

REMOTE_CODE = Path(__file__).with_name("modeling_llmsurgery.py")
REMOTE_MODULE = REMOTE_CODE.stem
# Every file the run-time code needs next to the weights (the modeling file imports the kernel module).
REMOTE_FILES = (REMOTE_CODE, Path(__file__).with_name("llmsurgery_sparse_kernel.py"))


def use_surgery_modeling_(config) -> None:
    """Point config.json at the llmsurgery class for its architecture (auto_map, trust_remote_code)."""
    from .modeling_llmsurgery import SURGERY_CLASSES

    class_name = SURGERY_CLASSES[config.model_type]
    config.architectures = [class_name]
    config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.{class_name}"}


def uses_surgery_modeling(config: dict) -> bool:
    """Whether a config.json (as a dict) runs on llmsurgery's own modeling code."""
    return any(str(v).startswith(REMOTE_MODULE + ".") for v in (config.get("auto_map") or {}).values())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def foreign_code(config: dict, folder: Path) -> str | None:
    """Why a folder's modeling code is not llmsurgery's own as installed here, or None when it is (or there is none)."""
    from .modeling_llmsurgery import SURGERY_CLASSES

    auto_map = config.get("auto_map")
    if not auto_map:
        return None
    ours = {f"{REMOTE_MODULE}.{SURGERY_CLASSES.get(config.get('model_type'), '')}"}
    if (
        not isinstance(auto_map, dict)
        or set(auto_map) != {"AutoModelForCausalLM"}
        or set(map(str, auto_map.values())) != ours
    ):
        named = sorted(
            {
                str(v).split(".")[0] + ".py"
                for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
            }
        )
        return f"carries its own modeling code ({', '.join(named)})"
    for shipped in REMOTE_FILES:
        copy = folder / shipped.name
        if not copy.is_file() or _sha256(copy) != _sha256(shipped):
            return f"holds a {shipped.name} that differs from the one this llmsurgery installs"
    return None


def surgery_class(config: dict):
    """The installed llmsurgery class for a config whose auto_map names one."""
    from . import modeling_llmsurgery

    return getattr(modeling_llmsurgery, modeling_llmsurgery.SURGERY_CLASSES[config["model_type"]])
