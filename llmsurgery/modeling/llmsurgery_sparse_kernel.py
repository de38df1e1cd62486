"""Sparse matrix-vector kernel for one-token decoding of Top-K sparse models (LaRoSA arXiv 2507.01299, TEAL).

Batch-1 decoding is memory bound: a dense ``y = W x`` reads every weight. When only the k largest-magnitude
entries of x are kept, only their k rows of the input-major weight ``W_in = W.T`` ([in, out], one contiguous
row per input channel) matter, so the kernel reads k / in of the bytes. One call selects the Top-K of x and
gathers and accumulates those rows, with threads splitting the output columns; float32 and bfloat16 weights,
float32 accumulation. The result equals the dense product on the same mask up to summation order.

The C++ source below is compiled on first use with the system compiler (``$CXX``, else ``c++``/``g++``/
``clang++``; ``-O3 -march=native -fopenmp``) into a per-user cache, keyed on the source, the compiler and the
CPU. Without a compiler, or with ``LLMSURGERY_SPARSE_KERNEL=0``, ``load_kernel()`` returns None and the model
keeps its pure-PyTorch path (dense products on the masked input); ``kernel_status()`` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("llmsurgery")

SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float bf16(uint16_t v) {
    uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// |v|, with NaN ranked largest as torch.topk does.
static inline float magnitude(float v) { return std::isnan(v) ? INFINITY : std::fabs(v); }

// The k largest |x| (ties: lowest index first), ascending indices, with their values.
static int select_top_k(const float* x, int n, int k, int* idx, float* xs) {
    if (k >= n) {
        for (int i = 0; i < n; ++i) { idx[i] = i; xs[i] = x[i]; }
        return n;
    }
    if (k <= 0) return 0;
    std::vector<float> mag(n);
    for (int i = 0; i < n; ++i) mag[i] = magnitude(x[i]);
    std::nth_element(mag.begin(), mag.begin() + (n - k), mag.end());
    const float t = mag[n - k];
    int above = 0;
    for (int i = 0; i < n; ++i) above += magnitude(x[i]) > t;
    int ties = k - above, m = 0;
    for (int i = 0; i < n && m < k; ++i) {
        const float a = magnitude(x[i]);
        if (a > t || (a == t && ties > 0)) {
            if (!(a > t)) --ties;
            idx[m] = i; xs[m] = x[i]; ++m;
        }
    }
    return m;
}

template <typename T> static inline float wload(const T* p, long j);
template <> inline float wload<float>(const float* p, long j) { return p[j]; }
template <> inline float wload<uint16_t>(const uint16_t* p, long j) { return bf16(p[j]); }

// y[c0:c1] = sum_r xs[r] * w[idx[r], c0:c1], four rows per pass over a column tile.
template <typename T>
static void gather_rows(const int* idx, const float* xs, int k, const T* w, long ld, int c0, int c1, float* y) {
    constexpr int TILE = 2048;
    alignas(64) float acc[TILE];
    for (int a = c0; a < c1; a += TILE) {
        const int len = std::min(c1, a + TILE) - a;
        std::fill(acc, acc + len, 0.0f);
        int r = 0;
        for (; r + 4 <= k; r += 4) {
            const T* __restrict w0 = w + static_cast<long>(idx[r]) * ld + a;
            const T* __restrict w1 = w + static_cast<long>(idx[r + 1]) * ld + a;
            const T* __restrict w2 = w + static_cast<long>(idx[r + 2]) * ld + a;
            const T* __restrict w3 = w + static_cast<long>(idx[r + 3]) * ld + a;
            const float x0 = xs[r], x1 = xs[r + 1], x2 = xs[r + 2], x3 = xs[r + 3];
            for (int j = 0; j < len; ++j)
                acc[j] += x0 * wload(w0, j) + x1 * wload(w1, j) + x2 * wload(w2, j) + x3 * wload(w3, j);
        }
        for (; r < k; ++r) {
            const T* __restrict w0 = w + static_cast<long>(idx[r]) * ld + a;
            const float x0 = xs[r];
            for (int j = 0; j < len; ++j) acc[j] += x0 * wload(w0, j);
        }
        std::memcpy(y + a, acc, sizeof(float) * len);
    }
}

template <typename T>
static void gather_parallel(const int* idx, const float* xs, int k, const T* w, long ld, int out, float* y,
                            int threads) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    {
        const int t = 0, nt = 1;
        (void)threads;
#endif
        const int per = ((out + nt - 1) / nt + 15) / 16 * 16;
        const int c0 = std::min(out, t * per), c1 = std::min(out, c0 + per);
        if (c0 < c1) gather_rows<T>(idx, xs, k, w, ld, c0, c1, y);
    }
}

extern "C" {

int llmsurgery_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// x: n values (dtype 0 float32, 1 bfloat16); w: [n, out] input-major rows of stride ld, same dtype;
// y: out float32. Keeps the k largest |x|; writes the kept indices to idx_out when not null. Returns k kept.
int llmsurgery_top_k_gemv(const void* x, int n, int k, const void* w, long ld, int out, int dtype,
                          float* y, int threads, int* idx_out) {
    std::vector<float> xf(n);
    if (dtype == 1) {
        const uint16_t* xb = static_cast<const uint16_t*>(x);
        for (int i = 0; i < n; ++i) xf[i] = bf16(xb[i]);
    } else {
        std::memcpy(xf.data(), x, sizeof(float) * n);
    }
    std::vector<int> idx(std::max(k, 1));
    std::vector<float> xs(std::max(k, 1));
    const int m = select_top_k(xf.data(), n, k, idx.data(), xs.data());
    if (dtype == 1)
        gather_parallel<uint16_t>(idx.data(), xs.data(), m, static_cast<const uint16_t*>(w), ld, out, y, threads);
    else
        gather_parallel<float>(idx.data(), xs.data(), m, static_cast<const float*>(w), ld, out, y, threads);
    if (idx_out) std::memcpy(idx_out, idx.data(), sizeof(int) * m);
    return m;
}

}
"""

_FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    root = os.environ.get("LLMSURGERY_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "llmsurgery",
        "kernels",
    )
    return Path(root)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def _library_name(flags: list[str]) -> str:
    return "sparse_gemv" + "".join(f.replace("=", "").replace("-", "_") for f in flags) + ".so"


def _build(compiler: str) -> tuple[Path, str]:
    """Compile SOURCE (cached) and return the library path and the flags that worked."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60
    ).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join((SOURCE, compiler, version, _cpu_flags())).encode()).hexdigest()[:16]
    folder = _cache_dir() / key
    for flags in _FLAG_SETS:
        lib = folder / _library_name(flags)
        if lib.exists():
            return lib, " ".join(flags)
    folder.mkdir(parents=True, exist_ok=True)
    errors = ""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "sparse_gemv.cpp"
        src.write_text(SOURCE)
        for flags in _FLAG_SETS:
            lib = folder / _library_name(flags)
            built = Path(tmp) / lib.name
            cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", *flags, str(src), "-o", str(built)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(built, lib)  # atomic: concurrent builders never see half a library
                return lib, " ".join(flags)
            errors = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            errors = errors[0]
    raise RuntimeError(f"{compiler} could not build the kernel: {errors}")


class SparseKernel:
    """The compiled library: one call does Top-K selection and the row gather-accumulate."""

    def __init__(self, path: Path, flags: str, compiler: str):
        self.lib = ctypes.CDLL(str(path))
        fn = self.lib.llmsurgery_top_k_gemv
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_long,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        self._fn = fn
        self.path, self.flags, self.compiler = path, flags, compiler
        self.openmp = bool(self.lib.llmsurgery_openmp())

    def top_k_gemv(
        self, x: torch.Tensor, keep: int, weight_in: torch.Tensor, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 [out] = x[kept] @ weight_in[kept] for the `keep` largest |x|.

        x: [in]; weight_in: [in, out] rows contiguous.

        indices: optional int32 buffer of min(keep, in) entries that receives the kept input channels, ascending.
        """
        if x.dtype != weight_in.dtype or x.dtype not in _DTYPES:
            raise TypeError(
                f"sparse kernel takes float32 or bfloat16 x and weights of one dtype, got {x.dtype}/{weight_in.dtype}"
            )
        n, cols = weight_in.shape
        if (
            x.numel() != n
            or weight_in.stride(1) != 1
            or x.device.type != "cpu"
            or weight_in.device.type != "cpu"
        ):
            raise ValueError(
                "sparse kernel needs a CPU vector of the weight's input size and rows of contiguous columns"
            )
        keep = max(0, min(int(keep), n))
        if indices is not None and (
            indices.dtype != torch.int32 or not indices.is_contiguous() or indices.numel() != keep
        ):
            raise ValueError(f"the index buffer must be a contiguous int32 tensor of {keep} entries")
        x = x.contiguous()
        out = torch.empty(cols, dtype=torch.float32)
        kept = self._fn(
            x.data_ptr(),
            n,
            keep,
            weight_in.data_ptr(),
            weight_in.stride(0),
            cols,
            _DTYPES[x.dtype],
            out.data_ptr(),
            torch.get_num_threads(),
            indices.data_ptr() if indices is not None else None,
        )
        if kept != keep:
            raise RuntimeError(f"sparse kernel kept {kept} of {n} inputs, asked for {keep}")
        return out

    def describe(self) -> str:
        threads = f"OpenMP, {torch.get_num_threads()} threads" if self.openmp else "1 thread (no OpenMP)"
        return f"compiled C++ kernel ({Path(self.compiler).name} -O3 {self.flags}; {threads}) at {self.path}"


def load_kernel() -> SparseKernel | None:
    """The compiled kernel, building it on first use; None (and one log line) when it cannot be had."""
    if "kernel" in _state:  # decided already: no lock on the decode path
        return _state["kernel"]
    with _lock:
        if "kernel" in _state:
            return _state["kernel"]
        kernel, reason = None, None
        if os.environ.get("LLMSURGERY_SPARSE_KERNEL", "1").lower() in ("0", "off", "false", "torch"):
            reason = "disabled by LLMSURGERY_SPARSE_KERNEL"
        elif (compiler := _compiler()) is None:
            reason = "no C++ compiler found (set CXX or install g++)"
        else:
            try:
                kernel = SparseKernel(*_build(compiler), compiler)
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                reason = str(err)
        _state["kernel"], _state["reason"] = kernel, reason
        if kernel is None:
            log.warning(
                "llmsurgery: sparse decode kernel unavailable (%s); decoding with the PyTorch fallback "
                "(dense products on the Top-K-masked input)",
                reason,
            )
        return kernel


def kernel_status() -> str:
    """One line: which sparse decode path this process uses, and why."""
    kernel = load_kernel()
    return (
        kernel.describe()
        if kernel
        else f"PyTorch fallback (dense products on masked inputs): {_state['reason']}"
    )
