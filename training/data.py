"""CIFAR-10-style data: load once into uint8 tensors, augment on the batch.

Accepted sources (``load_split`` figures out which one it was given):

* an image-folder tree ``<root>/<split>/<class>/*.{jpg,jpeg,png,bmp,webp}``;
* the same tree packed as ``*.tar.gz`` (e.g. ``cifar10-train.tar.gz``), with an optional
  ``SHA256SUMS`` file beside it that is verified when present;
* the standard ``cifar-10-python.tar.gz`` archive (md5-verified) or its extracted
  ``cifar-10-batches-py`` folder.

Decoding 60k JPEGs takes a while on two cores, so decoded arrays are cached as ``.npz``
(no pickle) keyed by the archive's checksum.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from atop.imaging import fit_square, model_pixels
from training.checkpoint import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# md5 published with the official archive (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_PYTHON_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_PYTHON_NAME = "cifar-10-python.tar.gz"
DATA_HELP = (
    "data set: an image-folder tree ROOT/{train,test}/<class>/*.png|jpg (any classes, named by"
    " their folders; any image size, brought to --image-size as the service does), the same tree"
    " as *.tar.gz, or CIFAR-10's cifar-10-python.tar.gz"
)


class DataError(ValueError):
    """A data set is missing, malformed or fails its checksum. The message says which."""


@dataclass(frozen=True)
class Split:
    """One split held in memory: images uint8 [N,3,H,W], labels int64 [N], and optionally soft
    targets float [N, classes] (a teacher's predictions, see ``atop train classifier --teacher``)
    that travel with their images through ``subset``, ``hold_out`` and ``train_batches``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str
    checksum: str
    soft: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int, seed: int = 0) -> Split:
        """A seeded random subset of ``n`` items (the whole split if ``n`` >= len)."""
        if n >= len(self):
            return self
        gen = torch.Generator().manual_seed(seed)
        return self._take(torch.randperm(len(self), generator=gen)[:n].sort().values)

    def hold_out(self, n: int, seed: int = 0) -> tuple[Split, Split]:
        """(the rest, ``n`` seeded random items held out): disjoint, together the whole split."""
        if not 0 < n < len(self):
            raise ValueError(f"cannot hold out {n} of {len(self)} images")
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=gen)
        rest, held = perm[n:].sort().values, perm[:n].sort().values
        return self._take(rest), self._take(held)

    def _take(self, idx: torch.Tensor) -> Split:
        soft = None if self.soft is None else self.soft[idx]
        return Split(self.images[idx], self.labels[idx], self.classes, self.source, self.checksum, soft)


def _file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_sha256sums(archive: Path) -> str:
    """Verify ``archive`` against a SHA256SUMS file beside it, if any; return its sha256."""
    digest = _file_digest(archive)
    sums = archive.parent / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == archive.name:
                if parts[0] != digest:
                    raise DataError(
                        f"{archive}: sha256 {digest} does not match {parts[0]} in {sums}; "
                        "the file is corrupt or was replaced"
                    )
                break
    return digest


def _decode(data: bytes, where: str, size: int) -> np.ndarray:
    """One image file -> uint8 [size, size, 3] by the service's own rule (atop/imaging.py)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return model_pixels(im, size)
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{where}: not a readable image ({e})") from e


def _stack(images: list[np.ndarray], labels: list[int], where: str) -> tuple[np.ndarray, np.ndarray]:
    if not images:
        raise DataError(f"{where}: no images found")
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, dtype=np.int64)


def _from_member_names(
    names: list[str], split: str, where: str
) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Pick ``<split>/<class>/<file>`` members (at any depth prefix); return classes and items."""
    items: list[tuple[str, str]] = []
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if len(parts) >= 3 and parts[-3] == split and parts[-1].lower().endswith(IMAGE_SUFFIXES):
            items.append((name, parts[-2]))
    if not items:
        raise DataError(
            f"{where}: no images under '{split}/<class>/'; expected a tree like {split}/airplane/0000.jpg"
        )
    classes = tuple(sorted({c for _, c in items}))
    index = {c: i for i, c in enumerate(classes)}
    return classes, [(n, index[c]) for n, c in sorted(items)]


def _load_folder(root: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    base = root / split if (root / split).is_dir() else root
    # os.walk with followlinks: a class folder may be a symlink to images kept elsewhere.
    names = [
        str((Path(d) / f).relative_to(base.parent))
        for d, _, files in os.walk(base, followlinks=True)
        for f in files
    ]
    classes, items = _from_member_names(names, base.name if base != root else split, str(root))
    ims = [_decode((base.parent / n).read_bytes(), str(base.parent / n), size) for n, _ in items]
    x, y = _stack(ims, [c for _, c in items], str(root))
    return x, y, classes


def _load_folder_tar(archive: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    with tarfile.open(archive, "r:*") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        classes, items = _from_member_names(list(members), split, str(archive))
        ims = []
        for name, _ in items:
            f = tar.extractfile(members[name])
            assert f is not None
            ims.append(_decode(f.read(), f"{archive}:{name}", size))
    x, y = _stack(ims, [c for _, c in items], str(archive))
    return x, y, classes


def _unpickle_batch(data: bytes, where: str) -> dict:
    # The official archive is a pickle of plain arrays and lists; only the archive whose md5
    # matched (or a folder the user pointed at) gets here.
    try:
        d = pickle.loads(data, encoding="bytes")
    except Exception as e:
        raise DataError(f"{where}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"{where}: not a CIFAR-10 python batch (no data/labels)")
    return d


def _python_batches(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _load_python(read, split: str, where: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    xs, ys = [], []
    for name in _python_batches(split):
        d = _unpickle_batch(read(name), f"{where}:{name}")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), CIFAR10_CLASSES


def _load_python_tar(archive: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    with tarfile.open(archive, "r:gz") as tar:
        by_base = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            if name not in by_base:
                raise DataError(f"{archive}: member {name} missing; not a CIFAR-10 python archive")
            f = tar.extractfile(by_base[name])
            assert f is not None
            return f.read()

        return _load_python(read, split, str(archive))


def _cache_dir() -> Path:
    return Path(os.environ.get("ATOP_CACHE", Path.home() / ".cache" / "atop"))


def _resolve(root: Path, split: str) -> tuple[str, Path]:
    """Decide which format ``root`` holds. Returns (kind, path)."""
    if not root.exists():
        raise DataError(
            f"data path {root} does not exist; pass a folder with <split>/<class>/*.jpg, "
            f"a {split} tar.gz of such a tree, or {CIFAR10_PYTHON_NAME}"
        )
    if root.is_file():
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(root, "r:*") as tar:
                names = tar.getnames()
            if any(Path(n).name == "batches.meta" for n in names):
                return "python-tar", root
            return "folder-tar", root
        raise DataError(f"{root}: not a folder or a .tar.gz archive")
    if (root / CIFAR10_PYTHON_NAME).is_file():
        return "python-tar", root / CIFAR10_PYTHON_NAME
    for cand in (root / "cifar-10-batches-py", root):
        if (cand / "batches.meta").is_file():
            return "python-dir", cand
    if (root / split).is_dir():
        return "folder", root
    tars = sorted(root.glob(f"*{split}*.tar.gz"))
    if len(tars) == 1:
        return "folder-tar", tars[0]
    raise DataError(
        f"{root}: found no '{split}/' folder, no '*{split}*.tar.gz', no {CIFAR10_PYTHON_NAME} "
        "and no cifar-10-batches-py; nothing to load"
    )


def load_split(
    root: str | Path,
    split: str,
    *,
    size: int = 32,
    classes: tuple[str, ...] | None = None,
    cache: bool = True,
) -> Split:
    """Load ``split`` ('train' or 'test') from any supported source under ``root``.

    Every image becomes ``size`` x ``size`` RGB by the rule the service applies to requests
    (atop/imaging.py: centred square crop, bicubic resize; a ``size``-square image is kept bit
    for bit), so training and serving see the same pixels. Image folders name the classes: their
    folder names, sorted. ``classes`` (the training split's, when loading a test split) puts the
    labels in that order by name: a class the model does not know is refused, a class with no
    image here is only logged.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', not {split!r}")
    if size < 8:
        raise DataError(f"image size must be at least 8 pixels, not {size}")
    kind, path = _resolve(Path(root).expanduser(), split)
    if kind == "python-tar":
        digest = _file_digest(path, "md5")
        if path.name == CIFAR10_PYTHON_NAME and digest != CIFAR10_PYTHON_MD5:
            raise DataError(f"{path}: md5 {digest} is not the official {CIFAR10_PYTHON_MD5}")
    elif kind == "folder-tar":
        digest = _verify_sha256sums(path)
    else:
        digest = "unverified-folder"
    cache_file = _cache_dir() / (f"{split}-{digest}.npz" if size == 32 else f"{split}-{digest}-{size}px.npz")
    if cache and kind in ("python-tar", "folder-tar") and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            x, y, found = z["x"], z["y"], tuple(str(c) for c in z["classes"])
    else:
        log.info("decoding %s (%s)", path, kind)
        if kind == "python-tar":
            x, y, found = _resize_all(*_load_python_tar(path, split), size)
        elif kind == "python-dir":
            x, y, found = _resize_all(
                *_load_python(lambda n: _read_or_fail(path / n), split, str(path)), size
            )
        elif kind == "folder-tar":
            x, y, found = _load_folder_tar(path, split, size)
        else:
            x, y, found = _load_folder(path, split, size)
        if cache and kind in ("python-tar", "folder-tar"):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
                np.savez(f, x=x, y=y, classes=np.asarray(found))
    labels = torch.from_numpy(y)
    if classes is not None and tuple(classes) != found:
        labels = _relabel(labels, found, tuple(classes), f"{path} ({split})")
        found = tuple(classes)
    return Split(torch.from_numpy(x), labels, found, str(path), digest)


def _resize_all(
    x: np.ndarray, y: np.ndarray, classes: tuple[str, ...], size: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The 32-px python archive at another size, image by image through the same rule."""
    if x.shape[-1] == size:
        return x, y, classes
    out = np.stack([np.asarray(fit_square(Image.fromarray(im.transpose(1, 2, 0)), size)) for im in x])
    return out.transpose(0, 3, 1, 2).copy(), y, classes


def _relabel(
    labels: torch.Tensor, found: tuple[str, ...], classes: tuple[str, ...], where: str
) -> torch.Tensor:
    """Labels indexing ``found`` -> labels indexing ``classes``, matched by name."""
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(
            f"{where}: class folder(s) {', '.join(unknown)} are not among the training classes"
            f" ({', '.join(classes)}); a model cannot be scored on classes it was not trained on"
        )
    missing = [c for c in classes if c not in found]
    if missing:
        log.warning("%s: no images of class(es) %s; accuracy covers the others", where, ", ".join(missing))
    index = torch.tensor([classes.index(c) for c in found], dtype=torch.int64)
    return index[labels]


def channel_stats(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels in [0, 1], to 4 decimals: the
    classifier's input normalisation (CIFAR-10's training set gives the usual 0.4914, ...)."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(split), 4096):
        x = split.images[i : i + 4096].to(torch.float64).div_(255)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = split.images.numel() // 3
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _read_or_fail(p: Path) -> bytes:
    if not p.is_file():
        raise DataError(f"{p} missing; not a complete cifar-10-batches-py folder")
    return p.read_bytes()


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding and random horizontal flip, on a whole batch."""
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = xp[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def batches(split: Split, batch_size: int):
    """Yield (x float in [0,1], y) batches of every image, in order (evaluation)."""
    for i in range(0, len(split), batch_size):
        yield split.images[i : i + batch_size].float().div(255), split.labels[i : i + batch_size]


@dataclass(frozen=True)
class Batch:
    """One training batch: images float [B,3,H,W] in [0,1], their labels, and their soft targets
    when the split carries them."""

    x: torch.Tensor
    y: torch.Tensor
    soft: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        soft = None if self.soft is None else self.soft.to(device)
        return Batch(self.x.to(device), self.y.to(device), soft)


def train_batches(split: Split, batch_size: int, gen: torch.Generator, *, rank: int = 0, world_size: int = 1):
    """Yield one epoch of ``Batch``es: shuffled by ``gen``, augmented, the tail dropped.

    Under DDP every rank draws the same permutation (same seed) and takes its own stride of
    it, so the ranks see disjoint data and the same number of steps.
    """
    order = torch.randperm(len(split), generator=gen)
    per_rank = len(split) // world_size
    order = order[rank::world_size][:per_rank]
    for i in range(per_rank // batch_size):
        idx = order[i * batch_size : (i + 1) * batch_size]
        x = augment(split.images[idx].float().div_(255), gen)
        yield Batch(x, split.labels[idx], None if split.soft is None else split.soft[idx])


def steps_per_epoch(split: Split, batch_size: int, world_size: int = 1) -> int:
    return (len(split) // world_size) // batch_size
