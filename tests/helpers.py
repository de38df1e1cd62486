"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from llmsurgery.cli import app

PROMPT = torch.tensor(
    [[1, 37, 120, 55, 201, 9, 77, 300, 12, 5, 66, 88, 140, 19, 3, 250, 41, 7, 99, 180]]
)  # [1, 20]


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


def stock_load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
