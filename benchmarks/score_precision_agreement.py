"""Do bf16 growth scores pick the same units as exact ones? (``score_precision``, issue 4)

Trains a dense MLP (40 → 1024 → 1024 → 1024 → 10, SGD with momentum) on MNIST-1D for a few
hundred steps, then takes one batch's input ``X`` and output gradient ``dY`` of each hidden
1024×1024 layer and compares RigL's growth choice — the ``k`` largest dense-gradient block norms,
``k`` = 1.5 % of the blocks (prune rate 0.3 of density 0.05) — computed three ways:
float64 (the reference), ``precision="exact"`` (float32) and ``precision="bf16"``
(:func:`itop_kernels.block_norms.block_grad_norms`). Reports, per layer and block size, the
fraction of the reference's chosen units that each precision also chooses and the relative
error of the norms.

    python benchmarks/score_precision_agreement.py [--steps 300] [--out PATH]

Writes ``benchmarks/results/score_precision_agreement.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from provenance import ROOT, cpu_model, git_state, package_versions
from results_files import OVERWRITE_HELP, refuse_overwrite

sys.path.insert(0, str(ROOT))
from itop.app.data import default_data_dir, load_mnist1d  # noqa: E402
from itop_kernels.block_norms import block_grad_norms  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--grow-fraction", type=float, default=0.015)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "score_precision_agreement.json"))
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    refuse_overwrite(ap, args.overwrite, args.out)
    torch.manual_seed(0)
    ds = load_mnist1d(default_data_dir())
    X = ds.train_x.float().reshape(len(ds.train_x), -1)
    Y = ds.train_y
    model = nn.Sequential(nn.Linear(X.shape[1], 1024), nn.ReLU(), nn.Linear(1024, 1024),
                          nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            captured[name] = [inputs[0].detach(), None]
            output.register_hook(lambda g: captured[name].__setitem__(1, g.detach()))
        return hook

    for name in ("2", "4"):
        model[int(name)].register_forward_hook(keep(name))
    for _ in range(args.steps):
        idx = torch.randint(len(X), (args.batch,))
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows = []
    for name, (x, dy) in captured.items():
        for bs in args.blocks:
            ref = block_grad_norms(x.double(), dy.double(), bs).reshape(-1)
            k = max(1, int(args.grow_fraction * ref.numel()))
            chosen = set(torch.topk(ref, k).indices.tolist())
            for precision in ("exact", "bf16"):
                got = block_grad_norms(x, dy, bs, precision=precision).reshape(-1)
                same = len(chosen & set(torch.topk(got, k).indices.tolist())) / k
                err = float((got.double() - ref).norm() / ref.norm())
                rows.append({"layer": name, "block_size": bs, "precision": precision, "k": k,
                             "units": ref.numel(), "same_choice": same, "norm_rel_err": err})
                print(f"layer {name} block {bs:2d} {precision:5s}: k={k:6d}, same choice "
                      f"{100 * same:6.2f} %, norm rel. error {err:.1e}")
    result = {"benchmark": "score_precision_agreement", "device": cpu_model(),
              "versions": package_versions("torch", "mnist1d"),
              "git": git_state("itop", "itop_kernels", "benchmarks/score_precision_agreement.py"),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "final_train_loss": float(loss.detach()), "args": vars(args), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
