"""Tiny CIFAR-like data sets written by the tests, in every format training accepts.

Each class has its own colour plus noise, so a tiny model learns it in a few steps.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "frog")


def make_images(n_per_class: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, size, size, 3] and labels [N]; class c is tinted towards channel c."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(len(CLASSES)):
        base = np.full((n_per_class, size, size, 3), 60.0)
        base[..., c % 3] = 190.0
        noisy = base + rng.normal(0, 25, base.shape)
        xs.append(np.clip(noisy, 0, 255).astype(np.uint8))
        ys += [c] * n_per_class
    return np.concatenate(xs), np.asarray(ys)


def write_folder(root: Path, n_train: int = 16, n_test: int = 8, fmt: str = "png") -> Path:
    """``root/<split>/<class>/NNNN.<fmt>``; png is lossless so tests can compare pixels."""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = make_images(n, seed)
        for i, (im, c) in enumerate(zip(x, y, strict=True)):
            d = root / split / CLASSES[c]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(d / f"{i:04d}.{fmt}")
    return root


def write_folder_tars(folder: Path, out: Path) -> Path:
    """``out/tiny-<split>.tar.gz`` from a folder tree, with a SHA256SUMS beside them."""
    import hashlib

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for split in ("train", "test"):
        path = out / f"tiny-{split}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder / split, arcname=split)
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
    (out / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return out


def _batch(x: np.ndarray, y: np.ndarray) -> bytes:
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    return pickle.dumps({b"data": data, b"labels": [int(v) for v in y]})


def write_python_archive(path: Path, n_train: int = 10, n_test: int = 6) -> Path:
    """A tar.gz laid out like cifar-10-python.tar.gz (5 train batches, test_batch, meta)."""
    members = {"cifar-10-batches-py/batches.meta": pickle.dumps({b"label_names": list(CLASSES)})}
    for i in range(1, 6):
        members[f"cifar-10-batches-py/data_batch_{i}"] = _batch(*make_images(n_train, seed=i))
    members["cifar-10-batches-py/test_batch"] = _batch(*make_images(n_test, seed=9))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
