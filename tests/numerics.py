"""Numerical comparison helpers for the kernel tests: relative errors against float64."""
import torch

# Relative-error bounds ‖out − ref‖ / ‖ref‖ (DEVELOPERS.md). fp32 on the GPU uses tf32 dots.
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


def tol_for(dtype: torch.dtype, device: str) -> float:
    """The bound for ``dtype``; fp32 dots on a GPU run as tf32."""
    if dtype == torch.float32 and device == "cuda":
        return TOL_TF32
    return TOL[dtype]
