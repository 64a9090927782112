"""The training loop behind ``itop train``.

SGD with Nesterov momentum and weight decay (the ITOP reference's optimizer), the paper's step
schedule (learning rate ×0.1 after 1/2 and after 3/4 of all optimizer steps; ``multiplier``
stretches training as in ITOP's extended runs, ``update_every`` stays the same), cross-entropy
(label smoothing off by default), and a :class:`itop.TopologyManager` for the sparse runs:

- ``dense``: no sparsification (ITOP rate reported as 1.0);
- ``static``: sparsified, topology never changes (the manager runs with prune rate 0, so the
  ITOP rate stays at the density);
- otherwise dynamic sparse training with ``growth`` (``random`` = SET-ITOP, ``gradient`` =
  RigL-ITOP).

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the loop joins
a process group (``gloo`` on CPU, ``nccl`` on CUDA), wraps the model in
``DistributedDataParallel``, shards every epoch with a ``DistributedSampler`` (``batch_size`` is
the global batch, split over the ranks) and evaluates a shard of the test set per rank. Only
rank 0 writes files and shows progress.

Output directory (rank 0):

- ``metrics.jsonl``: one JSON object per line: a ``config`` record, ``topology`` records (step
  and ITOP rate after every topology update), one ``epoch`` record per epoch, and a ``final``
  record (test accuracy, ITOP rate, FLOP fractions, wall time, per-layer table, a hash of every
  rank's masks).
- ``checkpoint.pt``: written after every epoch (atomically: a temporary file, then a rename):
  model, optimizer, topology manager, grad scaler, RNG states and the config, all in types
  ``torch.load(weights_only=True)`` accepts. ``resume`` continues from it bit for bit on the CPU
  (the data order is a function of the seed and the epoch; dropout/augmentation RNG states are
  saved).
- PNG plots (see :mod:`itop.app.plots`).

A new run refuses an ``out`` directory that already holds files unless ``overwrite`` (which
removes only the files above). A resumed run takes its settings from the checkpoint: the ones
in :data:`RUN_SETTINGS` cannot change (a contradicting ``TrainConfig`` raises ``ValueError``),
the length (:data:`LENGTH_SETTINGS`) and where it runs (:data:`PLACE_SETTINGS`) can, and every
change is written to ``metrics.jsonl`` as a ``resume`` record. A run that has finished stays
finished: resuming it without asking for more epochs changes nothing and returns its ``final``
record (with ``"already_finished": True``). More epochs stretch the learning-rate and
prune-rate schedules to the new length from the resume point on.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from itop_kernels.block_norms import native_bf16_matmul

from .connectivity import output_depends_on_input
from .data import Dataset, load_dataset, prepare_batch
from ..layers import SparseLayer
from ..sparsify import sparsify, sparsity_summary
from ..surgery_guards import StarvedLayerWarning
from ..topology import TopologyManager
from .flops import flop_report, layer_flops
from .models import build_model
from .run_files import (CHECKPOINT, METRICS, RunFileError, append_metric, check_new_run_dir,
                        load_checkpoint, read_metrics, remove_run_files, save_checkpoint,
                        write_metrics)

__all__ = ["TrainConfig", "train", "lr_at", "read_metrics", "CHECKPOINT", "METRICS",
           "RUN_SETTINGS", "LENGTH_SETTINGS", "PLACE_SETTINGS", "resume_paths",
           "resumed_config"]

#: Settings that define what a run computes: resuming a run keeps them.
RUN_SETTINGS = ("model", "data", "density", "distribution", "block_size", "growth",
                "score_precision", "fan_in", "ablation", "prune_rate", "update_every", "dense", "static",
                "batch_size", "test_batch_size", "lr", "momentum", "weight_decay",
                "label_smoothing", "seed", "amp")
#: Settings a resume may change: the length of training.
LENGTH_SETTINGS = ("epochs", "multiplier")
#: Settings a resume may change freely: where and how fast it runs.
PLACE_SETTINGS = ("data_dir", "device", "compile", "threads")


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``itop train`` options)."""

    model: str = "cnn1d"
    data: str = "mnist1d"
    data_dir: Optional[str] = None
    density: float = 0.1
    distribution: str = "erk"
    block_size: int = 1
    growth: str = "gradient"
    score_precision: str = "auto"
    fan_in: str = "any"
    ablation: bool = False
    prune_rate: float = 0.5
    update_every: int = 20
    dense: bool = False
    static: bool = False
    epochs: int = 50
    multiplier: int = 1
    batch_size: int = 100
    test_batch_size: int = 500
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    seed: int = 17
    device: str = "cpu"
    amp: bool = False
    compile: bool = False
    threads: Optional[int] = None
    out: str = ""
    resume: Optional[str] = None
    stop_after_epoch: Optional[int] = None
    progress: bool = True
    plots: bool = True
    overwrite: bool = False

    @property
    def total_epochs(self) -> int:
        """``epochs × multiplier``."""
        return self.epochs * self.multiplier

    @property
    def method(self) -> str:
        """``dense``, ``static``, ``set`` (random growth), ``rigl`` (gradient) or the growth."""
        if self.dense:
            return "dense"
        if self.static:
            return "static"
        return {"random": "set", "gradient": "rigl"}.get(self.growth, self.growth)


def lr_at(step: int, total_steps: int, base: float) -> float:
    """The paper's schedule: ``base``, ×0.1 from step ``total/2`` on, ×0.01 from ``3·total/4``
    (``step`` counts optimizer steps from 0)."""
    lr = base
    if step >= total_steps // 2:
        lr *= 0.1
    if step >= (3 * total_steps) // 4:
        lr *= 0.1
    return lr


# ------------------------------------------------------------------------------ distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _init_distributed(device: str) -> _Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local, owns)


def _all_sum(values: List[float], d: _Dist, device: torch.device) -> List[float]:
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------ helpers
def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mask_hash(model: nn.Module) -> str:
    """SHA-256 over the topology masks of the sparse layers (registration order)."""
    h = hashlib.sha256()
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, SparseLayer):
            h.update(name.encode())
            h.update(m.block_mask.detach().to("cpu", torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pick_threads(cfg: TrainConfig, d: _Dist, n_params: int) -> None:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif d.active:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    elif n_params < 5_000_000:
        # small models lose more to thread hand-offs than they gain (and the CPU is shared)
        torch.set_num_threads(1)


def _check_config(cfg: TrainConfig, d: _Dist) -> None:
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of "
                         f"processes ({d.world})")
    if cfg.dense and cfg.static:
        raise ValueError("--dense and --static exclude each other")
    if not cfg.dense and cfg.density >= 1.0:
        raise ValueError("--density 1 keeps every weight, so there is nothing to sparsify; "
                         "use --dense for a dense baseline, or a density below 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")


def _warn(text: str) -> None:
    """A warning line of ``itop train`` (rank 0), on stderr."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _build(cfg: TrainConfig, ds: Dataset, device: torch.device, d: _Dist) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.in_shape, ds.num_classes)
    if not cfg.dense:
        template = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = sparsify(model, cfg.density, distribution=cfg.distribution,
                             block_size=cfg.block_size, fan_in=cfg.fan_in,
                             ablation=cfg.ablation)
        if d.main:
            for w in caught:
                if issubclass(w.category, StarvedLayerWarning):
                    _warn(str(w.message))
                else:
                    print(f"note: {w.message}")
        if not any(isinstance(m, SparseLayer) for m in model.modules()):
            raise ValueError(f"--block-size {cfg.block_size} leaves no layer of {cfg.model} "
                             "sparse; pick a block size that divides its channel counts")
        model = _draw_until_connected(model, template, cfg, ds, d)
    return model.to(device)


# Random topologies tried before a run is declared cut off (see itop.app.connectivity).
TOPOLOGY_DRAWS = 50


def _draw_until_connected(model: nn.Module, template: nn.Module, cfg: TrainConfig,
                          ds: Dataset, d: _Dist) -> nn.Module:
    """``model``, or the first of up to ``TOPOLOGY_DRAWS`` fresh sparsifications of the dense
    ``template`` whose output depends on its input (drawn from the seeded RNG, so every rank
    and every resume gets the same one). A static run that stays cut off is refused; a dynamic
    one is warned about."""
    x = prepare_batch(ds, ds.train_x[:100], train=False, device=torch.device("cpu"))
    for draw in range(TOPOLOGY_DRAWS):
        if output_depends_on_input(model, x):
            if draw and d.main:
                print(f"note: {draw} random topolog{'y' if draw == 1 else 'ies'} cut every path "
                      f"from the input to the output; using draw {draw + 1}")
            return model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = sparsify(copy.deepcopy(template), cfg.density, distribution=cfg.distribution,
                             block_size=cfg.block_size, fan_in=cfg.fan_in, ablation=cfg.ablation)
    reason = (f"{TOPOLOGY_DRAWS} random topologies at --density {cfg.density} and --block-size "
              f"{cfg.block_size} all cut every path from the input to the output of "
              f"{cfg.model} (its output is the same for every sample)")
    hint = ("use a smaller --block-size or a higher --density"
            + ("" if cfg.fan_in == "constant" else ", or --fan-in constant --ablation"))
    if cfg.static:
        raise ValueError(f"{reason}: static training would stay at chance; {hint}")
    if d.main:
        _warn(f"{reason}; dynamic training may stay at chance; {hint}")
    return model


def _batches(n: int, bs: int, sampler, drop_last: bool) -> List[torch.Tensor]:
    idx = torch.tensor(list(iter(sampler)), dtype=torch.long)
    stop = (len(idx) // bs) * bs if drop_last else len(idx)
    return [idx[i:i + bs] for i in range(0, stop, bs)]


@torch.no_grad()
def _evaluate(model: nn.Module, ds: Dataset, cfg: TrainConfig, device: torch.device,
              d: _Dist, amp_dtype) -> Tuple[float, float]:
    """(mean loss, accuracy) on the test set; each rank evaluates the samples ``rank::world``."""
    model.eval()
    idx = torch.arange(d.rank, len(ds.test_x), d.world)
    loss_sum = correct = 0.0
    for i in range(0, len(idx), cfg.test_batch_size):
        b = idx[i:i + cfg.test_batch_size]
        x = prepare_batch(ds, ds.test_x[b], train=False, device=device)
        y = ds.test_y[b].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
    loss_sum, correct = _all_sum([loss_sum, correct], d, device)
    model.train()
    n = len(ds.test_x)
    return loss_sum / n, correct / n


def _rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume_paths(resume: Optional[str], out: Optional[str]) -> Tuple[str, str]:
    """``(checkpoint path, run directory)`` of ``--resume RESUME`` (a checkpoint file or a run
    directory; ``"auto"``/empty: ``out``). A run continues in its own directory, so ``out``, when
    given, must be that directory.

    Raises:
        RunFileError: no checkpoint there, or ``out`` names another directory.
    """
    p = resume if resume not in ("", "auto", None) else out
    if not p:
        raise RunFileError("--resume needs a checkpoint or run directory (or --out DIR)")
    if os.path.isdir(p):
        p = os.path.join(p, CHECKPOINT)
    if not os.path.isfile(p):
        raise RunFileError(f"--resume: no checkpoint at {p}")
    run_dir = os.path.dirname(p) or "."
    if out and os.path.realpath(out) != os.path.realpath(run_dir):
        raise RunFileError(f"--resume {resume} continues the run in {run_dir}, but --out names "
                           f"{out}: a run continues in its own directory; drop --out, or copy "
                           "the run directory first")
    return p, run_dir


def _option(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def resumed_config(given: TrainConfig, stored: Dict[str, Any],
                   explicit: Any = ()) -> TrainConfig:
    """The configuration of a resumed run: the checkpoint's ``stored`` settings, except those
    named in ``explicit`` (the ``TrainConfig`` fields the user set), which come from ``given``
    like every per-invocation field (``out``, ``resume``, ``stop_after_epoch``, ...).
    :func:`train` then refuses a given setting of :data:`RUN_SETTINGS` that contradicts the
    checkpoint."""
    explicit = set(explicit)
    keep = {k: stored[k] for k in RUN_SETTINGS + LENGTH_SETTINGS + PLACE_SETTINGS
            if k in stored and k not in explicit}
    return dataclasses.replace(given, **keep)


def _resume_changes(cfg: TrainConfig, stored: Dict[str, Any], done: int) -> Dict[str, list]:
    """``{setting: [stored, new]}`` for the settings that change on this resume.

    Raises:
        ValueError: a setting of :data:`RUN_SETTINGS` differs from the checkpoint, or the new
            length is shorter than what the run has done.
    """
    bad = [k for k in RUN_SETTINGS if k in stored and stored[k] != getattr(cfg, k)]
    if bad:
        was = " ".join(_option(k, stored[k]) for k in bad)
        now = " ".join(_option(k, getattr(cfg, k)) for k in bad)
        raise ValueError(f"--resume: the run was trained with {was}, this command asks for "
                         f"{now}; these settings define a run and cannot change when it "
                         "resumes (drop them, or start a new run with another --out)")
    if cfg.total_epochs < done:
        raise ValueError(f"--resume: the run has done {done} epochs, more than --epochs "
                         f"{cfg.epochs} × --multiplier {cfg.multiplier} asks for")
    return {k: [stored[k], getattr(cfg, k)] for k in LENGTH_SETTINGS + PLACE_SETTINGS
            if k in stored and stored[k] != getattr(cfg, k)}


@dataclass
class _Resume:
    """What a resumed run starts from (read and checked before anything is written)."""

    path: str
    checkpoint: Dict[str, Any]
    records: List[Dict[str, Any]]
    changes: Dict[str, list]


def _prepare_resume(cfg: TrainConfig) -> _Resume:
    path, run_dir = resume_paths(cfg.resume, cfg.out)
    ck = load_checkpoint(path)
    records = read_metrics(run_dir)
    if not any(r["type"] == "config" for r in records):
        raise RunFileError(f"{os.path.join(run_dir, METRICS)} has no config record")
    return _Resume(path, ck, records, _resume_changes(cfg, ck["config"], int(ck["epoch"])))


def _load_states(res: _Resume, model: nn.Module, opt, mgr, scaler) -> None:
    """Load the checkpoint's states; a checkpoint that does not fit raises ``RunFileError``."""
    ck = res.checkpoint
    try:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if mgr is not None:
            if ck["topology"] is None:
                raise ValueError("it has no topology-manager state (a dense run?)")
            mgr.load_state_dict(ck["topology"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunFileError(f"{res.path} does not fit the model this run builds: {first}") \
            from None


# ------------------------------------------------------------------------------ main loop
def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run training as configured; returns the ``final`` record (also written to
    ``metrics.jsonl`` by rank 0).

    With ``resume``, ``cfg`` must agree with the checkpoint's :data:`RUN_SETTINGS`
    (:func:`resumed_config` builds such a config from the checkpoint's).

    Raises:
        ValueError: inconsistent settings, or a resume that contradicts the checkpoint.
        itop.app.run_files.RunFileError (a ValueError): ``out`` holds files of another run
            (without ``resume``/``overwrite``), or a run file is missing, unreadable, unsafe
            or does not fit the model. Either way nothing in ``out`` has been touched.
        itop.app.data.DataError: the data cannot be loaded.
    """
    t_start = time.time()
    threads = torch.get_num_threads()
    d = _init_distributed(cfg.device)
    try:
        return _train(cfg, d, t_start)
    finally:
        torch.set_num_threads(threads)  # _pick_threads changed it for this run only
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist, t_start: float) -> Dict[str, Any]:
    _check_config(cfg, d)
    # every check of the run directory comes before anything is written to it
    res: Optional[_Resume] = None
    if cfg.resume is not None:
        res = _prepare_resume(cfg)
        done = int(res.checkpoint["epoch"])
        final = next((r for r in reversed(res.records) if r["type"] == "final"), None)
        if done >= cfg.total_epochs and final is not None and final.get("finished"):
            return {**final, "already_finished": True}
    else:
        check_new_run_dir(cfg.out, cfg.overwrite)
    if cfg.device.startswith("cuda") and d.active:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(cfg.device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    # data: rank 0 first (it may generate and cache the data set), then the others
    if d.main:
        ds = load_dataset(cfg.data, cfg.data_dir)
    if d.active:
        dist.barrier()
    if not d.main:
        ds = load_dataset(cfg.data, cfg.data_dir)

    if cfg.amp and device.type == "cpu" and not native_bf16_matmul(device) and d.main:
        _warn("--amp: this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX), so bf16 "
              "autocast is emulated and runs many times slower than float32; train without --amp "
              "on this machine")
    model = _build(cfg, ds, device, d)
    _pick_threads(cfg, d, sum(p.numel() for p in model.parameters()))
    net: nn.Module = model
    if d.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None

    per_rank_bs = cfg.batch_size // d.world
    sampler = torch.utils.data.DistributedSampler(
        range(len(ds.train_x)), num_replicas=d.world, rank=d.rank, shuffle=True,
        seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // per_rank_bs
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set "
                         f"({len(ds.train_x)} samples)")
    total_steps = steps_per_epoch * cfg.total_epochs

    mgr: Optional[TopologyManager] = None
    if not cfg.dense:
        mgr = TopologyManager(net, opt, update_every=cfg.update_every,
                              prune_rate=0.0 if cfg.static else cfg.prune_rate,
                              total_steps=total_steps,
                              growth="random" if cfg.static else cfg.growth,
                              seed=cfg.seed, grad_scaler=scaler,
                              score_precision=cfg.score_precision,
                              fan_in=cfg.fan_in, ablation=cfg.ablation)
    fwd = torch.compile(net) if cfg.compile else net

    metrics_path = os.path.join(cfg.out, METRICS)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    start_epoch, step, dense_grad_steps, train_time = 0, 0, 0, 0.0
    test_loss = test_acc = float("nan")
    if res is not None:
        ck = res.checkpoint
        _load_states(res, model, opt, mgr, scaler)
        start_epoch, step = int(ck["epoch"]), int(ck["step"])
        dense_grad_steps, train_time = int(ck["dense_grad_steps"]), float(ck["train_time"])
        _set_rng_state(ck["rng"], device)
        kept = [r for r in res.records
                if r["type"] == "config" or
                (r["type"] in ("epoch", "resume") and r["epoch"] <= start_epoch) or
                (r["type"] == "topology" and r["step"] <= step)]
        last = [r for r in kept if r["type"] == "epoch"]
        if last:  # the final record of a run resumed at its end reports its last evaluation
            test_loss, test_acc = last[-1]["test_loss"], last[-1]["test_acc"]
        if d.main:
            if res.changes:
                for r in kept:
                    if r["type"] == "config":
                        r.update({k: new for k, (_, new) in res.changes.items()},
                                 total_steps=total_steps)
                kept.append({"type": "resume", "epoch": start_epoch, "step": step,
                             "changes": res.changes})
            write_metrics(metrics_path, kept)
    elif d.main:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.overwrite:
            remove_run_files(cfg.out)
        cfg_rec = {"type": "config", **dataclasses.asdict(cfg), "world_size": d.world,
                   "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                   "in_shape": list(ds.in_shape), "num_classes": ds.num_classes,
                   "torch": torch.__version__}
        write_metrics(metrics_path, [cfg_rec])
        if mgr is not None:
            append_metric(metrics_path, {"type": "topology", "step": 0, "itop_rate": mgr.itop_rate})

    grows_dense = mgr is not None and not cfg.static and cfg.growth in ("gradient", "momentum")

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not (d.main and cfg.progress),
               desc=f"{cfg.method} {cfg.model}/{cfg.data}", unit="step", dynamic_ncols=True,
               leave=False)
    aug = torch.Generator()
    net.train()
    last_epoch = start_epoch
    for epoch in range(start_epoch, cfg.total_epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        aug.manual_seed(cfg.seed * 1_000_003 + epoch * 101 + d.rank)
        loss_sum = correct = seen = 0.0
        for b in _batches(len(ds.train_x), per_rank_bs, sampler, drop_last=True):
            x = prepare_batch(ds, ds.train_x[b], train=True, device=device, generator=aug)
            y = ds.train_y[b].to(device)
            lr = lr_at(step, total_steps, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                out = fwd(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            step += 1
            if mgr is not None:
                if grows_dense and (cfg.growth == "momentum" or mgr.is_update_step(step)):
                    dense_grad_steps += 1
                if mgr.step() and d.main:
                    append_metric(metrics_path, {"type": "topology", "step": step,
                                           "itop_rate": mgr.itop_rate})
            loss_sum += float(loss.detach()) * len(b)
            correct += float((out.detach().argmax(1) == y).sum())
            seen += len(b)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.3g}")
        loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], d, device)
        test_loss, test_acc = _evaluate(fwd, ds, cfg, device, d, amp_dtype)
        train_time += time.time() - t0
        last_epoch = epoch + 1
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", test_acc=f"{100 * test_acc:.1f}%")
        if d.main:
            append_metric(metrics_path, {
                "type": "epoch", "epoch": epoch + 1, "step": step, "lr": lr,
                "train_loss": loss_sum / seen, "train_acc": correct / seen,
                "test_loss": test_loss, "test_acc": test_acc,
                "itop_rate": mgr.itop_rate if mgr is not None else 1.0,
                "epoch_time": time.time() - t0})
            ck = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "topology": mgr.state_dict() if mgr is not None else None,
                  "scaler": scaler.state_dict() if scaler is not None else None,
                  "epoch": epoch + 1, "step": step, "dense_grad_steps": dense_grad_steps,
                  "train_time": train_time, "rng": _rng_state(device),
                  "config": dataclasses.asdict(cfg)}
            save_checkpoint(ckpt_path, ck)
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch:
            break
    bar.close()

    hashes = [mask_hash(model)]
    if d.active:
        gathered: List[Optional[str]] = [None] * d.world
        dist.all_gather_object(gathered, hashes[0])
        hashes = [str(h) for h in gathered]
    flops = flop_report(layer_flops(model, ds.in_shape, device), step, dense_grad_steps)
    summary = sparsity_summary(model)  # sparse and dense linear/conv layers
    if mgr is not None:
        rates = mgr.layer_itop_rates()
        for r in summary.rows:
            if r["name"] in rates:
                r["itop_rate"] = rates[r["name"]]
    final = {
        "type": "final", "method": cfg.method, "epochs_done": last_epoch,
        "finished": last_epoch >= cfg.total_epochs, "steps": step,
        "test_acc": test_acc, "test_loss": test_loss,
        "itop_rate": mgr.itop_rate if mgr is not None else 1.0,
        "density": summary.sparse_density if mgr is not None else 1.0,
        "overall_density": summary.overall_density if mgr is not None else 1.0,
        "training_flop_fraction": flops.training_fraction,
        "inference_flop_fraction": flops.inference_fraction,
        "dense_forward_flops": flops.dense_forward,
        "dense_grad_steps": dense_grad_steps,
        "wall_time": time.time() - t_start, "train_time": train_time,
        "layers": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                   for r in summary.rows],
        "mask_hashes": hashes, "world_size": d.world,
    }
    if d.main and not cfg.dense and test_acc <= 1.5 / ds.num_classes:
        _warn(f"the sparse model ended at chance level ({100 * test_acc:.1f} % of the test set "
              f"right, {ds.num_classes} classes): it did not learn")
    if d.main:
        append_metric(metrics_path, final)
        if cfg.plots:
            from .plots import render_plots
            render_plots(cfg.out)
    return final
