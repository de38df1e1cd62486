"""Tiny in-process checkpoints for every supported architecture, built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One cache for the whole run (and later runs): converted built-in models, rendered task data.
os.environ.setdefault(
    "LLMSURGERY_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "llmsurgery")
)
# The sparse decode kernel is compiled afresh for a fresh checkout (tests/test_sparse_decode.py).
os.environ.setdefault(
    "LLMSURGERY_KERNEL_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "kernels")
)

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def build_tokenizer():
    """A 400-token byte-level BPE trained on CPython's help topics (no download)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(topics.values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str, layers: int = 6):
    from transformers import AutoConfig

    common = dict(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch in ("qwen3", "gemma3_text"):
        common["head_dim"] = 16
    if arch == "gemma3_text":
        common |= dict(
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(layers)],
        )
    return AutoConfig.for_model(arch, **common)


def build_tiny(arch: str, folder: Path, layers: int = 6) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers), dtype=torch.float32)
    with torch.no_grad():  # random norms, so that exactness tests do not pass by luck of ones
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(
                    1.0 + 0.1 * torch.randn_like(param)
                    if "gemma" not in arch
                    else 0.1 * torch.randn_like(param)
                )
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A folder for one test module's shared outputs, removed when the module ends: a real model's output is
    0.4-1.1 GB, and CI's disk holds a few at a time, not one per module (tmp_path_factory keeps them to the end)."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=ARCHS)
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]


def folder_digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
