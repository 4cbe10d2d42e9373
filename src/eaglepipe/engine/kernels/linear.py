"""Row-invariant GEMMs: y = [rmsnorm(x) * g] @ W^T (+ bias) (+ residual), or SiLU(gate) * up; and the EAGLE-3
drafter's input projection, [rmsnorm(embed[ids]) | rmsnorm(h)] @ W^T, in one launch (`embed_hidden_linear`).

Each program owns ROW_TILE rows and BLOCK_N output columns and walks K in BLOCK_K steps; both block sizes are
functions of (N, K) alone. A row's result is the same sequence of fp32 operations whatever the other rows hold
and however many there are. Roundings follow HF's op order (normalised value cast to the input dtype before the
gain, linear output rounded before the residual add or the activation), so the path stays close to the PyTorch
one while being bit-stable across batch shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROW_TILE = 16  # tl.dot's smallest M; padding rows cost nothing in a memory-bound step


def tile_sizes(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for an [N, K] weight: a function of the weight shape only (row invariance)."""
    block_k = max(16, min(256, triton.next_power_of_2(k)))
    block_n = 32 if n <= 8192 else 64
    return block_n, block_k


@triton.jit
def _tile_product(a, w, acc, USE_DOT: tl.constexpr):
    """acc + a @ w. Tensor cores on the GPU (each output row's sum is the same whichever rows share the tile);
    under the CPU interpreter, whose dot is a BLAS call that may round a row differently by its place in the
    tile, an explicit row-by-row sum over K."""
    if USE_DOT:
        return tl.dot(a, w, acc, input_precision="ieee")
    return acc + tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _row_rstd(ptr, row_off, row_ok, K, eps, BM: tl.constexpr, BK: tl.constexpr):
    """1 / RMS of each row of a [rows, K] operand, in fp32."""
    ks = tl.arange(0, BK)
    sum_sq = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        xa = tl.load(ptr + row_off[:, None] + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :],
                     other=0.0).to(tl.float32)
        sum_sq += tl.sum(xa * xa, axis=1)
    return 1.0 / tl.sqrt(sum_sq / K + eps)


@triton.jit
def norm_linear_kernel(x_ptr, g_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
                       stride_xm, stride_wn, stride_rm, stride_ym, eps,
                       HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                       GATE_UP: tl.constexpr, USE_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok = rows < M
    col_ok = cols < N
    x_dtype = x_ptr.dtype.element_ty
    w_dtype = w_ptr.dtype.element_ty
    if HAS_NORM:
        rstd = _row_rstd(x_ptr, rows * stride_xm, row_ok, K, eps, BM, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        k_ok = kk < K
        a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_NORM:
            gain = tl.load(g_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * rstd[:, None]).to(x_dtype).to(tl.float32) * gain[None, :]
        a = a.to(w_dtype)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _tile_product(a, w, acc, USE_DOT)
        if GATE_UP:
            w_up = tl.load(w_ptr + (cols + N)[None, :] * stride_wn + kk[:, None],
                           mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc_up = _tile_product(a, w_up, acc_up, USE_DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATE_UP:
            acc_up += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_dtype = y_ptr.dtype.element_ty
    out = acc
    if GATE_UP:
        gate = acc.to(y_dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(y_dtype).to(tl.float32)
        out = act * acc_up.to(y_dtype).to(tl.float32)
    if HAS_RES:
        res = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                      other=0.0).to(tl.float32)
        out = acc.to(y_dtype).to(tl.float32) + res
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], out.to(y_dtype), mask=row_ok[:, None] & col_ok[None, :])


def _launch(x: torch.Tensor, weight: torch.Tensor, n: int, norm_weight: torch.Tensor | None, eps: float,
            bias: torch.Tensor | None, residual: torch.Tensor | None, out_dtype: torch.dtype | None,
            gate_up: bool) -> torch.Tensor:
    if x.dim() != 2 or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("norm_linear wants a row-major 2-D input and weight")
    m, k = x.shape
    if weight.shape[1] != k:
        raise ValueError(f"weight {list(weight.shape)} does not take inputs of width {k}")
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if residual is not None and (residual.shape != y.shape or residual.stride(1) != 1):
        raise ValueError(f"residual must be row-major {list(y.shape)}")
    block_n, block_k = tile_sizes(n, k)
    grid = (triton.cdiv(m, ROW_TILE), triton.cdiv(n, block_n))
    norm_linear_kernel[grid](
        x, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, residual if residual is not None else y, y, m, n, k,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), eps,
        HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        GATE_UP=gate_up, USE_DOT=x.is_cuda, BM=ROW_TILE, BN=block_n, BK=block_k)
    return y


def norm_linear(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                eps: float = 1e-6, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N]: optional RMSNorm of x (gain `norm_weight`), times weight [N, K]^T, + bias, + residual.

    The output dtype is x's unless `out_dtype` says otherwise (fp32 for an unrounded LM head).
    """
    return _launch(x, weight, weight.shape[0], norm_weight, eps, bias, residual, out_dtype, gate_up=False)


def norm_gate_up(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-6, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> SiLU(gate) * up [M, I], with weight = cat([gate, up]) [2I, K] and an optional RMSNorm first."""
    if weight.shape[0] % 2:
        raise ValueError("a fused gate/up weight has an even number of rows")
    return _launch(x, weight, weight.shape[0] // 2, norm_weight, eps, bias, None, None, gate_up=True)


@triton.jit
def _normed_half_product(x_ptr, x_off, row_ok, g_ptr, w_ptr, w_col0, cols, col_ok, stride_wn, K, eps, acc,
                         USE_DOT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """acc + (rmsnorm(x) * g) @ W[:, w_col0:w_col0+K]^T for the [BM, K] rows of x at x_off, with HF's roundings."""
    ks = tl.arange(0, BK)
    x_dtype = x_ptr.dtype.element_ty
    rstd = _row_rstd(x_ptr, x_off, row_ok, K, eps, BM, BK)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        k_ok = kk < K
        gain = tl.load(g_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(x_ptr + x_off[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = ((a.to(tl.float32) * rstd[:, None]).to(x_dtype).to(tl.float32) * gain[None, :]).to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + (w_col0 + kk)[:, None], mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = _tile_product(a, w, acc, USE_DOT)
    return acc


@triton.jit
def embed_hidden_linear_kernel(ids_ptr, e_ptr, ge_ptr, h_ptr, gh_ptr, w_ptr, y_ptr, M, N, H,
                               stride_e, stride_h, stride_wn, stride_ym, eps,
                               USE_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < M
    col_ok = cols < N
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    # K in the concatenation's order: the embedding's half, then the hidden state's; one fp32 sum over both
    acc = _normed_half_product(e_ptr, ids.to(tl.int64) * stride_e, row_ok, ge_ptr, w_ptr, 0, cols, col_ok,
                               stride_wn, H, eps, acc, USE_DOT, BM, BK)
    acc = _normed_half_product(h_ptr, rows.to(tl.int64) * stride_h, row_ok, gh_ptr, w_ptr, H, cols, col_ok,
                               stride_wn, H, eps, acc, USE_DOT, BM, BK)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def embed_hidden_linear(ids: torch.Tensor, embed: torch.Tensor, embed_norm: torch.Tensor, hidden: torch.Tensor,
                        hidden_norm: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The EAGLE-3 drafter layer's input projection for M token rows, in one launch:
    cat([rmsnorm(embed[ids]) * embed_norm, rmsnorm(hidden) * hidden_norm]) @ weight^T -> [M, N] in hidden's dtype.

    ids [M] (contiguous), embed [V, H], hidden [M, H] and weight [N, 2H] row-major. As one GEMM over the
    concatenation (one fp32 sum over both halves, rounded once), the embedding rows read in place.
    """
    m, h = hidden.shape
    n = weight.shape[0]
    if ids.dim() != 1 or ids.stride(0) != 1 or ids.shape[0] != m:
        raise ValueError("ids must be a contiguous 1-D tensor with one id per hidden row")
    if embed.shape[1] != h or weight.shape[1] != 2 * h:
        raise ValueError(f"embed {list(embed.shape)} and weight {list(weight.shape)} do not fit hidden size {h}")
    if any(t.stride(-1) != 1 for t in (embed, hidden, weight)):
        raise ValueError("embed, hidden and weight must be row-major")
    block_n, block_k = tile_sizes(n, 2 * h)
    y = torch.empty(m, n, dtype=hidden.dtype, device=hidden.device)
    grid = (triton.cdiv(m, ROW_TILE), triton.cdiv(n, block_n))
    embed_hidden_linear_kernel[grid](
        ids, embed, embed_norm, hidden, hidden_norm, weight, y, m, n, h,
        embed.stride(0), hidden.stride(0), weight.stride(0), y.stride(0), eps,
        USE_DOT=hidden.is_cuda, BM=ROW_TILE, BN=block_n, BK=block_k)
    return y
