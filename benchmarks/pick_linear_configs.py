"""Choose the linear kernels' configs from a ``bench_linear.py --sweep`` JSON, offline.

For every (kernel, block size) it ranks the configs that were timed at every density of the run
by the geometric mean, over the densities, of their time relative to the fastest config at
that density (1.0 = fastest everywhere), and prints the winners as ``CONFIGS`` entries for
``itop_kernels/triton_linear.py`` (16-bit kind), with the shipped config's score beside them.

    python benchmarks/pick_linear_configs.py benchmarks/results/linear_sweep_gpu.json
    python benchmarks/pick_linear_configs.py RUN.json --densities 0.2 0.1 0.02   # a subset
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def scores(result: dict, densities=None) -> dict:
    """``{(kernel, block): [(score, tag, config, origin), ...]}`` sorted best first; a config
    missing (or failed) at a density of the block is left out."""
    by_key: dict = {}
    for row in result.get("rows", []):
        if densities and row["density"] not in densities:
            continue
        for kernel, info in row.get("kernels", {}).items():
            ok = [t for t in info["timings"] if t.get("ms")]
            if not ok:
                continue
            fastest = min(t["ms"] for t in ok)
            slot = by_key.setdefault((kernel, row["block"]), {"n": 0, "cfg": {}})
            slot["n"] += 1
            for t in ok:
                c = slot["cfg"].setdefault(t["tag"], {"logs": [], "config": t["config"],
                                                      "origin": t["origin"]})
                c["logs"].append(math.log(t["ms"] / fastest))
    out = {}
    for key, slot in by_key.items():
        ranked = [(math.exp(sum(c["logs"]) / len(c["logs"])), tag, c["config"], c["origin"])
                  for tag, c in slot["cfg"].items() if len(c["logs"]) == slot["n"]]
        out[key] = sorted(ranked, key=lambda r: r[0])
    return out


def config_source(cfg: dict) -> str:
    """``C(128, 64, 8, 3, split=0)``: the entry as written in ``triton_linear._table``, with
    every field that differs from its default (``ordered=True``, ``tma=True`` included)."""
    s = f"C({cfg['tile_m']}, {cfg['tile_k']}, {cfg['num_warps']}, {cfg['num_stages']}"
    for field, default in (("group_m", 1), ("wide", 1), ("split", 1), ("ordered", False),
                           ("tma", False)):
        if cfg.get(field, default) != default:
            s += f", {field}={cfg[field]}"
    return s + ")"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="a bench_linear.py --sweep result")
    p.add_argument("--densities", nargs="+", type=float, help="only these densities")
    args = p.parse_args(argv)
    result = json.loads(args.json.read_text())
    ranked = scores(result, set(args.densities) if args.densities else None)
    if not ranked:
        print("no kernel timings in this JSON", file=sys.stderr)
        return 1
    print(f"# from {args.json} ({result.get('device')}, commit {result.get('git_commit', '?')[:10]},"
          f" arch {result.get('arch')})")
    for kernel in ("fwd", "dx", "dw"):
        entries = []
        for (k, bs), r in sorted(ranked.items()):
            if k != kernel or not r:
                continue
            score, tag, cfg, origin = r[0]
            shipped = next((s for s in r if s[3] == "shipped"), None)
            note = f"score {score:.3f}"
            note += f", shipped {shipped[1]} {shipped[0]:.3f}" if shipped else ""
            entries.append(f'    ({bs}, "16bit"): {config_source(cfg)},  # {tag}: {note}')
        if entries:
            print(f"{kernel} = {{")
            print("\n".join(entries))
            print("}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
