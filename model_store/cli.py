"""``atop store list|show|verify|publish|cleanup``: inspect and maintain a model store.

Exit codes: 0 fine, 1 a version failed verification (one line naming the file), 2 a usage
error (unknown model, missing folder). Output goes to stdout; problems go to the log (stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model_store.manifest import MANIFEST_FILE, clean_figure, serving_samples
from model_store.store import (
    StoreError,
    cleanup,
    default_store,
    get_version,
    load_manifest,
    publish,
    verify,
    version_dirs,
)

log = logging.getLogger("atop.store")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None, help="store root (default: the embedded store)")
    sub = p.add_subparsers(dest="store_command", required=True, metavar="{list,show,verify,publish,cleanup}")
    ls = sub.add_parser("list", help="versions with their formats and measured accuracy")
    ls.add_argument("name", nargs="?", help="only this model")
    show = sub.add_parser("show", help="print a version's manifest (default: the newest valid one)")
    show.add_argument("name")
    show.add_argument("version", nargs="?", type=int)
    ver = sub.add_parser("verify", help="re-hash every file and validate the manifest")
    ver.add_argument("name", nargs="?", help="only this model (default: every model)")
    ver.add_argument("version", nargs="?", type=int, help="only this version")
    ver.add_argument("--path", type=Path, help="verify this version folder instead (anywhere)")
    pub = sub.add_parser("publish", help="publish a folder of model files + a manifest.json draft")
    pub.add_argument("folder", type=Path, help=f"model files and a {MANIFEST_FILE} draft")
    pub.add_argument("--name", help="model name (default: the draft's name)")
    cl = sub.add_parser("cleanup", help="remove temp folders left by killed publishers")
    cl.add_argument("--max-age-s", type=float, default=3600.0, help="only older than this (seconds)")
    for q in (ls, show, ver, pub, cl):  # also accept `atop store verify --store DIR`
        q.add_argument("--store", type=Path, default=argparse.SUPPRESS, help="store root")


def main(args: argparse.Namespace) -> int:
    root = args.store or default_store()
    cmd = args.store_command
    if cmd == "list":
        return _list(root, args.name)
    if cmd == "show":
        _out(json.dumps(get_version(root, args.name, args.version).manifest, indent=2, sort_keys=True))
        return 0
    if cmd == "verify":
        return _verify(root, args)
    if cmd == "publish":
        return _publish(root, args.folder, args.name)
    for t in cleanup(root, max_age_s=args.max_age_s):
        _out(f"removed {t}")
    return 0


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _clean(ev: dict, samples: int) -> str:
    """Clean accuracy of the default answer (``samples`` draws), the one-draw figure beside it."""
    answer, one = clean_figure(ev, samples), clean_figure(ev, 1)
    if samples == 1 or answer is None:
        return "-" if one is None else f"{one:.1%}" + ("" if samples == 1 else " (at 1)")
    return f"{answer:.1%}" + ("" if one is None else f" ({one:.1%} at 1)")


def _list(root: Path, name: str | None) -> int:
    rows = [("NAME", "VERSION", "CREATED", "FORMATS", "SAMPLES", "CLEAN", "ROBUST", "STATUS")]
    for n, v, path in version_dirs(root, name):
        try:
            m = load_manifest(path)
        except StoreError as e:
            rows.append((n, str(v), "-", "-", "-", "-", "-", f"INVALID: {e}"))
            continue
        ev = m.get("evaluation", {})
        samples = serving_samples(m)
        robust = ", ".join(f"{r['attack']}@{r['eps']:.4g}={r['accuracy']:.1%}" for r in ev.get("robust", []))
        fmts = ",".join(k for k in ("onnx", "torchscript") if m["graph"].get(k))
        rows.append((n, str(v), m["created"], fmts, str(samples), _clean(ev, samples), robust or "-", "ok"))
    if len(rows) == 1:
        _out(f"no model versions in {root}")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def _verify(root: Path, args: argparse.Namespace) -> int:
    if args.path is not None:
        targets = [args.path]
    elif args.version is not None:
        targets = [root / args.name / str(args.version)]
    else:
        targets = [p for _, _, p in version_dirs(root, args.name)]
        if not targets:
            raise FileNotFoundError(f"no model versions under {root / (args.name or '')}")
    failed = 0
    for path in targets:
        try:
            m = verify(path)
        except StoreError as e:
            log.error("FAILED %s", e)
            failed += 1
            continue
        size = sum(f["size"] for f in m["files"].values())
        _out(f"OK {m['name']}/{m['version']}  {len(m['files'])} files, {size / 1e6:.2f} MB  ({path})")
    return 1 if failed else 0


def _publish(root: Path, folder: Path, name: str | None) -> int:
    draft_path = folder / MANIFEST_FILE
    if not draft_path.is_file():
        raise FileNotFoundError(f"{draft_path}: no manifest draft in the folder to publish")
    try:
        draft = json.loads(draft_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{draft_path}: not valid JSON ({e})") from None
    if not isinstance(draft, dict):
        raise StoreError(f"{draft_path}: a manifest must be a JSON object")
    name = name or draft.get("name")
    if not name:
        raise ValueError(f"{draft_path}: no 'name' in the draft; pass --name")
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST_FILE:
            continue
        if not p.is_file():
            raise StoreError(f"{p}: only plain files can be published (no folders)")
        files[p.name] = p
    mv = publish(root, name, files, draft)
    _out(f"published {mv.name} version {mv.version} at {mv.path}")
    return 0
