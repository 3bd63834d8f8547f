"""The three QuACK entry points train_moe calls (quack.gemm_interface's gemm, gemm_act and gemm_dact), written on
plain tensors from their documented semantics, for CPU tests of QuackExperts' wiring: which rows each GEMM gathers,
the transposes, the epilogue's scale and row reduction. The real kernels are compared with the torch path on an
sm90 GPU in tests/test_gpu.py."""
import torch
import torch.nn.functional as F


def _act(activation: str, pre: torch.Tensor) -> torch.Tensor:
    if activation == "swiglu":  # gate and up in adjacent columns
        return F.silu(pre[:, ::2]) * pre[:, 1::2]
    if activation == "leaky_relu_sq":
        return F.leaky_relu(pre, 0.5).square()
    assert activation == "relu_sq", activation
    return F.relu(pre).square()


def _act_grad(activation: str, pre: torch.Tensor, dpost: torch.Tensor) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = pre[:, ::2], pre[:, 1::2]
        sig = torch.sigmoid(gate)
        grad = torch.empty_like(pre)
        grad[:, ::2] = dpost * up * sig * (1 + gate * (1 - sig))
        grad[:, 1::2] = dpost * F.silu(gate)
        return grad
    if activation == "leaky_relu_sq":
        return dpost * 2 * torch.where(pre > 0, pre, 0.25 * pre)
    return dpost * 2 * F.relu(pre)


def _varlen_m(A, B, cu_seqlens_m, A_idx):
    """Rows of A (gathered by A_idx) in consecutive groups, group l times B[l]: (total_m, K) x (L, K, N)."""
    rows = (A if A_idx is None else A[A_idx.long()]).float()
    out = rows.new_zeros(len(rows), B.shape[-1])
    for group, (start, end) in enumerate(zip(cu_seqlens_m[:-1].tolist(), cu_seqlens_m[1:].tolist())):
        out[start:end] = rows[start:end] @ B[group].float()
    return out


def gemm(A, B, out_dtype=None, cu_seqlens_m=None, cu_seqlens_k=None, A_idx=None):
    assert (cu_seqlens_m is None) != (cu_seqlens_k is None)
    if cu_seqlens_m is not None:
        out = _varlen_m(A, B, cu_seqlens_m, A_idx)
    else:  # A (M, whatever) with its columns gathered, B (total_k, N): one (M, N) product per group of columns
        cols = (A if A_idx is None else A[:, A_idx.long()]).float()
        bounds = cu_seqlens_k.tolist()
        out = torch.stack([cols[:, s:e] @ B[s:e].float() for s, e in zip(bounds[:-1], bounds[1:])])
    return out.to(out_dtype or A.dtype)


def gemm_act(A, B, activation=None, cu_seqlens_m=None, A_idx=None):
    pre = _varlen_m(A, B, cu_seqlens_m, A_idx)
    return pre.to(A.dtype), _act(activation, pre).to(A.dtype)


def gemm_dact(A, B, PreAct, activation=None, colvec_scale=None, colvec_reduce=False, cu_seqlens_m=None, A_idx=None,
              ):
    """dx = act'(PreAct) * (A @ B) * scale, postact = act(PreAct) * scale, reduce = sum(act(PreAct) * (A @ B))."""
    dout, pre = _varlen_m(A, B, cu_seqlens_m, A_idx), PreAct.float()
    post, scale = _act(activation, pre), colvec_scale.float()[:, None]
    out = (_act_grad(activation, pre, dout * scale).to(A.dtype), (post * scale).to(PreAct.dtype))
    return (*out, (post * dout).sum(dim=-1)) if colvec_reduce else out
