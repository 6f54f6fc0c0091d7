"""Data loading: every accepted format, checksums, clear errors, batch augmentation."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from tests.tiny_data import CLASSES, make_images, write_folder, write_folder_tars, write_python_archive
from training.data import DataError, augment, load_split, train_batches


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOP_CACHE", str(tmp_path / "cache"))


def test_image_folder_tree(tmp_path):
    root = write_folder(tmp_path / "tree")
    train = load_split(root, "train")
    assert train.images.shape == (48, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == tuple(sorted(CLASSES))
    assert torch.bincount(train.labels).tolist() == [16, 16, 16]
    x, y = make_images(16, seed=0)  # png is lossless: pixels survive the round trip
    cat = CLASSES.index("cat")
    assert torch.equal(
        train.images[train.labels == cat][0], torch.from_numpy(x[y == cat][0]).permute(2, 0, 1)
    )


def test_folder_tar_matches_folder_and_caches(tmp_path):
    root = write_folder(tmp_path / "tree")
    tars = write_folder_tars(root, tmp_path / "tars")
    a, b = load_split(root, "test"), load_split(tars, "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(list((tmp_path / "cache").glob("test-*.npz"))) == 1
    c = load_split(tars / "tiny-test.tar.gz", "test")  # second load comes from the cache
    assert torch.equal(c.images, b.images)


def test_sha256sums_mismatch_is_refused(tmp_path):
    tars = write_folder_tars(write_folder(tmp_path / "tree"), tmp_path / "tars")
    sums = tars / "SHA256SUMS"
    sums.write_text(sums.read_text().replace(sums.read_text()[:8], "00000000", 1))
    with pytest.raises(DataError, match="sha256"):
        load_split(tars, "train")


def test_python_archive_and_folder(tmp_path):
    archive = write_python_archive(tmp_path / "py" / "tiny-python.tar.gz")
    train, test = load_split(archive, "train"), load_split(archive, "test")
    assert train.images.shape == (5 * 30, 3, 32, 32) and test.images.shape == (18, 3, 32, 32)
    x, _ = make_images(10, seed=1)
    assert torch.equal(train.images[0], torch.from_numpy(x[0]).permute(2, 0, 1))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "py", filter="data")
    from_dir = load_split(tmp_path / "py" / "cifar-10-batches-py", "test")
    assert torch.equal(from_dir.images, test.images)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "nothing to load"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a folder or a .tar.gz"),
    ],
)
def test_bad_paths_give_clear_errors(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        load_split(setup(tmp_path), "train")


def test_corrupt_image_is_named(tmp_path):
    root = write_folder(tmp_path / "tree")
    bad = root / "train" / "dog" / "0003.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="0003.png"):
        load_split(root, "train")


def test_cli_reports_bad_data_path_without_traceback(tmp_path, capsys, caplog):
    from atop.cli import main

    rc = main(["train", "classifier", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "does not exist" in caplog.text and "Traceback" not in capsys.readouterr().err


def test_augment_is_a_seeded_crop_or_flip_of_the_padded_image():
    x = torch.rand(8, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    # The centre of each output is a shifted window of its own image (or its mirror).
    for i in range(8):
        padded = torch.nn.functional.pad(x[i : i + 1], (4, 4, 4, 4), mode="reflect")[0]
        found = any(
            torch.equal(cand, a[i])
            for img in (padded, padded.flip(2))
            for dy in range(9)
            for dx in range(9)
            for cand in [img[:, dy : dy + 32, dx : dx + 32]]
        )
        assert found


def test_batches_shard_disjointly_across_ranks(tmp_path):
    split = load_split(write_folder(tmp_path / "tree"), "train")
    seen = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(0)
        for b in train_batches(split, 8, gen, rank=rank, world_size=2):
            assert b.x.dtype == torch.float32 and b.x.min() >= 0 and b.x.max() <= 1
            seen.append(b.y)
    assert sum(len(y) for y in seen) == 48
    assert np.isclose(torch.cat(seen).float().mean().item(), 1.0)
