"""Does a batch-norm-aware prune score help block-sparse DST? (``prune="magnitude_bn"``)

The setting where magnitude misled the prune step: MNIST-1D's cnn1d at 90 % sparsity and block
16, RigL-ITOP with any fan-in (the paper grid's collapsed runs), ΔT 5 / 25 / 125, 3 seeds, the
``itop train`` recipe. Each run is trained twice, with the plain L1 magnitude and with the
magnitude times the following batch norm's ``|γ|/σ``, averaged over the unit's output
channels (:class:`NormAwareManager`, defined here: it was not kept in the library because it
did not help). In the constant fan-in mode the score cannot matter for this model: its
convolutions hold one block per row, and a row's strongest unit is never pruned.

The following norm of a sparse layer is the module registered right after it, when that is a
``BatchNorm`` with running statistics, an affine weight and one feature per output.

Writes ``benchmarks/results/bn_aware_prune.json`` (runs, device, versions, commit) and prints a
table.

    python benchmarks/bn_aware_prune.py [--epochs 30] [--jobs 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from provenance import cpu_model, git_state, package_versions  # noqa: E402
from results_files import OVERWRITE_HELP, RESULTS, refuse_overwrite  # noqa: E402


def norm_aware_manager():
    """A :class:`itop.TopologyManager` whose prune score is the L1 magnitude times the
    following batch norm's mean ``|γ|/σ`` over the unit's row of output channels."""
    import torch
    from torch import nn
    from itop import TopologyManager
    from itop.sparsify import _unwrap

    class NormAwareManager(TopologyManager):
        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            mods = list(_unwrap(model).named_modules())
            index = {id(m): i for i, (_, m) in enumerate(mods)}
            self._norms = {}
            for name, layer in self.layers:
                i = index[id(layer)]
                nxt = mods[i + 1][1] if i + 1 < len(mods) else None
                if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.affine and \
                        nxt.track_running_stats and \
                        nxt.num_features == layer.dense_weight_shape[0]:
                    self._norms[name] = nxt

        @torch.no_grad()
        def _prune_scores(self, name, m, p):
            active, mag = m._active_units(p)
            bn = self._norms.get(name)
            if bn is None:
                return active, mag
            R = m.block_mask.shape[0]
            scale = bn.weight.abs().float() / (bn.running_var.float() + bn.eps).sqrt()
            rows = torch.div(active, m.block_mask.numel() // R, rounding_mode="floor")
            return active, mag * scale.view(R, -1).mean(1).index_select(0, rows)

    return NormAwareManager


def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One ``itop train`` run with the plain (``magnitude``) or the norm-aware
    (``magnitude_bn``) prune score."""
    import torch
    torch.set_num_threads(1)
    from itop.app import train as train_mod
    if spec["prune"] == "magnitude_bn":
        train_mod.TopologyManager = norm_aware_manager()
    with tempfile.TemporaryDirectory() as out:
        cfg = train_mod.TrainConfig(density=1.0 - spec["sparsity"], block_size=spec["block"],
                                    growth="gradient", update_every=spec["update_every"],
                                    epochs=spec["epochs"], seed=100 + spec["seed"], threads=1,
                                    out=out, progress=False, plots=False)
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            final = train_mod.train(cfg)
    return {**spec, "test_acc": final["test_acc"], "itop_rate": final["itop_rate"],
            "seconds": time.time() - t0}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run both arms and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--update-every", type=int, nargs="+", default=[5, 25, 125])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = p.parse_args(argv)
    path = os.path.join(RESULTS, "bn_aware_prune.json")
    refuse_overwrite(p, args.overwrite, path)
    specs = [{"prune": pr, "sparsity": 0.9, "block": 16, "update_every": ue, "seed": s,
              "epochs": args.epochs}
             for pr in ("magnitude", "magnitude_bn") for ue in args.update_every
             for s in range(args.seeds)]
    import torch
    meta = {"device": f"{cpu_model()} ({os.cpu_count()} cores)",
            "versions": {**package_versions("numpy"), "torch": torch.__version__},
            "git": git_state("itop", "itop_kernels"), "argv": sys.argv,
            "settings": vars(args)}
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=4) as pool:
        results: List[Dict[str, Any]] = []
        for r in pool.imap_unordered(run_one, specs):
            results.append(r)
            print(f"{r['prune']:13s} ΔT {r['update_every']:3d} seed {r['seed']}: "
                  f"{100 * r['test_acc']:.1f} %", flush=True)
    meta["grid_seconds"] = time.time() - t0
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print("| prune score | ΔT | test acc. % (per seed) | mean | worst |\n|---|---|---|---|---|")
    for pr in ("magnitude", "magnitude_bn"):
        for ue in args.update_every:
            accs = [100 * r["test_acc"] for r in sorted(results, key=lambda r: r["seed"])
                    if r["prune"] == pr and r["update_every"] == ue]
            print(f"| {pr} | {ue} | {' / '.join(f'{a:.1f}' for a in accs)} | "
                  f"{statistics.fmean(accs):.1f} | {min(accs):.1f} |")
        allm = [100 * r["test_acc"] for r in results if r["prune"] == pr]
        print(f"| {pr} | all | | {statistics.fmean(allm):.1f} | {min(allm):.1f} |")
    print(f"{len(results)} runs in {meta['grid_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
