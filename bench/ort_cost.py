"""ONNX Runtime cost per image per RT draw of model-store versions, side by side.

Each version folder's ``model.onnx`` runs in the service's own backend
(``service.backends.OnnxBackend``: the same session options; ``--threads`` intra-op threads, 1 by
default, the service's layout), on batches of ``--batch`` random images with the
randomness drawn from its manifest's RT spec by the service's sampler. The versions take turns,
round after round, so a machine that gets busier or quieter in between affects all of them
alike; the figure per version is the median over rounds of the wall time per image, and the ratio
to the first version is printed beside it (ratios travel between machines; absolute times do not).

    python bench/ort_cost.py model_store/cifar10-atop/6 model_store/cifar10-atop/7 \
        --out bench/results/ort-cost-v6-v7.json

A version retired from the package can be taken out of git history first, e.g.
``git archive c888f58 model_store/cifar10-atop/6 | tar -x -C /tmp``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from atop import contract


def backend(folder: Path, threads: int):
    """The service's ONNX Runtime backend (same session options) on a version folder."""
    from service.backends import OnnxBackend, graph_file

    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{folder}: no manifest.json (give a model-store version folder)")
    manifest = json.loads(manifest_path.read_text())
    onnx = graph_file(folder, manifest, "onnx")
    return OnnxBackend(onnx, device="cpu", intra_op_threads=threads, inter_op_threads=1), manifest


def feeds(spec: dict, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = int(spec["image_size"])
    noise, masks = contract.sample_rt(spec, batch, rng)
    return rng.random((batch, 3, s, s), dtype=np.float32), noise, masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "versions", nargs="+", type=Path, help="model-store version folders; the first is the reference"
    )
    p.add_argument("--batch", type=int, default=64, help="images per ORT run (default 64)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=7, help="rounds; every version runs once per round")
    p.add_argument("--runs", type=int, default=5, help="ORT runs per version per round")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    models = []
    for folder in args.versions:
        be, manifest = backend(folder, args.threads)
        feed = feeds(manifest["rt"], args.batch, rng)
        be.run(*feed)  # warm-up
        models.append({"folder": str(folder), "manifest": manifest, "backend": be, "feed": feed, "ms": []})
    for _ in range(args.rounds):
        for m in models:
            t0 = time.perf_counter()
            for _ in range(args.runs):
                m["backend"].run(*m["feed"])
            m["ms"].append(1000 * (time.perf_counter() - t0) / (args.runs * args.batch))
    ref = statistics.median(models[0]["ms"])
    rows = []
    for m in models:
        med = statistics.median(m["ms"])
        name = f"{m['manifest'].get('name', '?')} v{m['manifest'].get('version', '?')}"
        rows.append(
            {
                "version": name,
                "folder": m["folder"],
                # which graph was timed, whatever the folder is called (a scratch store's v2 and
                # the package's v14 can be the very same file)
                "onnx_sha256": m["manifest"].get("files", {}).get("model.onnx", {}).get("sha256"),
                "ms_per_image_per_draw": round(med, 4),
                "min_ms": round(min(m["ms"]), 4),
                "max_ms": round(max(m["ms"]), 4),
                "ratio_to_first": round(med / ref, 4),
            }
        )
        print(
            f"{name:24s} {med:7.3f} ms/image/draw (min {min(m['ms']):.3f}, max {max(m['ms']):.3f})  "
            f"x{med / ref:.3f} of the first"
        )
    result = {
        "what": "ONNX Runtime wall time per image per RT draw, median over interleaved rounds",
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "runs_per_round": args.runs,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "onnxruntime": ort.__version__,
        "results": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
