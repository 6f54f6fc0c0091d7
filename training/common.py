"""Plumbing shared by the training commands: distributed setup, LR schedule, logs, progress."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

log = logging.getLogger("atop.train")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(threads: int | None = None) -> DistInfo:
    """Join the process group if started by torchrun (gloo on CPU, nccl on GPU)."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(0, 1, device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    if info.world_size == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) everywhere, so replicas end identical."""
    if info.world_size > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def check_replicas(model: nn.Module, info: DistInfo) -> None:
    """Fail loudly if the replicas' weights differ (they must not, after DDP + sync_buffers)."""
    if info.world_size == 1:
        return
    flat = torch.cat([t.detach().flatten().double() for t in model.state_dict().values()])
    mine = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()])
    every = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(every, mine)
    if any(not torch.equal(e, every[0]) for e in every):
        raise RuntimeError(f"DDP replicas diverged: weight checksums {[e.tolist() for e in every]}")
    if info.main:
        log.info("replica check: %d tensors identical on %d ranks", len(model.state_dict()), info.world_size)


def all_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if info.world_size == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(values, t, strict=True)}


def finish_distributed(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def one_cycle_lr(step: int, total: int, peak: float, warmup: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` of the run, then cosine decay to zero."""
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


RUN_FILES = ("metrics.jsonl", "last.safetensors", "best.safetensors", "final.safetensors")


def claim_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make sure ``out`` holds no other run before this one writes there.

    A folder with a previous run's files is refused unless ``resume`` (continue it) or
    ``overwrite`` (delete those files, then start over): appending a new run's epochs to an old
    metrics.jsonl, or leaving an old best.safetensors beside new checkpoints, mixes two runs.
    """
    found = [n for n in RUN_FILES if (out / n).exists()]
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    if resume:
        if found and "last.safetensors" not in found:
            raise ValueError(
                f"{out} holds a run ({', '.join(found)}) without last.safetensors to resume from;"
                " start over with --overwrite or pick another --out"
            )
        if not found:
            log.info("%s: no run to resume yet; starting one", out)
        return
    if not found:
        return
    if not overwrite:
        raise ValueError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume, start over"
            " with --overwrite (deletes those files), or pick another --out"
        )
    for name in found:
        (out / name).unlink()
        (out / name).with_suffix(".json").unlink(missing_ok=True)
    log.warning("%s: deleted the previous run's %s (--overwrite)", out, ", ".join(found))


class RunLog:
    """Appends one JSON object per line to ``<out>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, out: Path, info: DistInfo):
        self.path = out / "metrics.jsonl"
        self.enabled = info.main
        if self.enabled:
            out.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.enabled:
            record = {"time": round(time.time(), 3), **record}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("%s", " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "time"))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def progress(total: int, initial: int, desc: str, info: DistInfo) -> tqdm:
    """A progress bar on rank 0; refreshes rarely when the output is a log file."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not info.main,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )


PRECISIONS = ("bf16", "fp32")


def check_precision(precision: str) -> None:
    """Refuse an unknown --precision before a run loads anything."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, not {precision!r}")


def autocast(device: torch.device, precision: str):
    """The training step's autocast: bf16 (about 2x the fp32 throughput on a CPU with AVX-512
    BF16, and on any recent GPU) or none. Evaluation and attacks outside training stay fp32."""
    check_precision(precision)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def add_precision_argument(p) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="bf16",
        help="training-step arithmetic: bf16 autocast (~2x faster on CPUs with AVX-512 BF16 and"
        " on GPUs) or fp32; checks and evaluation attacks are always fp32 (default bf16)",
    )


@torch.no_grad()
def evaluate_accuracy(model, split, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (callable, [0,1] in, logits out) on a Split."""
    from training.data import batches

    device = next(model.parameters()).device
    correct = total = 0
    for x, y in batches(split, batch_size):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(1, total)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for everything random in training step ``step`` (attacks, RT draws): a
    function of (seed, step) alone, so a resumed run replays exactly the same draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics.

    ``model`` is a frozen copy whose every float tensor moves ``1 - d`` of the way towards the
    trained network's after each step, with ``d = min(decay, (1 + step) / (10 + step))`` so the
    first steps do not drag in the random initialisation; integer buffers are copied. Averaged
    weights generalise and resist attack better than the last iterate (Izmailov et al. 2018;
    Rebuffi et al. 2021 for adversarial training), at the cost of one lerp per tensor per step.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        mine, theirs = self.model.state_dict(), model.state_dict()
        for name, t in mine.items():
            if t.dtype.is_floating_point:
                t.lerp_(theirs[name], 1.0 - d)
            else:
                t.copy_(theirs[name])


class Checkpointer:
    """Decides when to save: every ``every_s`` seconds, and at epoch ends."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            return True
        return False


@dataclass(frozen=True)
class LoopSpec:
    """What ``train_loop`` needs to know about a run."""

    batch_size: int
    epochs: int
    seed: int
    max_steps: int
    checkpoint_every_s: float
    desc: str


def train_loop(
    spec: LoopSpec,
    info: DistInfo,
    train_split,
    runlog: RunLog,
    *,
    start_step: int,
    step_fn,
    epoch_end_fn,
    save_fn,
    models: list[nn.Module],
) -> dict:
    """Run epochs of ``step_fn(x, y, step, total) -> dict of floats`` from ``start_step``.

    The data order of epoch e comes from a generator seeded with (seed, e), so a run resumed
    mid-epoch replays the same order and skips the batches already done.
    ``save_fn(name, step, epoch, metrics)`` is called on rank 0 only: with "last.safetensors"
    every ``checkpoint_every_s`` and after ``epoch_end_fn(step, train_means) -> metrics`` at each
    epoch end, and with "final.safetensors" once the last step is done, after ``models`` have
    had their buffers synchronised and their replicas checked. Returns the last metrics.
    """
    from training.data import steps_per_epoch

    spe = steps_per_epoch(train_split, spec.batch_size, info.world_size)
    if spe == 0:
        raise ValueError(
            f"batch size {spec.batch_size} x {info.world_size} replicas exceeds {len(train_split)} images"
        )
    total = spe * spec.epochs
    stop = min(spec.max_steps or total, total)

    def save(name: str, step: int, metrics: dict | None) -> None:
        if info.main:
            save_fn(name, step, step // spe, metrics)

    step = start_step
    bar = progress(stop, min(step, stop), spec.desc, info)
    saver = Checkpointer(spec.checkpoint_every_s)
    metrics: dict = {}
    with _stop_on_signal(info) as stopped:
        while step < stop:
            step, means = _one_epoch(
                spec, info, train_split, step, stop, spe, bar, saver, stopped, step_fn, save
            )
            metrics = {"epoch": round(step / spe, 3), "step": step, **epoch_end_fn(step, means)}
            runlog.write(**metrics)
            save("last.safetensors", step, metrics)
            if metrics.get("collapsed"):  # the robust check saw catastrophic overfitting: done
                total = step
                break
    bar.close()
    for m in models:
        sync_buffers(m, info)
        check_replicas(m, info)
    if step >= total:
        save("final.safetensors", step, metrics)
    return metrics


@contextlib.contextmanager
def _stop_on_signal(info: DistInfo):
    """SIGTERM/SIGINT ask a single-process run to checkpoint and exit after the current step.

    Under DDP the default handlers stay: ranks would otherwise stop at different steps and hang
    in the next all-reduce; torchrun's own shutdown applies, and the periodic checkpoint is the
    resume point.
    """
    stopped: list[int] = []
    if info.world_size > 1 or threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    previous = {
        s: signal.signal(s, lambda signum, _frame: stopped.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield stopped
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _one_epoch(spec, info, train_split, step, stop, spe, bar, saver, stopped, step_fn, save):
    """Steps until the epoch (or the run) ends; returns (step, mean of each training statistic)."""
    from training.data import batches

    gen = torch.Generator().manual_seed(spec.seed * 1000 + step // spe)
    sums: dict[str, float] = {}
    n = 0
    it = batches(
        train_split, spec.batch_size, gen=gen, train=True, rank=info.rank, world_size=info.world_size
    )
    for i, (x, y) in enumerate(it):
        if i < step % spe:  # resuming mid-epoch: replay the order, skip what was done
            continue
        if step >= stop:
            break
        stats = step_fn(x.to(info.device), y.to(info.device), step, spe * spec.epochs)
        step += 1
        n += 1
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.update(1)
        bar.set_postfix({k: f"{v / n:.3g}" for k, v in sums.items()}, refresh=False)
        if saver.due():
            save("last.safetensors", step, None)
        if stopped:
            save("last.safetensors", step, None)
            bar.close()
            log.warning(
                "stopped by signal %d at step %d; checkpoint saved, continue with --resume", stopped[0], step
            )
            raise SystemExit(128 + stopped[0])
    return step, all_mean({k: v / max(n, 1) for k, v in sums.items()}, info)
