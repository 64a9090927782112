"""PNG plots of a run directory (matplotlib, Agg backend), rendered from ``metrics.jsonl`` and
``checkpoint.pt``:

- ``curves.png``: training/test loss and accuracy per epoch;
- ``itop_rate.png``: the ITOP rate (fraction of sparse-layer weights ever explored) over
  optimizer steps, against the density;
- ``layer_density.png``: per sparse layer, its density and its ITOP rate;
- ``blocks_heatmap.png``: one layer's topology mask (the sparse layer with the most units):
  active units, units explored earlier but inactive now, units never explored.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["render_plots", "PLOT_FILES"]

from .run_files import CHECKPOINT, PLOT_FILES, load_checkpoint


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(cfg: Dict[str, Any]) -> str:
    if not cfg:
        return ""
    if cfg.get("dense"):
        kind = "dense"
    elif cfg.get("static"):
        kind = f"static sparse, density {cfg['density']:g}, block {cfg['block_size']}"
    else:
        growth = {"random": "SET-ITOP", "gradient": "RigL-ITOP"}.get(cfg["growth"], cfg["growth"])
        kind = (f"{growth}, density {cfg['density']:g}, block {cfg['block_size']}, "
                f"ΔT {cfg['update_every']}")
    return f"{cfg['model']} on {cfg['data']} — {kind}"


def plot_curves(records: List[Dict[str, Any]], path: str, title: str) -> None:
    """Loss and accuracy per epoch (train and test)."""
    plt = _pyplot()
    ep = [r for r in records if r["type"] == "epoch"]
    x = [r["epoch"] for r in ep]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(x, [r["train_loss"] for r in ep], "o-", ms=3, label="train")
    a1.plot(x, [r["test_loss"] for r in ep], "s-", ms=3, label="test")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy loss")
    a1.set_title("loss")
    a2.plot(x, [100 * r["train_acc"] for r in ep], "o-", ms=3, label="train")
    a2.plot(x, [100 * r["test_acc"] for r in ep], "s-", ms=3, label="test")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.set_title("accuracy" + (f" (final test {100 * ep[-1]['test_acc']:.1f} %)" if ep else ""))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_itop_rate(records: List[Dict[str, Any]], path: str, title: str,
                   density: Optional[float]) -> None:
    """ITOP rate over optimizer steps (a step function: it changes only at updates)."""
    plt = _pyplot()
    topo = [r for r in records if r["type"] == "topology"]
    ep = [r for r in records if r["type"] == "epoch"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if topo:
        steps = [r["step"] for r in topo]
        rates = [r["itop_rate"] for r in topo]
        last = ep[-1]["step"] if ep else steps[-1]
        if last > steps[-1]:
            steps.append(last)
            rates.append(rates[-1])
        ax.step(steps, rates, where="post", lw=2, label="ITOP rate $R_s$")
        ax.annotate(f"{rates[-1]:.3f}", (steps[-1], rates[-1]), textcoords="offset points",
                    xytext=(-30, 6))
    else:
        ax.text(0.5, 0.5, "dense run: every weight is active (R_s = 1)", ha="center",
                transform=ax.transAxes)
    if density is not None:
        ax.axhline(density, color="gray", ls="--", label=f"density {density:.3f}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of sparse-layer weights explored")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_density(layers: List[Dict[str, Any]], path: str, title: str) -> None:
    """Bar chart: density (and ITOP rate when known) of each layer."""
    plt = _pyplot()
    names = [r["name"] for r in layers]
    dens = [r["density"] for r in layers]
    rates = [r.get("itop_rate") for r in layers]
    y = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(names))))
    h = 0.38 if any(r is not None for r in rates) else 0.7
    ax.barh([i - h / 2 for i in y], dens, height=h, label="density (active)")
    if any(r is not None for r in rates):
        ax.barh([i + h / 2 for i in y], [r or 0 for r in rates], height=h,
                label="ITOP rate (ever active)")
    for i, (dv, r) in enumerate(zip(dens, layers)):
        bs = r.get("block_size")
        ax.text(min(dv, 1.0) + 0.01, i - h / 2, f"{dv:.3f}" + (f"  (block {bs})" if bs else
                                                               "  (dense)"),
                va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{n}\n{tuple(r['shape'])}" for n, r in zip(names, layers)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("fraction of the layer's weights")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.6 / max(1, len(names))),
              ncol=2, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pick_layer(model_state: Dict[str, torch.Tensor]) -> Optional[str]:
    masks = {k[: -len(".block_mask")]: v for k, v in model_state.items()
             if k.endswith("block_mask")}
    if not masks:
        return None
    return max(masks, key=lambda n: masks[n].numel())


def plot_block_heatmap(active: torch.Tensor, fired: Optional[torch.Tensor], path: str,
                       title: str, unit: str = "block") -> None:
    """Heat-map of one mask: 2 = active, 1 = explored earlier, 0 = never explored. ``unit``
    names what a cell is (``"block"``, or ``"weight"`` for block size 1; the columns of a
    4-D element mask are input channel × kernel tap)."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    a = active.bool().reshape(active.shape[0], -1)
    f = fired.bool().reshape(a.shape) if fired is not None else a
    grid = (f.int() + a.int()).numpy()
    fig_w = 9.0
    fig_h = max(2.5, min(9.0, fig_w * grid.shape[0] / max(grid.shape[1], 1) + 1.5))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    cmap = ListedColormap(["#f2f2f2", "#f4a259", "#1f4e79"])
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
    n = grid.size
    counts = [(grid == v).sum() for v in (2, 1, 0)]
    from matplotlib.patches import Patch
    labels = ["active now", "explored, pruned since", "never explored"]
    ax.legend(handles=[Patch(color=cmap(v / 2), label=f"{lab} ({100 * c / n:.1f} %)")
                       for v, lab, c in zip((2, 1, 0), labels, counts)],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    if unit == "weight":
        ax.set_xlabel("input channel × kernel tap" if active.dim() == 4 else "input feature")
        ax.set_ylabel("output channel" if active.dim() == 4 else "output feature")
    else:
        ax.set_xlabel("input block (columns)")
        ax.set_ylabel("output block (rows)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_checkpoint(run_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    return load_checkpoint(path)


def render_plots(run_dir: str) -> List[str]:
    """Render every plot of ``run_dir`` (see the module docstring); returns the PNG paths."""
    from .run_files import read_metrics
    records = read_metrics(run_dir)
    cfg = next((r for r in records if r["type"] == "config"), {})
    final = next((r for r in reversed(records) if r["type"] == "final"), None)
    title = _title(cfg)
    ck = _load_checkpoint(run_dir)
    paths = [os.path.join(run_dir, f) for f in PLOT_FILES]
    plot_curves(records, paths[0], title)
    density = final["density"] if final else (None if cfg.get("dense") else cfg.get("density"))
    plot_itop_rate(records, paths[1], title, density)
    layers = final["layers"] if final else []
    if not layers and ck is not None:
        layers = _layers_from_checkpoint(ck)
    plot_layer_density(layers, paths[2], "per-layer density — " + title)
    name = _pick_layer(ck["model"]) if ck is not None else None
    if name is not None:
        fired = (ck.get("topology") or {}).get("fired", {}).get(name)
        mask = ck["model"][f"{name}.block_mask"]
        plot_block_heatmap(mask, fired, paths[3],
                           f"layer {name}: mask {tuple(mask.shape)} — " + title,
                           unit="weight" if cfg.get("block_size") == 1 else "block")
    else:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.text(0.5, 0.5, "no sparse layer in this run", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(paths[3], dpi=110)
        plt.close(fig)
    return paths


def _layers_from_checkpoint(ck: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    fired = (ck.get("topology") or {}).get("fired", {})
    for k, v in ck["model"].items():
        if k.endswith("block_mask"):
            name = k[: -len(".block_mask")]
            row: Dict[str, Any] = {"name": name, "shape": tuple(v.shape),
                                   "density": float(v.float().mean()), "block_size": None}
            if name in fired:
                row["itop_rate"] = float(fired[name].float().mean())
            rows.append(row)
    return rows


def layer_rows(run_dir: str) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(per-layer rows, final record or None) of a run directory, for ``itop report``."""
    from .run_files import read_metrics
    records = read_metrics(run_dir)
    final = next((r for r in reversed(records) if r["type"] == "final"), None)
    if final:
        return final["layers"], final
    ck = _load_checkpoint(run_dir)
    return (_layers_from_checkpoint(ck) if ck else []), None
