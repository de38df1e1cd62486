"""Run-time code that transformed models need; `modeling_llmsurgery.py` is also written next to their weights."""

from __future__ import annotations

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
