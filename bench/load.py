"""Load benchmark of ``atop serve``: batched vs unbatched service vs the in-process ORT ceiling.

Three separate kinds of process, so that none measures itself:

* the **server**: ``atop serve`` started by this script, once with dynamic batching
  (``--max-batch-size 64 --max-delay-ms 5``) and once with batching off (``--max-batch-size 1``),
  one uvicorn worker, ORT ``--intra-op-threads`` / ``--inter-op-threads 1``, CPU;
* the **client** (``load.py client``): one asyncio process with ``c`` keep-alive connections that
  POST pre-encoded 32x32 PNGs (CIFAR-10 test images when ``--data`` has them, else synthetic
  smooth images) as raw ``image/png`` bodies, a fixed number of requests per level after a
  warm-up; it reads the server's /metrics and CPU time around the measured part only;
* the **ceiling** (``load.py ceiling``): ``service.backends.OnnxBackend`` (the same session
  options as the service) run on pre-sampled inputs at the batch the batcher would form at each
  concurrency, ``min(c * rows per request, max batch)``: no HTTP, no decoding, no sampling.

Both servers stay up for the run and the three modes of one level run back to back (same
background load); ``--rounds N`` repeats every cell and reports medians. Besides throughput, the
ceiling's CPU per image over the batched server's is reported: on a busy machine it is the ratio
that does not swing with the other processes' load.

Output: a table, the ratios batched/unbatched and batched/ceiling per concurrency, and a JSON file
(default ``bench/results/load-<time>.json``). Targets at concurrency 64: batched >= 3x unbatched
and >= 60% of the ceiling. docs/benchmarks.md has the recorded figures.

    python bench/load.py make-model --size real --out bench/results/store-real   # random weights
    nice -n 19 python bench/load.py --store bench/results/store-real --rounds 3
    python bench/load.py --quick                  # embedded default model, small request counts
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/load.py` from anywhere
from bench.serve_process import ServeProcess, child_env  # noqa: E402 (needs the path above)

RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
TARGET_VS_UNBATCHED, TARGET_VS_CEILING = 3.0, 0.60
HISTOGRAMS = ("atop_batch_size", "atop_batch_requests", "atop_inference_seconds", "atop_queue_wait_seconds")


@dataclass(frozen=True)
class BenchConfig:
    store: str | None = None  # None: the embedded default store
    model: str = "cifar10-atop"
    concurrency: tuple[int, ...] = (1, 16, 64)
    requests: int = 1000  # measured requests per concurrency level
    warmup: int = 100  # requests before measuring, per level (at least 2 per connection)
    max_batch_size: int = 64  # the batched service; the unbatched one uses 1
    max_delay_ms: float = 5.0
    intra_op_threads: int = 1  # ORT, server and ceiling alike
    inter_op_threads: int = 1
    spinning: bool = False
    samples: int = 1  # EOT draws per image (rows per request)
    log_level: str = "info"  # the server's; info writes one access line per request, as deployed
    server_cpus: tuple[int, ...] = ()  # sched_setaffinity for the server; () = no pinning
    client_cpus: tuple[int, ...] = ()
    images: int = 256  # distinct PNGs the client cycles through
    data: str = str(DEFAULT_DATA)  # CIFAR-10 folder/tar.gz with a test split; synthetic if absent
    modes: tuple[str, ...] = ("batched", "unbatched", "ceiling")
    rounds: int = 1  # repeat every cell; the report is the median (use 3 on a busy machine)


# --- inputs --------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth 'photo-like' 32x32 images: colour gradients, a few soft blobs, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        img = rng.uniform(0, 1, (1, 1, 3)) + rng.uniform(-0.5, 0.5, (1, 1, 3)) * (xx + yy)[..., None] / 2
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - blob) + rng.uniform(0, 1, (1, 1, 3)) * blob
        img = img + rng.normal(0, 0.03, img.shape)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def cifar_images(data: str, n: int) -> list[np.ndarray] | None:
    """The first n test images of the CIFAR-10 image-folder tar.gz, or None when absent."""
    from PIL import Image

    path = Path(data)
    tar = path / "cifar10-test.tar.gz" if path.is_dir() else path
    if not tar.is_file():
        return None
    out = []
    with tarfile.open(tar) as tf:
        for m in tf:
            if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".webp")):
                out.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                if len(out) == n:
                    break
    return out if out and out[0].shape == (32, 32, 3) else None


def write_images(cfg: BenchConfig, folder: Path) -> str:
    """Encode cfg.images PNGs into folder; returns where they came from."""
    arrays = cifar_images(cfg.data, cfg.images)
    source = f"CIFAR-10 test split ({cfg.data}), re-encoded as PNG"
    if arrays is None:
        arrays, source = synthetic_images(cfg.images), "synthetic smooth 32x32 images (no --data)"
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        (folder / f"{i:04d}.png").write_bytes(_png(a))
    return source


# --- the client process --------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """utime + stime of a process (seconds), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (everything except idle and iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[str, float]:
    """``_sum`` and ``_count`` of the batcher histograms from /metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.endswith(("_sum", "_count")) and name.rsplit("_", 1)[0] in HISTOGRAMS:
            out[name] = float(value)
    return out


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    body = await reader.readexactly(int(headers["content-length"]))
    return status, body, headers.get("connection") == "close"


async def _drive(host: str, port: int, requests: list[bytes], n: int, c: int) -> dict:
    """n requests over c keep-alive connections; latencies in seconds, statuses, wall time."""
    counter, lat, statuses, first = itertools.count(), [], {}, []

    async def conn() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while (i := next(counter)) < n:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status, body, close = await _read_response(reader)
            lat.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if not first:
                first.append(json.loads(body))
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conn() for _ in range(c)))
    return {"wall_s": time.perf_counter() - t0, "latencies": lat, "statuses": statuses, "first": first[0]}


def client_main(args: argparse.Namespace) -> None:
    if args.cpus:
        os.sched_setaffinity(0, [int(x) for x in args.cpus.split(",")])
    host, port = args.url.removeprefix("http://").split(":")
    blobs = [p.read_bytes() for p in sorted(Path(args.images).glob("*.png"))]
    query = f"?samples={args.samples}"  # always explicit: a version may default to more draws
    head = f"POST /classify{query} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
    requests = [(head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in blobs]
    c = args.concurrency
    warm = asyncio.run(_drive(host, int(port), requests, max(args.warmup, 2 * c), c))
    if set(warm["statuses"]) != {200}:
        raise SystemExit(f"warm-up got statuses {warm['statuses']}: {json.dumps(warm['first'])[:500]}")
    before = scrape(args.url)
    cpu0, busy0, own0 = _cpu_s(args.server_pid), _machine_busy_s(), time.process_time()
    res = asyncio.run(_drive(host, int(port), requests, args.requests, c))
    own = time.process_time() - own0
    server_cpu, busy = _cpu_s(args.server_pid) - cpu0, _machine_busy_s() - busy0
    after = scrape(args.url)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("atop_batch_size_count", 0.0) or float("nan")
    lat_ms = np.asarray(res["latencies"]) * 1000
    ok = res["statuses"].get(200, 0)
    out = {
        "concurrency": c,
        "requests": args.requests,
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(res["statuses"].items())},
        "wall_s": round(res["wall_s"], 3),
        "images_per_s": ok / res["wall_s"],
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "mean_ms": float(lat_ms.mean()),
        "batches": int(d.get("atop_batch_size_count", 0)),
        "rows_per_batch": d.get("atop_batch_size_sum", 0) / batches,
        "requests_per_batch": d.get("atop_batch_requests_sum", 0) / batches,
        "inference_ms_per_batch": 1000 * d.get("atop_inference_seconds_sum", 0) / batches,
        "inference_busy": d.get("atop_inference_seconds_sum", 0) / res["wall_s"],
        "queue_wait_ms_mean": 1000 * d.get("atop_queue_wait_seconds_sum", 0) / max(ok, 1),
        "server_cpu_ms_per_image": 1000 * server_cpu / max(ok, 1),
        "server_cores": server_cpu / res["wall_s"],
        "client_cores": own / res["wall_s"],
        "other_cores": max(0.0, busy - server_cpu - own) / res["wall_s"],
        "served_by": res["first"].get("model"),
    }
    print(json.dumps(out))


# --- the ceiling process ------------------------------------------------------------------------
def ceiling_main(args: argparse.Namespace) -> None:
    from atop import contract
    from model_store import get_version
    from service.backends import OnnxBackend, graph_file
    from service.decode import decode_many

    mv = get_version(Path(args.store), args.model, None)
    manifest = mv.manifest
    spec = manifest["rt"]
    backend = OnnxBackend(
        graph_file(mv.path, manifest, "onnx"),
        device="cpu",
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        spinning=args.spinning,
    )
    blobs = [p.read_bytes() for p in sorted(Path(args.images).glob("*.png"))]
    images = decode_many(blobs, size=int(spec["image_size"]), max_pixels=1 << 24)
    rng = np.random.default_rng(0)
    out = []
    for b in (int(x) for x in args.batches.split(",")):
        feeds = []
        for j in range(4):  # a few distinct pre-sampled batches, cycled
            idx = (np.arange(b) + j * b) % len(images)
            feeds.append((np.ascontiguousarray(images[idx]), *contract.sample_rt(spec, b, rng)))
        for f in feeds:  # warm-up
            backend.run(*f)
        runs = max(5, -(-args.rows // b))
        times = []
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(runs):
            t1 = time.perf_counter()
            backend.run(*feeds[i % len(feeds)])
            times.append(time.perf_counter() - t1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        out.append(
            {
                "batch": b,
                "runs": runs,
                "rows_per_s": runs * b / wall,
                "cpu_ms_per_row": 1000 * cpu / (runs * b),
                "batch_p50_ms": 1000 * float(np.median(times)),
                "batch_p99_ms": 1000 * float(np.percentile(times, 99)),
            }
        )
    print(json.dumps({"version": mv.version, "rt": spec, "results": out}))


# --- the orchestrator ----------------------------------------------------------------------------
def _cpus(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))


class Server(ServeProcess):
    """``atop serve`` in a child process with the benchmark's settings; log in the work folder."""

    def __init__(self, cfg: BenchConfig, store: str, max_batch: int, log_path: Path):
        flags = [
            *("--store", store, "--model-name", cfg.model),
            *("--max-batch-size", str(max_batch), "--max-delay-ms", str(cfg.max_delay_ms)),
            *("--queue-size", str(max(1024, max_batch)), "--device", "cpu", "--poll-interval-s", "0"),
            *("--intra-op-threads", str(cfg.intra_op_threads)),
            *("--inter-op-threads", str(cfg.inter_op_threads)),
            "--spinning" if cfg.spinning else "--no-spinning",
            *("--log-level", cfg.log_level),
        ]
        super().__init__(log_path, *flags, cwd=REPO, cpus=cfg.server_cpus)
        self.flags = flags


def _child(args: list[str]) -> dict:
    """Run ``load.py <args>`` in a fresh process; its last stdout line is its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(cfg: BenchConfig, mode: str, c: int, servers: dict, store: str, images: Path) -> dict:
    """One cell: a client process against a server, or a ceiling process at the batcher's batch."""
    if mode == "ceiling":
        b = min(c * cfg.samples, cfg.max_batch_size)
        args = ["ceiling", "--store", store, "--model", cfg.model, "--images", str(images)]
        args += ["--batches", str(b), "--rows", str(cfg.requests * cfg.samples)]
        args += ["--intra-op-threads", str(cfg.intra_op_threads)]
        args += ["--inter-op-threads", str(cfg.inter_op_threads)]
        args += ["--spinning"] if cfg.spinning else []
        args += ["--cpus", _cpus(cfg.server_cpus)] if cfg.server_cpus else []
        r = _child(args)["results"][0]
        r |= {
            "concurrency": c,
            "images_per_s": r["rows_per_s"] / cfg.samples,
            "cpu_ms_per_image": r["cpu_ms_per_row"] * cfg.samples,
        }
        print(
            f"  ceiling   c={c:<3d} {r['images_per_s']:8.1f} img/s  (batch {b}, {r['batch_p50_ms']:.1f} ms)"
        )
        return r
    server = servers[mode]
    args = ["client", "--url", server.url, "--server-pid", str(server.proc.pid)]
    args += ["--concurrency", str(c), "--requests", str(cfg.requests), "--warmup", str(cfg.warmup)]
    args += ["--images", str(images), "--samples", str(cfg.samples)]
    args += ["--cpus", _cpus(cfg.client_cpus)] if cfg.client_cpus else []
    r = _child(args)
    print(
        f"  {mode:<9s} c={c:<3d} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:7.1f} ms  "
        f"p99 {r['p99_ms']:7.1f} ms  {r['rows_per_batch']:5.1f} rows/batch  errors {r['requests'] - r['ok']}"
    )
    return r


def ratios(cells: dict, ceil1: dict | None) -> dict:
    """One level: batched/unbatched, batched/ceiling, unbatched/ceiling at batch 1 (``ceil1``),
    and the ceiling's CPU per image over the batched server's (robust to other load)."""
    bat, unb, ceil = (cells.get(m) for m in ("batched", "unbatched", "ceiling"))
    out = {}
    if bat and unb:
        out["batched_vs_unbatched"] = bat["images_per_s"] / unb["images_per_s"]
    if bat and ceil:
        out["batched_vs_ceiling"] = bat["images_per_s"] / ceil["images_per_s"]
        out["ceiling_cpu_vs_batched_cpu"] = ceil["cpu_ms_per_image"] / bat["server_cpu_ms_per_image"]
    if unb and ceil1:
        out["unbatched_vs_ceiling"] = unb["images_per_s"] / ceil1["images_per_s"]
    return out


def median_cells(rounds: list[dict]) -> dict:
    """{mode: {c: cell}} with every number the median over the rounds."""
    out: dict = {}
    for mode in rounds[0]:
        for c in rounds[0][mode]:
            cells = [r[mode][c] for r in rounds]
            out.setdefault(mode, {})[c] = {
                k: float(np.median([x[k] for x in cells])) if isinstance(v, int | float) else v
                for k, v in cells[0].items()
            }
    return out


def table(cfg: BenchConfig, cells: dict, rat: dict) -> str:
    lines = [
        "| mode | conc. | img/s | p50 ms | p99 ms | rows/batch | infer ms/batch | infer busy | "
        "server CPU ms/img | cores: server / client / other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("batched", "unbatched"):
        for r in cells.get(mode, {}).values():
            lines.append(
                f"| {mode} | {r['concurrency']:.0f} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['rows_per_batch']:.1f} | {r['inference_ms_per_batch']:.1f} | "
                f"{r['inference_busy']:.0%} | {r['server_cpu_ms_per_image']:.2f} | "
                f"{r['server_cores']:.2f} / {r['client_cores']:.2f} / {r['other_cores']:.2f} |"
            )
    for r in cells.get("ceiling", {}).values():
        lines.append(
            f"| ceiling, batch {r['batch']:.0f} | {r['concurrency']:.0f} | {r['images_per_s']:.1f} | "
            f"{r['batch_p50_ms']:.1f} | {r['batch_p99_ms']:.1f} | {r['batch']:.0f} | {r['batch_p50_ms']:.1f} | "
            f"100% | {r['cpu_ms_per_image']:.2f} | |"
        )
    lines += [
        "",
        "| conc. | batched / unbatched | batched / ceiling | unbatched / ceiling (batch 1) | "
        "ceiling CPU / batched server CPU |",
        "|---|---|---|---|---|",
    ]
    for c, r in rat.items():
        lines.append(
            f"| {c} | {_x(r.get('batched_vs_unbatched'))} | {_pct(r.get('batched_vs_ceiling'))} | "
            f"{_pct(r.get('unbatched_vs_ceiling'))} | {_pct(r.get('ceiling_cpu_vs_batched_cpu'))} |"
        )
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def verdict(cfg: BenchConfig, rat: dict) -> dict:
    c = max(cfg.concurrency)
    vu, vc = rat.get(c, {}).get("batched_vs_unbatched"), rat.get(c, {}).get("batched_vs_ceiling")
    return {
        "concurrency": c,
        "batched_vs_unbatched": vu,
        "target_vs_unbatched": TARGET_VS_UNBATCHED,
        "met_vs_unbatched": None if vu is None else vu >= TARGET_VS_UNBATCHED,
        "batched_vs_ceiling": vc,
        "target_vs_ceiling": TARGET_VS_CEILING,
        "met_vs_ceiling": None if vc is None else vc >= TARGET_VS_CEILING,
    }


def machine() -> dict:
    import onnxruntime

    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "nice": os.nice(0),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
        "git": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": _git("status", "--porcelain", "--", "service", "atop", "bench/load.py") != "",
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
    return done.stdout.strip()


def bench_main(cfg: BenchConfig, out: Path | None) -> dict:
    from model_store import default_store, get_version

    store = str(Path(cfg.store).resolve()) if cfg.store else str(default_store())
    try:
        mv = get_version(Path(store), cfg.model)
    except ValueError as e:  # StoreError: no valid version
        raise SystemExit(
            f"{e}\n(for timings before the trained model exists: bench/load.py make-model)"
        ) from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RESULTS / "work" / stamp
    images = work / "images"
    source = write_images(cfg, images)
    res = {
        "config": asdict(cfg),
        "store": store,
        "model": {"name": mv.name, "version": mv.version, "rt": mv.manifest.get("rt")},
        "images": source,
        "machine": machine(),
        "started": stamp,
    }
    print(f"model {mv.name} v{mv.version} from {store}; images: {source}; work folder {work}")
    servers = {}
    try:  # both servers stay up (idle costs nothing: no spinning, no watcher) so cells interleave
        for mode in (m for m in cfg.modes if m != "ceiling"):
            servers[mode] = Server(
                cfg, store, cfg.max_batch_size if mode == "batched" else 1, work / f"server-{mode}.log"
            )
        for mode, server in servers.items():
            server.wait_ready(timeout=300)
            res[mode] = {"flags": server.flags}
            print(f"[{mode}] atop serve {' '.join(server.flags)}")
        rounds = []
        for i in range(cfg.rounds):
            print(f"round {i + 1}/{cfg.rounds}")
            cells = {m: {} for m in cfg.modes}
            for c in cfg.concurrency:  # the modes of one level run back to back: same background
                for mode in cfg.modes:
                    cells[mode][c] = measure(cfg, mode, c, servers, store, images)
            rounds.append(cells)
    finally:
        for server in servers.values():
            server.stop()
    res["rounds"] = [{m: list(v.values()) for m, v in r.items()} for r in rounds]
    per_round = []
    for r in rounds:  # the batch-1 ceiling is the c=1 cell of the same round
        ceil1 = next((x for x in r.get("ceiling", {}).values() if x["batch"] == 1), None)
        per_round.append({c: ratios({m: r[m][c] for m in r}, ceil1) for c in cfg.concurrency})
    res["ratios_per_round"] = per_round
    rat = {
        c: {k: float(np.median([pr[c][k] for pr in per_round])) for k in per_round[0][c]}
        for c in cfg.concurrency
    }
    cells = median_cells(rounds)
    res["median"] = {m: list(v.values()) for m, v in cells.items()}
    res["ratios"] = rat
    res["verdict"] = v = verdict(cfg, rat)
    res["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nmedian of {cfg.rounds} round(s):\n")
    print(table(cfg, cells, rat))
    print(
        f"\nat concurrency {v['concurrency']}: batched/unbatched {_x(v['batched_vs_unbatched'])} "
        f"(target >= {TARGET_VS_UNBATCHED:g}x: {v['met_vs_unbatched']}), batched/ceiling "
        f"{_pct(v['batched_vs_ceiling'])} (target >= {TARGET_VS_CEILING:.0%}: {v['met_vs_ceiling']})"
    )
    out = out or RESULTS / f"load-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return res


# --- a model to benchmark before the trained one exists ------------------------------------------
def make_model_main(args: argparse.Namespace) -> None:
    """Random-weight checkpoints in the trainers' format, exported into a store by training.export:
    ``real`` = the shipped model's sizes (the mirror-averaged ensemble of a ResNet-20 and a
    width-48 fast net, + width-32 UNet); ``tiny`` = the test suite's sizes."""
    import tempfile

    import torch

    from tests.tiny_models import randomize_batchnorm, save_pipeline_checkpoints
    from training import export
    from training.classifier import ClassifierConfig, build_classifier
    from training.data import CIFAR10_CLASSES
    from training.purifier import PurifierConfig, UNetPurifier
    from training.transforms import RTSpec

    torch.manual_seed(args.seed)
    real = args.size == "real"
    if real:
        members = (ClassifierConfig(), ClassifierConfig(depth=1, width=48, arch="fast"))
        clf_cfg = ClassifierConfig(arch="ensemble", flip_tta=True, members=members)
    else:
        clf_cfg = ClassifierConfig(depth=1, width=4)
    pur_cfg = PurifierConfig() if real else PurifierConfig(width=4)
    clf, pur = build_classifier(clf_cfg).eval(), UNetPurifier(pur_cfg).eval()
    randomize_batchnorm(clf, torch.Generator().manual_seed(args.seed))
    spec = RTSpec(kind="rt2", noise_std=0.0625)  # the CPU recipe's deployed transform
    train = {"seed": args.seed, "note": "random weights, for bench/load.py timings only"}
    with tempfile.TemporaryDirectory() as tmp:
        c, p = save_pipeline_checkpoints(Path(tmp), clf, pur, spec.to_dict(), train=train)
        mv = export.run(
            export.ExportConfig(str(c), str(p), args.out, name=args.model, classes=CIFAR10_CLASSES)
        )
    print(f"published {mv.name} v{mv.version} at {mv.path}")


# --- command line --------------------------------------------------------------------------------
def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    d = BenchConfig()
    p.add_argument("--store", default=None, help="model store root (default: the embedded store)")
    p.add_argument("--model", default=d.model, help=f"model name in the store (default {d.model})")
    p.add_argument("--concurrency", type=_ints, default=d.concurrency, help="levels, e.g. 1,16,64")
    p.add_argument("--requests", type=int, default=None, help=f"measured requests per level ({d.requests})")
    p.add_argument("--warmup", type=int, default=None, help=f"warm-up requests per level ({d.warmup})")
    p.add_argument("--quick", action="store_true", help="small request counts, for development")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-delay-ms", type=float, default=d.max_delay_ms)
    p.add_argument("--intra-op-threads", type=int, default=d.intra_op_threads)
    p.add_argument("--inter-op-threads", type=int, default=d.inter_op_threads)
    p.add_argument("--spinning", action=argparse.BooleanOptionalAction, default=d.spinning)
    p.add_argument("--samples", type=int, default=d.samples, help="EOT samples per request (rows)")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    p.add_argument("--server-cpus", type=_ints, default=(), help="pin the server (and ceiling), e.g. 0")
    p.add_argument("--client-cpus", type=_ints, default=(), help="pin the client, e.g. 1")
    p.add_argument("--data", default=d.data, help="CIFAR-10 folder with cifar10-test.tar.gz")
    p.add_argument("--modes", default=",".join(d.modes), help="any of batched,unbatched,ceiling")
    p.add_argument("--rounds", type=int, default=d.rounds, help="repeat all cells; report medians")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/load-*.json)")

    c = sub.add_parser("client", help="(internal) the load generator process")
    c.add_argument("--url", required=True)
    c.add_argument("--server-pid", type=int, required=True)
    c.add_argument("--concurrency", type=int, required=True)
    c.add_argument("--requests", type=int, required=True)
    c.add_argument("--warmup", type=int, required=True)
    c.add_argument("--images", required=True)
    c.add_argument("--samples", type=int, default=1)
    c.add_argument("--cpus", default="")

    e = sub.add_parser("ceiling", help="(internal) in-process ONNX Runtime on pre-sampled inputs")
    e.add_argument("--store", required=True)
    e.add_argument("--model", required=True)
    e.add_argument("--images", required=True)
    e.add_argument("--batches", required=True)
    e.add_argument("--rows", type=int, required=True)
    e.add_argument("--intra-op-threads", type=int, required=True)
    e.add_argument("--inter-op-threads", type=int, required=True)
    e.add_argument("--spinning", action="store_true")
    e.add_argument("--cpus", default="")

    m = sub.add_parser("make-model", help="export a random-weight model (real or tiny size) into a store")
    m.add_argument("--size", choices=["real", "tiny"], default="real")
    m.add_argument("--out", required=True, help="store root to publish into")
    m.add_argument("--model", default=d.model)
    m.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.cmd == "client":
        return client_main(args)
    if args.cmd == "ceiling":
        if args.cpus:
            os.sched_setaffinity(0, _ints(args.cpus))
        return ceiling_main(args)
    if args.cmd == "make-model":
        return make_model_main(args)
    d = BenchConfig()
    cfg = BenchConfig(
        store=args.store,
        model=args.model,
        concurrency=args.concurrency,
        requests=args.requests or (160 if args.quick else d.requests),
        warmup=args.warmup or (32 if args.quick else d.warmup),
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        spinning=args.spinning,
        samples=args.samples,
        log_level=args.log_level,
        server_cpus=args.server_cpus,
        client_cpus=args.client_cpus,
        images=64 if args.quick else d.images,
        data=args.data,
        modes=tuple(m for m in args.modes.split(",") if m),
        rounds=args.rounds,
    )
    bench_main(cfg, args.out)


if __name__ == "__main__":
    main()
