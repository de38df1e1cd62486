"""The sparse one-token decode path of rotate-sparsify models: kernel, model runtime, fallback without a compiler."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import PROMPT, run_cli

from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.model_io import load_model
from llmsurgery.modeling.llmsurgery_sparse_kernel import load_kernel
from llmsurgery.modeling.modeling_llmsurgery import sparse_kernel_calls
from llmsurgery.passes import RotateSparsify
from llmsurgery.passes.rotate_sparsify.maths import rotate_sparsify_

CALIB = CalibConfig(source="pydoc", samples=3, seq_len=48, seed=0)


@pytest.fixture(scope="module")
def kernel():
    """The compiled kernel. A machine without a compiler fails here unless LLMSURGERY_SPARSE_KERNEL=0 says so."""
    if os.environ.get("LLMSURGERY_SPARSE_KERNEL", "1").lower() in ("0", "off", "false", "torch"):
        pytest.skip("LLMSURGERY_SPARSE_KERNEL disables the compiled kernel")
    compiled = load_kernel()
    assert compiled is not None, (
        "no compiled sparse kernel: install a C++ compiler or set LLMSURGERY_SPARSE_KERNEL=0"
    )
    return compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "fan_in,fan_out", [(64, 96), (301, 70), (700, 2100), (300, 9000)]
)  # the last: several column tiles a thread
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.9])
def test_kernel_equals_dense_product_on_its_top_k_mask(kernel, dtype, fan_in, fan_out, sparsity):
    torch.manual_seed(fan_in + fan_out)
    weight = torch.randn(fan_out, fan_in).to(dtype)
    x = torch.randn(fan_in).to(dtype)
    keep = fan_in - round(sparsity * fan_in)
    indices = torch.empty(keep, dtype=torch.int32)
    y = kernel.top_k_gemv(x, keep, weight.t().contiguous(), indices=indices)
    kept = indices.long()
    assert kept.unique().numel() == keep and bool((kept[1:] > kept[:-1]).all())
    dropped = torch.ones(fan_in, dtype=torch.bool)
    dropped[kept] = False
    if keep < fan_in:  # the largest magnitudes are kept
        assert x[kept].float().abs().min() >= x[dropped].float().abs().max()
    if dtype == torch.float32:  # no ties: the same set as torch.topk
        assert set(kept.tolist()) == set(x.abs().topk(keep).indices.tolist())
    masked = torch.where(dropped, torch.zeros_like(x), x).double()
    expected = weight.double() @ masked
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4 * (1 + expected.abs().max().item()))


def test_kernel_breaks_ties_towards_the_lowest_index(kernel):
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0])
    indices = torch.empty(3, dtype=torch.int32)
    kernel.top_k_gemv(x, 3, torch.eye(6), indices=indices)
    assert indices.tolist() == [1, 2, 4]


def test_kernel_ranks_nan_largest_like_torch(kernel):
    x = torch.tensor([0.5, float("nan"), -3.0, 1.0])
    indices = torch.empty(2, dtype=torch.int32)
    y = kernel.top_k_gemv(x, 2, torch.eye(4), indices=indices)
    assert indices.tolist() == sorted(x.abs().topk(2).indices.tolist()) == [1, 2]
    assert y.isnan().all()  # as in the dense product: 0 * NaN is NaN


def test_kernel_rejects_mismatched_inputs(kernel):
    with pytest.raises(TypeError):
        kernel.top_k_gemv(torch.randn(4), 2, torch.randn(4, 3).to(torch.bfloat16))
    with pytest.raises(ValueError):
        kernel.top_k_gemv(torch.randn(5), 2, torch.randn(4, 3))
    with pytest.raises(ValueError):  # a short index buffer is refused before the kernel could write past it
        kernel.top_k_gemv(torch.randn(4), 3, torch.randn(4, 3), indices=torch.empty(2, dtype=torch.int32))


def _sparse_model(tiny_models, arch, method, sparsity=0.4):
    loaded = load_model(str(tiny_models[arch]))
    rotate_sparsify_(
        loaded.model,
        calibration_batches(loaded.tokenizer, CALIB),
        RotateSparsify(sparsity=sparsity, method=method, calib=CALIB),
    )
    return loaded.model


@torch.no_grad()
def _decode_logits(model, sparse: bool | None, steps: int = 3) -> torch.Tensor:
    """Prefill PROMPT, then decode `steps` tokens one at a time (sparse_decode set unless None); every step's logits."""
    if sparse is not None:
        model.config.sparse_decode = sparse
    out = model(PROMPT, use_cache=True)
    cache, token, logits = out.past_key_values, PROMPT[:, -1:], []
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        logits.append(out.logits.double())
    if sparse is not None:
        model.config.sparse_decode = True
    return torch.cat(logits)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["larosa", "magnitude"])
def test_sparse_decode_gives_the_dense_path_logits(kernel, tiny_models, arch, method):
    model = _sparse_model(tiny_models, arch, method)
    dense = _decode_logits(model, sparse=False)
    assert sparse_kernel_calls(model) == 0
    sparse = _decode_logits(model, sparse=True)
    layers = model.config.num_hidden_layers
    assert (
        sparse_kernel_calls(model) == 3 * 4 * layers
    )  # one call per group (q|k|v, o, gate|up, down) and step; prefill stays dense
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-5)
    assert not torch.equal(
        sparse, _decode_logits(_sparse_model(tiny_models, arch, method, sparsity=0.0), sparse=True)
    )


def test_bfloat16_model_decodes_through_the_kernel(kernel, tiny_models):
    model = _sparse_model(tiny_models, "llama", "larosa")
    exact = _decode_logits(model, sparse=False, steps=1)  # float32
    model = model.to(torch.bfloat16)
    dense = _decode_logits(model, sparse=False, steps=1)
    sparse = _decode_logits(model, sparse=True, steps=1)
    assert sparse_kernel_calls(model) == 4 * model.config.num_hidden_layers
    # Both bfloat16 paths round differently; the kernel (float32 accumulation) strays no further from float32.
    assert (sparse - exact).abs().max() <= 1.5 * (dense - exact).abs().max()


def test_a_deep_copy_decodes_on_its_own_weights(kernel, tiny_models):
    import copy

    model = _sparse_model(tiny_models, "llama", "magnitude")
    expected = _decode_logits(model, sparse=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert not torch.allclose(_decode_logits(twin, sparse=True), expected)
    torch.testing.assert_close(_decode_logits(model, sparse=True), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        _decode_logits(twin, sparse=True), _decode_logits(twin, sparse=False), rtol=0, atol=1e-5
    )


def test_training_and_prefill_keep_the_dense_path(kernel, tiny_models):
    model = _sparse_model(tiny_models, "qwen2", "larosa")
    with (
        torch.inference_mode()
    ):  # a first decode under inference_mode builds the fused weights as ordinary tensors
        model(PROMPT[:, :1])
    assert sparse_kernel_calls(model) == 4 * model.config.num_hidden_layers
    with torch.no_grad():
        model(PROMPT)
    for p in model.parameters():
        p.requires_grad_(True)
    model(PROMPT[:, :1]).logits.sum().backward()  # autograd needs the dense products
    assert sparse_kernel_calls(model) == 4 * model.config.num_hidden_layers
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_saved_model_decodes_sparse_and_saves_again(kernel, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "sparse"
    result = run_cli(
        "rotate-sparsify",
        tiny_models["llama"],
        "--sparsity",
        "0.4",
        "--output",
        out,
        "--calib",
        "pydoc",
        "--calib-samples",
        "3",
        "--calib-seq-len",
        "48",
    )
    assert result.exit_code == 0, result.output
    assert (out / "llmsurgery_sparse_kernel.py").is_file()
    forced_dense = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, sparse_decode=False)
    _decode_logits(forced_dense, sparse=None)
    assert sparse_kernel_calls(forced_dense) == 0
    quantized = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert (
        type(quantized.model.layers[0].mlp.gate_proj).__name__ == "Linear8bitLt"
    )  # quantizers still see nn.Linear
    assert (
        torch.isfinite(_decode_logits(quantized, sparse=True)).all() and sparse_kernel_calls(quantized) == 0
    )
    masked = {}
    for s_out in (0.0, 0.9):  # the Top-K on o_proj/down_proj inputs follows the quantized replacements
        q = AutoModelForCausalLM.from_pretrained(
            out,
            trust_remote_code=True,
            sparsity_in=0.0,
            sparsity_out=s_out,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        )
        masked[s_out] = _decode_logits(q, sparse=None, steps=1)
    assert (masked[0.9] - masked[0.0]).abs().max() > 1e-3
    model = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True
    )  # the copies next to the weights
    dense = _decode_logits(model, sparse=False)
    torch.testing.assert_close(_decode_logits(model, sparse=True), dense, rtol=0, atol=1e-5)
    assert sparse_kernel_calls(model) > 0
    model.save_pretrained(tmp_path / "again")  # weights are views of the fused input-major ones now
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    torch.testing.assert_close(_decode_logits(again, sparse=False), dense, rtol=0, atol=0)
    result = run_cli("inspect", out, "--json")
    assert "compiled C++ kernel" in json.loads(result.output)["sparse_decode"]

    # A machine without a compiler: a fresh process with no compiler on PATH decodes the same on the PyTorch path.
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"ids = torch.tensor({PROMPT.tolist()})\n"
        "with torch.no_grad():\n"
        "    o = m(ids, use_cache=True)\n"
        "    o = m(ids[:, -1:], past_key_values=o.past_key_values, use_cache=True)\n"
        f"torch.save(o.logits, {str(tmp_path / 'fallback.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "LLMSURGERY_SPARSE_KERNEL")}
    env |= {"PATH": str(tmp_path / "empty-bin"), "LLMSURGERY_KERNEL_CACHE": str(tmp_path / "kernels")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sparse decode kernel unavailable (no C++ compiler found" in done.stderr
    with torch.no_grad():
        o = model(PROMPT, use_cache=True)
        expected = model(PROMPT[:, -1:], past_key_values=o.past_key_values, use_cache=True).logits
    torch.testing.assert_close(torch.load(tmp_path / "fallback.pt"), expected, rtol=0, atol=1e-5)
    done = subprocess.run(
        [sys.executable, "-m", "llmsurgery", "inspect", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["sparse_decode"].startswith("PyTorch fallback")
    assert not (tmp_path / "kernels").exists()
