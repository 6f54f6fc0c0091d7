"""Peer benchmark: ``atop serve`` against BentoML serving the same model.onnx, the same client.

* **atop**: ``atop serve`` with its defaults (``atop serve --help``: one uvicorn worker, ORT's own
  thread choice, no spinning, dynamic batching up to 32, 5 ms), pinned to the measured version;
  one raw ``image/jpeg`` body per request (its cheapest form; ``--atop-body multipart`` to check).
* **BentoML** (pinned in bench/requirements-bentoml.txt, installed by this script into its own
  virtual environment, ``bench/.venv-bentoml``, never the project's): the service in
  bench/bentoml_service/service.py, doing the same work per image (decode, RGB, resize, [0, 1],
  one RT draw, the same graph outputs, softmax, top-1), adaptive batching up to 64,
  ``--bento-workers`` processes (default: one per CPU, BentoML's layout for CPU work) x 1 ORT
  thread; one multipart upload per request (BentoML's image input).
* **client** (``peer.py client``, a process of its own): bench/load.py's asyncio keep-alive
  client, ``c`` connections, closed loop, the same 32x32 JPEGs (the CIFAR-10 test split's own
  files, as stored) for both; a warm-up, then ``--requests`` measured; it reads the CPU time of
  the server's whole process tree from /proc around the measured part.
* **ORT alone** (``--ceiling``, default on): bench/load.py's ceiling process with atop's session
  settings at the batch atop forms, ``min(c, 32)``: the CPU per image ORT itself needs.

Both servers stay up and take turns at every level (the order alternates between rounds);
``--rounds N`` reports medians. Before measuring, the two must agree on the answers for the same
images (label; and probability when the model has no randomness). Goals: atop/BentoML throughput
>= 1.5x at C=64 and >= 1.2x at C=1, atop p99 <= 2x p50 at C=16, atop server CPU per image <=
ORT's own + 0.5 ms. Output: a table, ratios, bench/results/peer-bentoml-<time>.json.

    nice -n 19 python bench/peer.py --rounds 3          # the measurement (docs/benchmarks.md)
    python bench/peer.py --quick                        # a smoke run; JSON under bench/results/work/
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/peer.py` from anywhere
from bench import load  # noqa: E402 (needs the path above)
from bench.serve_process import ServeProcess, child_env, free_port  # noqa: E402

BENCH = REPO / "bench"
RESULTS = BENCH / "results"
REQUIREMENTS = BENCH / "requirements-bentoml.txt"
SERVICE_DIR = BENCH / "bentoml_service"
BOUNDARY = "atop-peer-bench-7f3a9c1e5b"  # never occurs in the test JPEGs' bytes
GOALS = {"throughput_c64": 1.5, "throughput_c1": 1.2, "p99_over_p50_c16": 2.0, "cpu_over_ort_ms": 0.5}


@dataclass(frozen=True)
class PeerConfig:
    store: str | None = None  # None: the embedded store
    model: str = "cifar10-atop"
    version: int | None = None  # None: the newest valid one (what `atop serve` serves)
    concurrency: tuple[int, ...] = (1, 16, 64)
    requests: int = 2000  # measured requests per cell
    warmup: int = 200  # per cell, at least 2 per connection (BentoML's batcher learns from it)
    rounds: int = 1
    images: int = 256
    data: str = str(load.DEFAULT_DATA)
    atop_body: str = "raw"  # raw image/jpeg, or multipart like BentoML's
    atop_flags: tuple[str, ...] = ()  # extra `atop serve` flags; () = its defaults
    bento_workers: int = len(os.sched_getaffinity(0))
    bento_max_batch: int = 64
    bento_max_latency_ms: int = 10000  # atop's default deadline
    venv: str = str(BENCH / ".venv-bentoml")
    ceiling: bool = True


# --- the BentoML environment ---------------------------------------------------------------------
VERSIONS = (
    "import importlib.metadata as m, importlib.util as u, json, platform; print(json.dumps({p: m.version(p) "
    "for p in ('bentoml', 'onnxruntime', 'numpy', 'pillow')} | {'python': platform.python_version(), "
    "'torch': u.find_spec('torch') is not None}))"
)


def ensure_venv(venv: Path, log: Path) -> tuple[Path, dict]:
    """The venv's python and package versions; (re)installs when the requirements file changed.
    Any failure is one line naming the log."""
    py, stamp = venv / "bin" / "python", venv / ".requirements.sha256"
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not (py.exists() and stamp.exists() and stamp.read_text() == want):
        print(f"installing {REQUIREMENTS.name} into {venv} (log {log})")
        with open(log, "wb") as f:
            for cmd in (
                [sys.executable, "-m", "venv", str(venv)],
                [str(py), "-m", "pip", "install", "-r", str(REQUIREMENTS)],
            ):
                if (rc := subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode) != 0:
                    what = "creating the venv" if "venv" in cmd else f"pip install -r {REQUIREMENTS.name}"
                    raise SystemExit(
                        f"peer.py: the BentoML environment failed: {what} exited {rc}; see {log}"
                    )
        stamp.write_text(want)
    done = subprocess.run([str(py), "-c", VERSIONS], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"peer.py: {venv} is broken (delete it to reinstall): {done.stderr.strip()[-300:]}")
    versions = json.loads(done.stdout)
    if versions.pop("torch"):
        raise SystemExit(f"peer.py: torch is in {venv}; it must not be (delete the folder to reinstall)")
    return py, versions


# --- servers ---------------------------------------------------------------------------------------
def atop_defaults() -> dict:
    from service.settings import Settings

    f = Settings.model_fields
    return {k: f[k].default for k in ("max_batch_size", "intra_op_threads", "inter_op_threads", "spinning")}


class BentoServer(ServeProcess):
    """``bentoml serve`` from the venv; ServeProcess's wait_ready (BentoML has /readyz), stop
    (SIGTERM: BentoML drains and stops its workers) and log apply unchanged."""

    def __init__(self, cfg: PeerConfig, py: Path, version_dir: Path, work: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "server-bentoml.log"
        self.flags = ["--host", "127.0.0.1", "--port", str(self.port), "--working-dir", str(SERVICE_DIR)]
        for k, v in (
            ("version_dir", version_dir),
            ("workers", cfg.bento_workers),
            ("max_batch_size", cfg.bento_max_batch),
            ("max_latency_ms", cfg.bento_max_latency_ms),
        ):
            self.flags += ["--arg", f"{k}={v}"]
        env = child_env() | {"BENTOML_HOME": str(work / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "true"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        cmd = [str(py), "-m", "bentoml", "serve", "service:AtopPeer", *self.flags]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=SERVICE_DIR
        )


class AtopServer(ServeProcess):
    def __init__(self, cfg: PeerConfig, store: str, version: int, work: Path):
        self.flags = ["--store", store, "--model-name", cfg.model, "--pin-version", str(version)]
        self.flags += cfg.atop_flags
        super().__init__(work / "server-atop.log", *self.flags, cwd=REPO)


# --- inputs and the client process ------------------------------------------------------------------
def jpeg_bodies(cfg: PeerConfig) -> tuple[list[bytes], str]:
    """cfg.images 32x32 JPEG files: the CIFAR-10 test split's own bytes, else synthetic ones."""
    from PIL import Image

    tar = Path(cfg.data) / "cifar10-test.tar.gz" if Path(cfg.data).is_dir() else Path(cfg.data)
    out = []
    if tar.is_file():
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg")):
                    out.append(tf.extractfile(m).read())
                    if len(out) == cfg.images:
                        break
    if out and Image.open(io.BytesIO(out[0])).size == (32, 32):
        return out, f"CIFAR-10 test split ({tar}), the stored JPEG files"
    bodies = []
    for a in load.synthetic_images(cfg.images):
        buf = io.BytesIO()
        Image.fromarray(a, "RGB").save(buf, "JPEG", quality=90)
        bodies.append(buf.getvalue())
    return bodies, "synthetic smooth 32x32 images, JPEG quality 90 (no CIFAR-10 at --data)"


def body(form: str, jpeg: bytes) -> tuple[bytes, str]:
    """(body, Content-Type): the JPEG as the raw body, or as the one file part "images" of a form."""
    if form == "raw":
        return jpeg, "image/jpeg"
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="image.jpg"\r\n'
    part = (head + "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()
    return part, f"multipart/form-data; boundary={BOUNDARY}"


def http_request(host: str, form: str, jpeg: bytes, query: str = "") -> bytes:
    """The exact bytes of one POST /classify."""
    data, ctype = body(form, jpeg)
    head = f"POST /classify{query} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


def tree_cpu_s(root: int) -> float:
    """CPU seconds of a process and its live descendants (BentoML's workers are its children)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += load._cpu_s(pid)
        except OSError:  # exited meanwhile
            continue
        todo += kids.get(pid, [])
    return total


def batch_sizes(url: str, server: str) -> dict[str, list[float]]:
    """{worker: [sum, count]} of the server's batch-size histogram in /metrics ("-": no worker label)."""
    metric = {"atop": "atop_batch_size", "bentoml": "bentoml_service_adaptive_batch_size"}[server]
    out: dict[str, list[float]] = {}
    for line in urllib.request.urlopen(url + "/metrics", timeout=10).read().decode().splitlines():
        name, _, value = line.rpartition(" ")
        for i, suffix in enumerate(("_sum", "_count")):
            if name.split("{")[0] == metric + suffix:
                worker = name.partition('worker_index="')[2].partition('"')[0] or "-"
                out.setdefault(worker, [0.0, 0.0])[i] += float(value)
    return out


def client_main(args: argparse.Namespace) -> None:
    host, port = args.url.removeprefix("http://").split(":")
    query = "?samples=1" if args.server == "atop" else ""  # one draw per image, always explicit
    blobs = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))]
    requests = [http_request(f"{host}:{port}", args.form, b, query) for b in blobs]
    c = args.concurrency
    warm = asyncio.run(load._drive(host, int(port), requests, max(args.warmup, 2 * c), c))
    if set(warm["statuses"]) != {200}:
        raise SystemExit(f"warm-up got statuses {warm['statuses']}: {json.dumps(warm['first'])[:500]}")
    before = batch_sizes(args.url, args.server)
    cpu0, busy0, own0 = tree_cpu_s(args.server_pid), load._machine_busy_s(), time.process_time()
    res = asyncio.run(load._drive(host, int(port), requests, args.requests, c))
    own = time.process_time() - own0
    server_cpu, busy = tree_cpu_s(args.server_pid) - cpu0, load._machine_busy_s() - busy0
    after = batch_sizes(args.url, args.server)
    per_worker = {w: [v - before.get(w, [0.0, 0.0])[i] for i, v in enumerate(sc)] for w, sc in after.items()}
    rows, batches = (sum(sc[i] for sc in per_worker.values()) for i in (0, 1))
    lat_ms, ok, wall = np.asarray(res["latencies"]) * 1000, res["statuses"].get(200, 0), res["wall_s"]
    print(
        json.dumps(
            {
                "concurrency": c,
                "requests": args.requests,
                "ok": ok,
                "statuses": {str(k): v for k, v in sorted(res["statuses"].items())},
                "wall_s": round(wall, 3),
                "images_per_s": ok / wall,
                "p50_ms": float(np.percentile(lat_ms, 50)),
                "p99_ms": float(np.percentile(lat_ms, 99)),
                "mean_ms": float(lat_ms.mean()),
                "rows_per_batch": rows / batches if batches else float("nan"),
                "images_per_worker": {w: sc[0] for w, sc in sorted(per_worker.items())},
                "server_cpu_ms_per_image": 1000 * server_cpu / max(ok, 1),
                "server_cores": server_cpu / wall,
                "client_cores": own / wall,
                "other_cores": max(0.0, busy - server_cpu - own) / wall,
            }
        )
    )


def _self(args: list[str]) -> dict:
    """Run ``peer.py <args>`` in a fresh process; its last stdout line is its JSON result."""
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=child_env(), cwd=REPO
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the orchestrator -------------------------------------------------------------------------------
def _post(url: str, form: str, jpeg: bytes, query: str = "") -> dict:
    data, ctype = body(form, jpeg)
    req = urllib.request.Request(url + "/classify" + query, data=data, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def parity(atop: ServeProcess, bento: ServeProcess, bodies: list[bytes], form: str, random: bool) -> dict:
    """Both servers on the same images: labels must agree (and probabilities, without randomness)."""
    same, dp = 0, 0.0
    for b in bodies:
        a, p = _post(atop.url, form, b, "?samples=1")["results"][0], _post(bento.url, "multipart", b)[0]
        same += a["label"] == p["label"]
        dp = max(dp, abs(a["probability"] - p["probability"]))
    out = {"images": len(bodies), "same_label": same, "max_abs_probability_diff": dp}
    if not random and (same < len(bodies) or dp > 1e-4):
        raise SystemExit(f"peer.py: the servers disagree on a deterministic model: {out}")
    return out


def cell_ratios(a: dict, b: dict, ort: dict | None) -> dict:
    out = {
        "throughput_atop_over_bentoml": a["images_per_s"] / b["images_per_s"],
        "p50_bentoml_over_atop": b["p50_ms"] / a["p50_ms"],
        "p99_bentoml_over_atop": b["p99_ms"] / a["p99_ms"],
        "cpu_bentoml_over_atop": b["server_cpu_ms_per_image"] / a["server_cpu_ms_per_image"],
        "atop_p99_over_p50": a["p99_ms"] / a["p50_ms"],
    }
    if ort:
        out["atop_cpu_over_ort_ms"] = a["server_cpu_ms_per_image"] - ort["cpu_ms_per_image"]
    return out


def verdict(rat: dict) -> dict:
    cpu = [r["atop_cpu_over_ort_ms"] for r in rat.values() if "atop_cpu_over_ort_ms" in r]
    values = {
        "throughput_c64": rat.get(64, {}).get("throughput_atop_over_bentoml"),
        "throughput_c1": rat.get(1, {}).get("throughput_atop_over_bentoml"),
        "p99_over_p50_c16": rat.get(16, {}).get("atop_p99_over_p50"),
        "cpu_over_ort_ms": max(cpu, default=None),  # the worst level
    }
    out = {}
    for k, v in values.items():
        met = None if v is None else (v >= GOALS[k] if k.startswith("throughput") else v <= GOALS[k])
        out[k] = {"value": v, "goal": GOALS[k], "met": met}
    return out


def _split(per_worker: dict) -> str:
    """Each worker's share of the images, "100%" for a single one."""
    total = sum(per_worker.values()) or 1.0
    return " / ".join(f"{v / total:.0%}" for v in per_worker.values())


def table(cells: dict, ort: dict, rat: dict, v: dict) -> str:
    lines = [
        "| server | conc. | img/s | p50 ms | p99 ms | images/batch | images per worker | server CPU ms/img | "
        "cores: server / client / other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("atop", "bentoml"):
        for r in cells[name].values():
            lines.append(
                f"| {name} | {r['concurrency']:.0f} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['rows_per_batch']:.1f} | {_split(r['images_per_worker'])} | "
                f"{r['server_cpu_ms_per_image']:.2f} | {r['server_cores']:.2f} / "
                f"{r['client_cores']:.2f} / {r['other_cores']:.2f} |"
            )
    for c, r in ort.items():
        lines.append(
            f"| ORT alone | {c} | {r['images_per_s']:.1f} | | | {r['batch']:.0f} | | {r['cpu_ms_per_image']:.2f} | |"
        )
    lines += [
        "",
        "| conc. | throughput atop/BentoML | p50 BentoML/atop | p99 BentoML/atop | CPU/img BentoML/atop | "
        "atop p99/p50 | atop CPU − ORT's (ms/img) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, r in rat.items():
        over = r.get("atop_cpu_over_ort_ms")
        lines.append(
            f"| {c} | {load._x(r['throughput_atop_over_bentoml'])} | {load._x(r['p50_bentoml_over_atop'])} | "
            f"{load._x(r['p99_bentoml_over_atop'])} | {load._x(r['cpu_bentoml_over_atop'])} | "
            f"{r['atop_p99_over_p50']:.2f} | {'-' if over is None else f'{over:+.2f}'} |"
        )
    lines.append("")
    for k, g in v.items():
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"goal {k}: {value} (goal {g['goal']:g}): {g['met']}")
    return "\n".join(lines)


def measure_round(cfg: PeerConfig, i: int, servers: dict, images: Path) -> dict:
    """{server: {c: cell}}; the servers take turns at each level, the first one alternating."""
    print(f"round {i + 1}/{cfg.rounds}")
    cells: dict = {"atop": {}, "bentoml": {}}
    for c in cfg.concurrency:
        for name in ("atop", "bentoml") if i % 2 == 0 else ("bentoml", "atop"):
            s, form = servers[name], cfg.atop_body if name == "atop" else "multipart"
            args = [
                "client",
                "--server",
                name,
                "--url",
                s.url,
                "--server-pid",
                str(s.proc.pid),
                "--form",
                form,
            ]
            args += ["--images", str(images), "--concurrency", str(c)]
            args += ["--requests", str(cfg.requests), "--warmup", str(cfg.warmup)]
            r = cells[name][c] = _self(args)
            print(
                f"  {name:<8s} c={c:<3d} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:7.1f} ms  "
                f"p99 {r['p99_ms']:7.1f} ms  {r['rows_per_batch']:5.1f} img/batch ({_split(r['images_per_worker'])})  "
                f"CPU {r['server_cpu_ms_per_image']:.2f} ms/img  errors {r['requests'] - r['ok']}"
            )
    return cells


def ort_alone(cfg: PeerConfig, store: str, defaults: dict, folder: Path, n: int) -> dict:
    """{c: load.py ceiling at atop's batch min(c, max batch), atop's default session settings}."""
    folder.mkdir()
    for i, a in enumerate(load.synthetic_images(n)):  # the pixels do not change the time
        (folder / f"{i:04d}.png").write_bytes(load._png(a))
    out = {}
    for c in cfg.concurrency:
        args = ["ceiling", "--store", store, "--model", cfg.model, "--images", str(folder)]
        args += ["--batches", str(min(c, int(defaults["max_batch_size"]))), "--rows", str(cfg.requests)]
        args += ["--intra-op-threads", str(defaults["intra_op_threads"])]
        args += ["--inter-op-threads", str(defaults["inter_op_threads"])]
        args += ["--spinning"] if defaults["spinning"] else []
        r = load._child(args)["results"][0]
        out[c] = r | {"images_per_s": r["rows_per_s"], "cpu_ms_per_image": r["cpu_ms_per_row"]}
    return out


def bench_main(cfg: PeerConfig, out: Path | None, quick: bool) -> dict:
    from atop import contract
    from model_store import default_store, get_version

    store = str(Path(cfg.store).resolve()) if cfg.store else str(default_store())
    mv = get_version(Path(store), cfg.model, cfg.version)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RESULTS / "work" / f"peer-{stamp}"
    (work / "images").mkdir(parents=True)
    bodies, source = jpeg_bodies(cfg)
    for i, b in enumerate(bodies):
        (work / "images" / f"{i:04d}.jpg").write_bytes(b)
    py, versions = ensure_venv(Path(cfg.venv), work / "pip.log")
    defaults = atop_defaults() | {"flags": list(cfg.atop_flags)}
    res = {
        "config": asdict(cfg),
        "store": store,
        "model": {"name": mv.name, "version": mv.version, "rt": mv.manifest["rt"]},
        "images": source,
        "machine": load.machine() | {"bentoml_venv": versions},
        "started": stamp,
        "atop_defaults": defaults,
    }
    print(f"model {mv.name} v{mv.version} from {store}; images: {source}; work folder {work}")
    servers: dict[str, ServeProcess] = {}
    try:
        servers["atop"] = AtopServer(cfg, store, mv.version, work)
        servers["bentoml"] = BentoServer(cfg, py, mv.path, work)
        for name, s in servers.items():
            s.wait_ready(timeout=300)
            print(f"[{name}] {' '.join(s.flags)}")
            res.setdefault("flags", {})[name] = s.flags
        random = contract.rt_is_random(mv.manifest["rt"])
        res["parity"] = parity(servers["atop"], servers["bentoml"], bodies[:32], cfg.atop_body, random)
        print(f"parity: {res['parity']}")
        rounds = [measure_round(cfg, i, servers, work / "images") for i in range(cfg.rounds)]
        ort = ort_alone(cfg, store, defaults, work / "png", len(bodies)) if cfg.ceiling else {}
    finally:
        for s in servers.values():
            s.stop()
    res["rounds"] = rounds
    per_round = [
        {c: cell_ratios(r["atop"][c], r["bentoml"][c], ort.get(c)) for c in cfg.concurrency} for r in rounds
    ]
    rat = {
        c: {k: float(np.median([pr[c][k] for pr in per_round])) for k in per_round[0][c]}
        for c in cfg.concurrency
    }
    cells = load.median_cells(rounds)
    res |= {"median": cells, "ort_alone": ort, "ratios_per_round": per_round, "ratios": rat}
    res["verdict"] = verdict(rat)
    res["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    note = " (--quick: a smoke run, not a measurement)" if quick else ""
    print(f"\nmedian of {cfg.rounds} round(s){note}:\n")
    print(table(cells, ort, rat, res["verdict"]))
    out = out or (work / "peer-bentoml-quick.json" if quick else RESULTS / f"peer-bentoml-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return res


# --- command line ------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = PeerConfig()
    p.add_argument("--store", default=None, help="model store root (default: the embedded store)")
    p.add_argument("--model", default=d.model, help=f"model name in the store (default {d.model})")
    p.add_argument("--version", type=int, default=None, help="store version (default: the newest valid one)")
    p.add_argument("--concurrency", type=load._ints, default=d.concurrency, help="levels (default 1,16,64)")
    p.add_argument("--requests", type=int, default=None, help=f"measured requests per cell ({d.requests})")
    p.add_argument("--warmup", type=int, default=None, help=f"warm-up requests per cell ({d.warmup})")
    p.add_argument(
        "--rounds", type=int, default=d.rounds, help="repeat every cell; report medians (3 for a record)"
    )
    p.add_argument(
        "--quick", action="store_true", help="160 requests, 64 images: a smoke run, JSON in the work folder"
    )
    p.add_argument(
        "--data", default=d.data, help="CIFAR-10 folder with cifar10-test.tar.gz (synthetic if absent)"
    )
    p.add_argument(
        "--atop-body",
        choices=["raw", "multipart"],
        default=d.atop_body,
        help="how atop gets the JPEG: raw image/jpeg body (default) or multipart, BentoML's form",
    )
    p.add_argument(
        "--atop-flags",
        default="",
        help="extra `atop serve` flags, e.g. --atop-flags='--spinning' (default: none; "
        "the ORT-alone reference keeps atop's default session settings)",
    )
    p.add_argument(
        "--bento-workers",
        type=int,
        default=d.bento_workers,
        help=f"BentoML worker processes, 1 ORT thread each (default: the CPUs, {d.bento_workers})",
    )
    p.add_argument(
        "--bento-max-batch", type=int, default=d.bento_max_batch, help="BentoML max_batch_size (64)"
    )
    p.add_argument(
        "--bento-max-latency-ms",
        type=int,
        default=d.bento_max_latency_ms,
        help="BentoML max_latency_ms (10000, atop's default deadline)",
    )
    p.add_argument("--venv", default=d.venv, help="the BentoML virtual environment (created if missing)")
    p.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=d.ceiling,
        help="also time ORT alone with atop's session settings (CPU per image reference)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default bench/results/peer-bentoml-<time>.json)"
    )
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("client", help="(internal) the load generator process")
    c.add_argument("--server", choices=["atop", "bentoml"], required=True)
    c.add_argument("--url", required=True)
    c.add_argument("--server-pid", type=int, required=True)
    c.add_argument("--form", choices=["raw", "multipart"], required=True)
    c.add_argument("--images", required=True)
    c.add_argument("--concurrency", type=int, required=True)
    c.add_argument("--requests", type=int, required=True)
    c.add_argument("--warmup", type=int, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.cmd == "client":
        return client_main(args)
    d = PeerConfig()
    cfg = PeerConfig(
        store=args.store,
        model=args.model,
        version=args.version,
        concurrency=args.concurrency,
        requests=args.requests or (160 if args.quick else d.requests),
        warmup=args.warmup or (32 if args.quick else d.warmup),
        rounds=args.rounds,
        images=64 if args.quick else d.images,
        data=args.data,
        atop_body=args.atop_body,
        atop_flags=tuple(shlex.split(args.atop_flags)),
        bento_workers=args.bento_workers,
        bento_max_batch=args.bento_max_batch,
        bento_max_latency_ms=args.bento_max_latency_ms,
        venv=args.venv,
        ceiling=args.ceiling,
    )
    bench_main(cfg, args.out, args.quick)


if __name__ == "__main__":
    main()
