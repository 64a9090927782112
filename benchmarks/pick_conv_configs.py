"""Choose the conv kernels' configs and options from a ``bench_conv.py`` GPU JSON, offline.

The JSON's ``candidates`` time each kernel (forward, dgrad, wgrad) alone, from a CUDA graph,
for the shipped config and every ``CANDIDATES`` entry, and for the shipped config also its
variants: the stacked-taps kernels (``fwd_taps4``, ``dgrad_taps2``, ``wgrad_taps8``, ...) and the
torch-reduced wgrad. For every (block size, kernel) this ranks every way of running the kernel
by the geometric mean, over the timed (layer, density) cases, of its time relative to the
fastest way in that case (1.0 = fastest everywhere), and prints:

- the ranking per (block size, kernel);
- the ``ConvConfig`` to ship per block size: the forward/dgrad tile (``BM``, ``BK``, ``warps``,
  ``stages``, shared by the two per-tap kernels, so chosen on their summed time) and the wgrad
  tile (``WBM``, ``WBO``, ``wwarps``, ``wstages``, ``wsplit``);
- per kernel, whether a stacked-taps variant beats the per-tap kernel with that config, and by
  how much, as the ``STACKED_TAPS`` entry to ship (1: the per-tap kernel);
- from the sweep ``rows``: the 1×1 route (conv kernels or one of the GEMM routes, from CUDA
  graphs) and the launch mode (cached against plain, eager), counted over the rows.

    python benchmarks/pick_conv_configs.py benchmarks/results/conv_gpu_h200.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

KERNELS = ("fwd", "dgrad", "wgrad")
FWD_FIELDS = ("BM", "BK", "warps", "stages")
WGRAD_FIELDS = ("WBM", "WBO", "wwarps", "wstages", "wsplit")


def _seconds(entry) -> float | None:
    """A kernel timing (``{"s": ...}``, as ``Timer.graph`` or the CPU smoke writes it)."""
    if isinstance(entry, dict) and isinstance(entry.get("s"), (int, float)) and entry["s"] > 0:
        return float(entry["s"])
    return None


def ways(candidates: list) -> dict:
    """``{(block, kernel): {way: {case: seconds}}}``: every way of running each kernel, timed per
    case ``(layer name, density)``. A way is ``"config:<candidate>"`` (the per-tap kernel with that
    candidate's tiles; ``shipped`` included) or, from the shipped row, ``"variant:<name>"``."""
    out: dict = {}
    for row in candidates:
        case = (row["name"], row["density_nominal"])
        for name, entry in row.get("kernels", {}).items():
            s = _seconds(entry)
            if s is None:
                continue
            if name in KERNELS:
                kernel, way = name, f"config:{row['candidate']}"
            else:   # fwd_taps4, dgrad_taps2, wgrad_taps8_s1, wgrad_torch_reduce
                kernel, way = name.split("_", 1)[0], f"variant:{name}"
            out.setdefault((row["block_size"], kernel), {}).setdefault(way, {})[case] = s
    return out


def rank(timed: dict) -> list:
    """``[(score, way), ...]`` best first over the cases every way was timed in: the geometric
    mean of time / fastest time of the case."""
    cases = set.intersection(*(set(t) for t in timed.values())) if timed else set()
    if not cases:
        return []
    fastest = {c: min(t[c] for t in timed.values()) for c in cases}
    scored = [(math.exp(sum(math.log(t[c] / fastest[c]) for c in cases) / len(cases)), way)
              for way, t in timed.items()]
    return sorted(scored)


def pick_config(block: int, table: dict, candidates: list) -> dict:
    """The ``ConvConfig`` fields to ship for ``block``: the forward/dgrad tile of the candidate
    with the best summed forward + dgrad time (geometric mean over the cases), the wgrad tile of
    the best per-tap wgrad candidate."""
    configs = {r["candidate"]: r["config"] for r in candidates if r["block_size"] == block}
    fwd = table.get((block, "fwd"), {})
    dgrad = table.get((block, "dgrad"), {})
    summed = {}
    for way in fwd:
        if way.startswith("config:") and way in dgrad:
            cases = set(fwd[way]) & set(dgrad[way])
            summed[way] = {c: fwd[way][c] + dgrad[way][c] for c in cases}
    best_fd = rank(summed)
    best_w = rank({w: t for w, t in table.get((block, "wgrad"), {}).items()
                   if w.startswith("config:")})
    if not best_fd or not best_w:
        return {}
    fd = configs[best_fd[0][1].split(":", 1)[1]]
    wg = configs[best_w[0][1].split(":", 1)[1]]
    return {"fwd_dgrad_from": best_fd[0][1], "wgrad_from": best_w[0][1],
            **{k: fd[k] for k in FWD_FIELDS}, **{k: wg[k] for k in WGRAD_FIELDS}}


def variant_gain(block: int, kernel: str, table: dict, config_way: str) -> tuple | None:
    """``(best variant, geometric-mean time of the variant / the chosen config's per-tap time)``
    for ``kernel`` at ``block``; None if no variant was timed."""
    timed = table.get((block, kernel), {})
    base = timed.get(config_way)
    variants = {w: t for w, t in timed.items() if w.startswith("variant:")}
    if base is None or not variants:
        return None
    best = None
    for way, t in variants.items():
        cases = set(t) & set(base)
        if not cases:
            continue
        ratio = math.exp(sum(math.log(t[c] / base[c]) for c in cases) / len(cases))
        if best is None or ratio < best[1]:
            best = (way.split(":", 1)[1], ratio)
    return best


def stacked_taps_of(variant: str) -> int:
    """The group size of a stacked-taps variant (``fwd_taps4`` -> 4, ``wgrad_taps8_s1`` -> 8);
    0 for another variant (``wgrad_torch_reduce``)."""
    parts = variant.split("_")
    return int(parts[1][4:]) if len(parts) > 1 and parts[1].startswith("taps") else 0


def route_and_launch(rows: list) -> dict:
    """From the sweep rows: how often each 1×1 route is fastest from a CUDA graph (rows of 1×1,
    stride-1 layers that timed the GEMM routes), and how often the cached launch beats the
    plain one eagerly."""
    routes: dict = {}
    launch = {"cached": 0, "plain": 0}
    for r in rows:
        eager = r.get("ours_eager_fwd_bwd_s") or {}
        if isinstance(eager.get("cached"), (int, float)) and isinstance(eager.get("plain"),
                                                                       (int, float)):
            launch["cached" if eager["cached"] <= eager["plain"] else "plain"] += 1
        alt = r.get("routes_1x1")
        if not alt:
            continue
        times = {"conv": _seconds(r.get("ours_graph_fwd_bwd"))}
        for name, res in alt.items():
            times[name] = _seconds(res.get("graph_fwd_bwd"))
        times = {k: v for k, v in times.items() if v}
        if times:
            best = min(times, key=times.get)
            routes[best] = routes.get(best, 0) + 1
    return {"route_1x1_wins": routes, "launch_wins": launch}


def report(result: dict) -> str:
    """The printed recommendation (see the module docstring)."""
    cands = result.get("candidates", [])
    table = ways(cands)
    lines = [f"device: {result.get('device_name', '?')}, {len(cands)} candidate rows"]
    for block in sorted({b for b, _ in table}):
        lines.append(f"\nblock {block}")
        for kernel in KERNELS:
            ranked = rank(table.get((block, kernel), {}))
            lines.append(f"  {kernel}: " + ", ".join(f"{w} {s:.2f}" for s, w in ranked[:6]))
        cfg = pick_config(block, table, cands)
        if not cfg:
            lines.append("  (not every kernel was timed in a common case: no config)")
            continue
        fields = ", ".join(f"{k}={cfg[k]}" for k in FWD_FIELDS + WGRAD_FIELDS)
        lines.append(f"  CONFIGS[90][{block}] = ConvConfig({fields})"
                     f"   # fwd/dgrad from {cfg['fwd_dgrad_from']}, wgrad from {cfg['wgrad_from']}")
        stacked = {}
        for kernel, way in (("fwd", cfg["fwd_dgrad_from"]), ("dgrad", cfg["fwd_dgrad_from"]),
                            ("wgrad", cfg["wgrad_from"])):
            gain = variant_gain(block, kernel, table, way)
            stacked[kernel] = 1
            if gain:
                verdict = "use it" if gain[1] < 1.0 else "keep the per-tap kernel"
                lines.append(f"  {kernel}: best variant {gain[0]} at {gain[1]:.2f}× the per-tap "
                             f"time with that config: {verdict}")
                taps = stacked_taps_of(gain[0])
                if gain[1] < 1.0 and taps:
                    stacked[kernel] = taps
                if gain[1] < 1.0 and gain[0].endswith("_s1"):
                    lines.append(f"    ({gain[0]} needs one pipeline stage: ConvOptions.taps_stages"
                                 " is one setting for all block sizes)")
        lines.append(f"  STACKED_TAPS[90][{block}] = {json.dumps(stacked)}")
    rl = route_and_launch(result.get("rows", []))
    lines.append(f"\n1×1 route wins (CUDA graphs): {rl['route_1x1_wins'] or 'none timed'}")
    lines.append(f"launch wins (eager): {rl['launch_wins']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="a bench_conv.py result with candidate timings")
    args = p.parse_args(argv)
    if not args.json.is_file():
        p.error(f"json: no such file: {args.json}")
    result = json.loads(args.json.read_text())
    if not result.get("candidates"):
        print(f"{args.json}: no candidate timings (was it a GPU run that reached them?)",
              file=sys.stderr)
        return 1
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
