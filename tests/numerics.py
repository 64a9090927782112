"""Numerical comparison helpers for the kernel tests: relative errors against float64."""
import torch

# Relative-error bounds ‖out − ref‖ / ‖ref‖ (DEVELOPERS.md): IEEE fp32 1e-4, TF32 1e-3.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TOL_TF32 = 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in ``out`` gives ``inf``."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def torch_tf32_switch(op: str) -> bool:
    """torch's own TF32 switch for ``op`` (``"matmul"``: cuBLAS, ``"conv"``: cuDNN), read here
    independently of the library (whose reading of it is tested against this)."""
    if op == "matmul":
        new = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9
        return new == "tf32" if new is not None else bool(torch.backends.cuda.matmul.allow_tf32)
    new = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    return new == "tf32" if new is not None else bool(torch.backends.cudnn.allow_tf32)


def tol_for(dtype: torch.dtype, device: str, op: str = "matmul") -> float:
    """The bound for ``dtype`` on ``device``: fp32 on a GPU is held to TF32's 1e-3 only while
    torch's switch for ``op`` allows TF32 (the kernels follow it), else to IEEE's 1e-4."""
    if op not in ("matmul", "conv"):
        raise ValueError(f"op must be 'matmul' or 'conv', got {op!r}")
    if dtype == torch.float32 and device == "cuda" and torch_tf32_switch(op):
        return TOL_TF32
    return TOL[dtype]
