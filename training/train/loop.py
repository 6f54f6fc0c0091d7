"""The trainer skeleton: one ``Run`` from its --out folder to final.safetensors.

A trainer (classifier.py, purifier.py) builds its data, its models and its training step, then
hands them to a ``Run``, which does everything else once for every trainer:

    session = Run("classifier", cfg.out, precision=..., resume=..., overwrite=...)  # DDP, --out
    session.saves(config, models={...}, optimizers={...})  # what every checkpoint holds
    if not session.resume(): ...                 # last.safetensors, or a fresh start (--init)
    session.keep_best(HeldOut(check, held, target))  # adversarial runs: best.safetensors
    return session.train(LoopConfig.of(cfg), train, step, step.checks, replicas=[model])

``train`` runs the epochs: the data order of epoch e from a generator seeded with (seed, e), so
a run resumed mid-epoch replays it and skips what was done; after each epoch the mean of each
statistic the step returns (logged as ``train_<name>``), what ``checks()`` measures and the
robust check, one line of metrics.jsonl and last.safetensors; a checkpoint every
``checkpoint_every_s`` and on SIGTERM/SIGINT; at the end the replica check and final.safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import Batch, Split, steps_per_epoch, train_batches
from training.train.distributed import (
    DistInfo,
    all_mean,
    check_replicas,
    finish_distributed,
    init_distributed,
    rank0_flag,
    sync_buffers,
)
from training.train.robust_check import BestEpoch, HeldOut, robust_accuracy
from training.train.step import check_precision

log = logging.getLogger("atop.train")


@dataclass(frozen=True)
class LoopConfig:
    """The loop's share of a trainer's config (its fields of the same names)."""

    batch_size: int  # images per process per step
    epochs: int  # passes over the training split
    seed: int  # epoch e's data order and augmentation come from a generator seeded by (seed, e)
    max_steps: int  # steps after which the run stops early (0 = all epochs)
    checkpoint_every_s: float  # seconds between periodic saves of last.safetensors

    @classmethod
    def of(cls, cfg) -> LoopConfig:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


class Run:
    """One training run in its --out folder (see the module docstring). On rank 0 only: the
    checkpoints, metrics.jsonl, the progress bar and the per-epoch figures."""

    def __init__(
        self,
        name: str,
        out: str | Path,
        *,
        precision: str,
        resume: bool = False,
        overwrite: bool = False,
        threads: int | None = None,
    ):
        check_precision(precision)
        self.name = name  # the progress bar's label
        self.info = init_distributed(threads)
        self.out = Path(out)
        claim_out(self.out, resume=resume, overwrite=overwrite)
        self.resuming = resume
        self.step = 0  # training steps done
        self.spe = 1  # steps per epoch, known once ``train`` has the split
        self.config: dict = {}
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.last_only: dict[str, nn.Module] = {}
        self.best: tuple[BestEpoch, HeldOut] | None = None

    def saves(
        self,
        config: dict,
        models: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        last_only: dict[str, nn.Module] | None = None,
    ) -> None:
        """What every checkpoint holds: the run's ``config`` (``checkpoint.run_config``) and
        ``models`` by name; last.safetensors, the resume point, also ``optimizers`` and
        ``last_only`` models (e.g. the trained network when the saved one is its average)."""
        self.config, self.models, self.optimizers = config, models, optimizers
        self.last_only = last_only or {}

    def resume(self) -> bool:
        """With --resume, load last.safetensors into the models and optimizers and continue from
        its step; False when there is nothing to resume (a fresh run)."""
        path = self.out / "last.safetensors"
        if not (self.resuming and path.is_file()):
            return False
        ck = load_checkpoint(path)
        for name, model in (self.models | self.last_only).items():
            model.load_state_dict(ck.state_dict(name))
        for name, opt in self.optimizers.items():
            ck.load_optimizer(name, opt)
        self.step = ck.header["step"]
        log.info("resumed from %s at step %d", ck.path, self.step)
        return True

    def keep_best(self, held: HeldOut) -> None:
        """After every epoch, attack ``held.target()`` on the held-out images, log
        ``robust_acc``, keep the best epoch as best.safetensors (``BestEpoch``) and stop when
        robustness collapses."""
        self.best = (BestEpoch(self.out, held.check), held)

    def save(self, name: str, metrics: dict | None = None) -> None:
        if not self.info.main:
            return
        last = name == "last.safetensors"
        save_checkpoint(
            self.out / name,
            models=self.models | (self.last_only if last else {}),
            optimizers=self.optimizers if last else None,
            config=self.config,
            step=self.step,
            epoch=self.step // self.spe,
            metrics=metrics,
        )

    def train(
        self,
        loop: LoopConfig,
        split: Split,
        step: Callable[[Batch, int, int], dict],
        checks: Callable[[], dict],
        replicas: list[nn.Module],
    ) -> dict:
        """Run ``step(batch, step, total steps) -> statistics`` over the epochs, from the resumed
        step. After each epoch ``replicas`` (the trained networks) get rank 0's buffers, then the
        epoch's metrics are the mean of each statistic (``train_<name>``) and what ``checks()``
        measures (called on every rank; figures on rank 0); at the end the replicas are checked.
        Returns the last epoch's metrics."""
        info = self.info
        self.spe = steps_per_epoch(split, loop.batch_size, info.world_size)
        if self.spe == 0:
            raise ValueError(
                f"batch size {loop.batch_size} x {info.world_size} replicas exceeds {len(split)} images"
            )
        total = self.spe * loop.epochs
        stop = min(loop.max_steps or total, total)
        runlog = RunLog(self.out, info)
        bar = progress(stop, min(self.step, stop), self.name, info)
        saver = Checkpointer(loop.checkpoint_every_s)
        metrics: dict = {}
        with _stop_on_signal(info) as stopped:
            while self.step < stop:
                means = self._epoch(loop, split, stop, step, bar, saver, stopped)
                metrics = self._epoch_end(means, checks, replicas)
                runlog.write(**metrics)
                self.save("last.safetensors", metrics)
                # only rank 0 runs the robust check; every rank stops with it
                if rank0_flag(bool(metrics.get("collapsed")), self.info):  # catastrophic overfitting
                    total = self.step
                    break
        bar.close()
        for m in replicas:
            sync_buffers(m, info)
            check_replicas(m, info)
        if self.step >= total:
            self.save("final.safetensors", metrics)
        finish_distributed(info)
        return metrics

    def _epoch(self, loop: LoopConfig, split: Split, stop: int, step_fn, bar, saver, stopped) -> dict:
        """Steps until the epoch (or the run) ends; returns the mean of each training statistic."""
        info, spe = self.info, self.spe
        gen = torch.Generator().manual_seed(loop.seed * 1000 + self.step // spe)
        sums: dict[str, float] = {}
        n = 0
        batches = train_batches(split, loop.batch_size, gen, rank=info.rank, world_size=info.world_size)
        for i, batch in enumerate(batches):
            if i < self.step % spe:  # resuming mid-epoch: replay the order, skip what was done
                continue
            if self.step >= stop:
                break
            stats = step_fn(batch.to(info.device), self.step, spe * loop.epochs)
            self.step += 1
            n += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix({k: f"{v / n:.3g}" for k, v in sums.items()}, refresh=False)
            if saver.due() or stopped:
                self.save("last.safetensors")
            if stopped:
                bar.close()
                log.warning(
                    "stopped by signal %d at step %d; checkpoint saved, continue with --resume",
                    stopped[0],
                    self.step,
                )
                raise SystemExit(128 + stopped[0])
        return all_mean({k: v / max(n, 1) for k, v in sums.items()}, info)

    def _epoch_end(self, means: dict, checks, replicas: list[nn.Module]) -> dict:
        for m in replicas:
            sync_buffers(m, self.info)
        found = {f"train_{k}": v for k, v in means.items()} | checks()
        if self.best is not None and self.info.main:
            best, held = self.best
            found = best.record_and_keep(
                robust_accuracy(held.target(), held.split, held.check),
                len(held.split),
                found,
                lambda m: self.save("best.safetensors", m),
            )
        return {"epoch": round(self.step / self.spe, 3), "step": self.step, **found}


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
