"""Clean accuracy of a model-store version's ONNX graph, run exactly as the service runs it.

ONNX Runtime on the exported ``model.onnx``, randomness drawn with the service's numpy sampler
(``atop.contract.sample_rt``) from the manifest's RT spec, one fresh draw per image per pass.
Prints the accuracy averaged over ``--draws`` passes (the mean over the random transforms), the
spread between passes, the undefended classifier's accuracy from the graph's ``raw_logits``
output, and the figure recorded in the manifest for comparison.

``--samples K`` scores the service's answer for a request with ``samples=K``: K draws per image,
the defended probabilities averaged over them (``service.predict``), one fresh set of K draws per
image per pass. The default is what a request without options gets: the version's
``serving.samples`` (1 when its manifest has none). The manifest figure printed beside is the one
measured for that K (``clean_accuracy`` for 1, ``clean_accuracy_answer`` for more).

    python bench/onnx_accuracy.py --data ../shared/data/cifar10 --store model_store --model cifar10-atop
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from atop import contract
from model_store import clean_figure, default_store, get_version, serving_samples
from service.predict import make_rows, softmax
from training.data import load_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 source (the test split is used)")
    p.add_argument("--store", default=str(default_store()))
    p.add_argument("--model", default="cifar10-atop")
    p.add_argument("--version", type=int, default=None, help="default: newest valid")
    p.add_argument("--n", type=int, default=10000, help="test images (seeded subset when fewer)")
    p.add_argument("--draws", type=int, default=2, help="independent passes over the images")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="draws averaged per answer, as the service's option (default: the version's serving.samples)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per ONNX run (x samples rows)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from pathlib import Path

    mv = get_version(Path(args.store), args.model, args.version)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(
        str(mv.path / mv.manifest["graph"]["onnx"]["file"]), opts, providers=["CPUExecutionProvider"]
    )
    if args.samples is None:
        args.samples = serving_samples(mv.manifest)
    test = load_split(args.data, "test").subset(args.n, seed=args.seed)
    x_all = test.images.numpy().astype(np.float32) / 255.0
    y_all = test.labels.numpy()
    rng = np.random.default_rng(args.seed)
    spec = mv.manifest["rt"]
    per_draw, raw_correct, t0 = [], 0, time.time()
    for d in range(args.draws):
        correct = 0
        for i in range(0, len(y_all), args.batch_size):
            x, y = x_all[i : i + args.batch_size], y_all[i : i + args.batch_size]
            rows, noise, masks = make_rows(x, spec, args.samples, None, rng=rng)
            logits, raw = sess.run(
                [contract.OUTPUT_LOGITS, contract.OUTPUT_RAW_LOGITS],
                {contract.INPUT_IMAGE: rows, contract.INPUT_NOISE: noise, contract.INPUT_MASKS: masks},
            )
            probs = softmax(logits).reshape(len(y), args.samples, -1).mean(axis=1)
            correct += int((probs.argmax(1) == y).sum())
            if d == 0:
                raw_correct += int((raw[:: args.samples].argmax(1) == y).sum())
        per_draw.append(correct / len(y_all))
        print(f"pass {d + 1}/{args.draws}: defended accuracy {per_draw[-1]:.4f}", flush=True)
    result = {
        "model": f"{mv.name}/{mv.version}",
        "n_images": len(y_all),
        "draws": args.draws,
        "samples_per_answer": args.samples,
        "defended_accuracy_mean": float(np.mean(per_draw)),
        "defended_accuracy_per_draw": per_draw,
        "undefended_accuracy": raw_correct / len(y_all),
        "manifest_clean_accuracy": clean_figure(mv.manifest.get("evaluation") or {}, args.samples),
        "wall_s": round(time.time() - t0, 1),
        "images_per_s": round(args.draws * len(y_all) / (time.time() - t0), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
