"""Checkpoints: one safetensors file per save, written atomically (tmp + os.replace).

Everything a resume needs goes into that one file: tensors of every model and optimizer under
``model/<name>/...`` and ``optim/<name>/...``, and a JSON header (config, step, epoch, metrics,
optimizer hyper-parameters, git commit) in the safetensors metadata. No pickle anywhere. A
readable copy of the JSON is written beside it as ``<stem>.json``.

The header's config is ``{"kind", "train", "model", ...}``: written by ``run_config`` and read by
``model_config`` (which refuses a checkpoint of another kind). Also here, for every file that
training writes or loads: ``atomic_path`` (temp file, then rename) and ``quiet_jit`` (the
TorchScript deprecation warning filter).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "atop-checkpoint/1"
JIT_DEPRECATED = r".*torch\.jit.*deprecated"  # torch 2.13 deprecates torch.jit; it still works


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an error (and removed when it does not), so a reader finds the old file or the whole
    new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def quiet_jit():
    """torch.jit calls without its deprecation warning (TorchScript stays one of our formats)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATED, category=DeprecationWarning)
        yield


def run_config(kind: str, *, train: dict, model: dict, **extra) -> dict:
    """The config a checkpoint of ``kind`` ("classifier" or "purifier") carries: the training
    settings (or provenance) ``train``, the model's ``model`` config, and ``extra`` entries."""
    return {"kind": kind, "train": train, "model": model, **extra}


def model_config(config: dict, kind: str, where) -> dict:
    """The ``model`` entry of a checkpoint config, refused (naming ``where``) unless the
    checkpoint is of ``kind``."""
    if config.get("kind") != kind:
        raise ValueError(f"{where}: not a {kind} checkpoint (kind={config.get('kind')!r})")
    return config["model"]


@functools.cache
def git_commit() -> str:
    """The code's commit (+ "-dirty"), read once per process: the code cannot change under it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        sha = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: tensors by group and the JSON header."""

    path: Path
    header: dict
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.header["config"]

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if f"model/{name}" not in self.tensors:
            have = sorted(k.split("/", 1)[1] for k in self.tensors if k.startswith("model/"))
            raise KeyError(f"{self.path}: no model '{name}' in checkpoint (has {have})")
        return self.tensors[f"model/{name}"]

    def load_optimizer(self, name: str, opt: torch.optim.Optimizer) -> None:
        meta = self.header["optimizers"][name]
        flat = self.tensors.get(f"optim/{name}", {})
        state: dict[int, dict] = {}
        for key, t in flat.items():
            idx, k = key.split(".", 1)
            state.setdefault(int(idx), {})[k] = t
        for idx, scalars in meta["scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(
    path: str | Path,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    config: dict,
    step: int,
    epoch: int,
    metrics: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write everything to ``path`` (a .safetensors file) atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for name, m in models.items():
        for k, v in unwrap(m).state_dict().items():
            flat[f"model/{name}/{k}"] = v.detach().contiguous().cpu()
    opt_meta = {}
    for name, opt in (optimizers or {}).items():
        t, meta = _flatten_optimizer(opt)
        flat.update({f"optim/{name}/{k}": v for k, v in t.items()})
        opt_meta[name] = meta
    for k, v in (extra_tensors or {}).items():
        flat[f"extra/misc/{k}"] = v.detach().contiguous().cpu()
    header = {
        "format": FORMAT,
        "config": config,
        "step": step,
        "epoch": epoch,
        "metrics": metrics or {},
        "optimizers": opt_meta,
        "git_commit": git_commit(),
    }
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"atop": json.dumps(header, sort_keys=True)})
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; raise ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "atop" not in meta:
                raise ValueError(f"{path}: safetensors file without an atop checkpoint header")
            header = json.loads(meta["atop"])
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                kind, name, rest = key.split("/", 2)
                groups.setdefault(f"{kind}/{name}", {})[rest] = f.get_tensor(key)
    except (OSError, json.JSONDecodeError) as e:  # safetensors raises SafetensorError(OSError)
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {header.get('format')!r}")
    return Checkpoint(path=path, header=header, tensors=groups)
