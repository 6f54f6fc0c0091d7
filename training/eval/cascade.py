"""Running attacks for ``atop eval``: scoring by the service's rule, the cascade, resumable state.

Scoring (``Scorer``): each final adversarial example is judged three ways, per image:

* ``vote`` — the service's answer with ``samples=k``: argmax of the softmax averaged over k
  fresh draws. This is the headline figure and the rule the cascade uses.
* ``single`` — the fraction of those k draws whose own argmax is right: the expected accuracy
  of a client asking with ``samples=1``.
* ``fixed`` — one fixed draw per image (the same for every attack).

An attack may return several candidates per image (APGD's best-loss and last-misclassified
points); per image the one with the smallest vote margin is kept, as an attacker able to query
the service would do, but that margin is measured on a *selection* set of k draws (its own seed)
and the chosen candidate is then scored on the scoring draws. Choosing with the scoring draws
would pick, per image, whichever candidate those particular draws happened to misjudge: a
figure biased low, and a robustness claim that selected on its own random numbers. PGD, CW and
flow return one candidate (their best iterate, picked on the attack's own EOT logits) and their
final iterate, scored with the same scoring draws and reported beside (``final``).

State: after every batch the per-image results go to a JSON state file (atomic replace). A run
that stops, for any reason, continues from the last finished batch; every random number of a
batch derives from (seed, attack, batch index), so a resumed run gives exactly the numbers an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.attacks import margin_loss
from training.checkpoint import atomic_path
from training.eval.attacks import AttackSpec, check_threat_model, run_attack
from training.eval.targets import Target
from training.transforms import RTSample, sample_rt

log = logging.getLogger("atop.eval")
RULES = ("vote", "single", "fixed")


@dataclass
class Scores:
    """Per-image correctness under the three rules (1.0 = right)."""

    vote: torch.Tensor
    single: torch.Tensor
    fixed: torch.Tensor

    def take(self, idx: torch.Tensor) -> Scores:
        return Scores(self.vote[idx], self.single[idx], self.fixed[idx])

    def worst(self, other: Scores) -> Scores:
        return Scores(*(torch.minimum(a, b) for a, b in zip(self.rows(), other.rows(), strict=True)))

    def put(self, idx: torch.Tensor, other: Scores) -> Scores:
        rows = [a.clone() for a in self.rows()]
        for a, b in zip(rows, other.rows(), strict=True):
            a[idx] = b
        return Scores(*rows)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.vote, self.single, self.fixed

    def means(self) -> dict[str, float]:
        return {k: float(v.mean()) if len(v) else 0.0 for k, v in zip(RULES, self.rows(), strict=True)}

    def to_json(self) -> dict:
        return {k: [round(t, 6) for t in v.cpu().tolist()] for k, v in zip(RULES, self.rows(), strict=True)}

    @classmethod
    def from_json(cls, d: dict) -> Scores:
        return cls(*(torch.tensor(d[k], dtype=torch.float32) for k in RULES))

    @classmethod
    def cat(cls, parts: list[Scores]) -> Scores:
        if not parts:
            return cls(*(torch.zeros(0) for _ in range(3)))
        return cls(*(torch.cat([getattr(p, k) for p in parts]) for k in RULES))


class Scorer:
    """Scores inputs of the images ``idx`` of the subset by the vote, single and fixed rules."""

    def __init__(self, target: Target, samples: int, n: int, fixed_seed: int, device: str = "cpu"):
        self.target, self.samples = target, samples if target.randomized else 1
        gen = torch.Generator().manual_seed(fixed_seed)
        self.fixed = sample_rt(target.spec, n, gen, device) if target.randomized else None

    def subset(self, idx: torch.Tensor) -> Scorer:
        """The same scorer for the images ``idx`` of its subset (their fixed draws follow)."""
        sub = copy.copy(self)
        sub.fixed = None if self.fixed is None else RTSample(self.fixed.noise[idx], self.fixed.masks[idx])
        return sub

    @torch.no_grad()
    def choose(self, cands: list[torch.Tensor], y: torch.Tensor, seed: int) -> torch.Tensor:
        """Per image the candidate with the smallest vote margin under k draws from ``seed``:
        the selection draws, which must not be the draws that score the result."""
        if len(cands) == 1:
            return cands[0]
        best, best_margin = None, None
        for c in cands:
            margin = self._margin(c, y, seed)
            if best is None:
                best, best_margin = c, margin
                continue
            pick = margin < best_margin
            best = torch.where(pick.view(-1, *([1] * (c.dim() - 1))), c, best)
            best_margin = torch.minimum(margin, best_margin)
        return best

    def _margin(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        t = self.target
        if not t.randomized:
            return -margin_loss(t.classifier(x).softmax(1), y)
        gen = torch.Generator().manual_seed(seed)
        probs = 0.0
        for _ in range(self.samples):
            d = sample_rt(t.spec, x.shape[0], gen, x.device)
            probs = probs + t.pipeline(x, d.noise, d.masks).softmax(1)
        return -margin_loss(probs / self.samples, y)

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, seed: int) -> Scores:
        """Scores of the inputs ``x`` of images ``idx`` under k scoring draws from ``seed``."""
        t = self.target
        if not t.randomized:
            ok = (t.classifier(x).argmax(1) == y).float()
            return Scores(ok, ok, ok)
        gen = torch.Generator().manual_seed(seed)
        probs, single = 0.0, torch.zeros(x.shape[0], device=x.device)
        for _ in range(self.samples):
            d = sample_rt(t.spec, x.shape[0], gen, x.device)
            p = t.pipeline(x, d.noise, d.masks).softmax(1)
            probs, single = probs + p, single + (p.argmax(1) == y).float()
        fixed = t.pipeline(x, self.fixed.noise[idx], self.fixed.masks[idx]).argmax(1) == y
        vote = (probs.argmax(1) == y).float()
        return Scores(vote, single / self.samples, fixed.float())


def derive_seed(*parts) -> int:
    """A stable 62-bit seed from any printable parts (never Python's salted hash)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 2


# Where the attacked files lie (and which store folder carried a checkpoint's weights): recorded
# in the identity but not compared on resume, so a run continues from a fresh clone elsewhere, or
# with a classifier restored as a store version; the sha256 of what is attacked must still match.
LOCATION_KEYS = frozenset({"classifier", "purifier", "store", "classifier_store_manifest_sha256"})


def resume_key(identity: dict) -> dict:
    """The part of an evaluation's identity that must match for a state file to be resumed."""
    source = {k: v for k, v in (identity.get("source") or {}).items() if k not in LOCATION_KEYS}
    return identity | {"source": source}


class EvalState:
    """The JSON state file: {"identity": ..., "sections": {name: {...}}}, rewritten atomically.

    ``reuse``: other state files of the same evaluation (same model, images, seed, draws and
    batch; another protocol). A section's name fixes its attack, its cascade and every seed, so a
    section this run needs that one of them holds is the same computation: its finished batches
    are copied in (when first asked for) instead of recomputed."""

    def __init__(self, path: Path | None, identity: dict, reuse: tuple[Path, ...] = ()):
        self.path = path
        self.data = {"identity": identity, "sections": {}}
        self.donors = [(Path(d), _donor_sections(Path(d), identity)) for d in reuse]
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            if resume_key(saved.get("identity") or {}) != resume_key(identity):
                raise ValueError(
                    f"{path}: the state file belongs to a different evaluation (other model, subset, "
                    "seed, samples, batch size or evaluator version); delete it or choose another --out"
                )
            if saved["identity"] != identity:
                log.info(
                    "the attacked files moved since the state was written (same sha256): %s",
                    identity["source"],
                )
                saved["identity"] = identity
            self.data = saved
            log.info("resuming from %s (%d sections)", path, len(saved["sections"]))

    @contextlib.contextmanager
    def claimed(self):
        """Hold this state file while the block runs: a second ``atop eval`` writing the same
        file would rewrite it from its own copy and drop the other's batches, so it is refused.
        The lock is an flock on a file under the temp directory named after the state's path; it
        is released at the end of the block, and by the kernel if the process dies."""
        if self.path is None:
            yield self
            return
        key = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        lock = Path(tempfile.gettempdir()) / "atop-eval-locks" / f"{key}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                raise ValueError(
                    f"{self.path}: another atop eval (pid {holder}) is writing this state file; wait "
                    "for it to end (or stop it) before resuming, or choose another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield self
        finally:
            os.close(fd)  # releases the lock

    def section(self, name: str) -> dict:
        sec = self.data["sections"].setdefault(name, {})
        for path, sections in self.donors:
            _merge(sec, sections.get(name), name, path)
        return sec

    def peek(self, name: str) -> dict:
        """The section as ``section`` would give it, leaving the state unchanged."""
        sec = copy.deepcopy(self.data["sections"].get(name, {}))
        for path, sections in self.donors:
            _merge(sec, sections.get(name), name, path, quiet=True)
        return sec

    def attack_wall_s(self) -> float:
        """Seconds the finished attack batches of this state took, over every run that wrote it
        (a resumed run's own wall time counts only its last stretch)."""
        return round(
            sum(
                float(b.get("wall_s", 0.0))
                for sec in self.data["sections"].values()
                for b in (sec.get("done") or {}).values()
            ),
            1,
        )

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.data) + "\n")


def _donor_sections(path: Path, identity: dict) -> dict:
    """The sections of the state file ``path``, which must belong to the same evaluation."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--reuse {path}: not a readable eval state file ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("sections"), dict):
        raise ValueError(f"--reuse {path}: not an eval state file (no sections)")
    if resume_key(saved.get("identity") or {}) != resume_key(identity):
        raise ValueError(
            f"--reuse {path}: that state belongs to a different evaluation (other model, subset, seed, "
            "samples, batch size or evaluator version), so its results cannot stand for this one's"
        )
    return saved["sections"]


def _merge(sec: dict, donor: dict | None, name: str, path: Path, quiet: bool = False) -> None:
    """Copy into ``sec`` what ``donor`` (the same section of another state) has finished and
    ``sec`` has not: clean scores, or attack batches over the same targets."""
    if not donor:
        return
    if "scores" in donor and "scores" not in sec:
        sec["scores"] = copy.deepcopy(donor["scores"])
        if not quiet:
            log.info("%s: taken from %s", name, path)
    if "targets" not in donor:
        return
    if "targets" not in sec:
        sec.update(targets=list(donor["targets"]), done={})
    if sec["targets"] != donor["targets"]:  # cannot happen for one evaluation; never mix
        raise ValueError(f"--reuse {path}: section {name} attacks other images than this run's")
    new = {b: copy.deepcopy(r) for b, r in donor.get("done", {}).items() if b not in sec["done"]}
    sec["done"].update(new)
    if new and not quiet:
        log.info("%s: %d finished batches taken from %s", name, len(new), path)


@dataclass
class Outcome:
    """One attack's results: ``alone`` on its targets, ``after`` on all n (cascade-cumulative)."""

    spec: AttackSpec
    label: str
    targets: torch.Tensor
    alone: Scores
    after: Scores
    cascade_after: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    final: Scores | None = None  # stepped attacks: the final iterate alone, on ``targets``
    after_final: Scores | None = None  # ... and on all n, over the same cascade base


def _bar(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, mininterval=1.0 if sys.stderr.isatty() else 60.0)


def clean_scores(scorer: Scorer, x, y, state: EvalState, name: str, seed: int, bs: int) -> Scores:
    sec = state.section(f"{name}/clean")
    if "scores" not in sec:
        parts = []
        for b in range(0, len(y), bs):
            idx = torch.arange(b, min(b + bs, len(y)))
            parts.append(scorer.score(x[idx], y[idx], idx, derive_seed(seed, name, "clean", b)))
        sec["scores"] = Scores.cat(parts).to_json()
        state.save()
    return Scores.from_json(sec["scores"])


def _attack_batch(
    spec: AttackSpec,
    target: Target,
    scorer: Scorer,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    s: int,
) -> dict:
    """One batch of one attack: candidates (checked against the threat model), the one chosen on
    selection draws, its scores on the scoring draws (and the final iterate's, where there is one)."""
    model = target.stochastic(torch.Generator().manual_seed(s))
    xb, yb = x[idx], y[idx]

    def still_robust(cands):
        # The attack's own query (AutoAttack's cascade), on draws of its own.
        return scorer.score(scorer.choose(cands, yb, s + 1), yb, idx, s + 1).vote > 0.5

    found = run_attack(spec, model, xb, yb, seed=s, still_robust=still_robust)
    for c in found.all():
        check_threat_model(spec, xb, c)
    chosen = scorer.choose(found.cands, yb, derive_seed(s, "select"))
    rec = scorer.score(chosen, yb, idx, s + 2).to_json()
    if found.final is not None:
        rec["final"] = scorer.score(found.final, yb, idx, s + 2).to_json()
    return rec


def run_attacks(
    specs: tuple[AttackSpec, ...],
    target: Target,
    x: torch.Tensor,
    y: torch.Tensor,
    clean: Scores,
    scorer: Scorer,
    state: EvalState,
    *,
    name: str,
    seed: int,
    batch_size: int,
    finished_only: bool = False,
    max_cost: int | None = None,
) -> list[Outcome]:
    """Run ``specs`` in order (cascading within a threat model), resuming from ``state``.
    ``finished_only``: attack nothing; the outcomes of the attacks ``state`` has finished (an
    attack of a cascade after an unfinished one is left out too: its images are not known).
    ``max_cost``: run only the attacks of at most that many gradient passes per image (steps x
    EOT); one above it is left for a later run, and so is the rest of its cascade."""
    worst: dict[tuple, Scores] = {}
    history: dict[tuple, list[AttackSpec]] = {}
    blocked: set[tuple] = set()
    outcomes = []
    for spec in specs:
        label = spec.label(target.randomized)
        earlier = history.get(spec.threat, []) if spec.cascade else []
        before = ",".join(e.key for e in earlier)
        base = worst.get(spec.threat, clean) if spec.cascade else clean
        key = f"{name}/{spec.key}/after:{before}"
        if spec.cascade and spec.threat in blocked:
            continue
        if max_cost is not None and spec.steps * spec.eot > max_cost:
            blocked |= {spec.threat} if spec.cascade else set()
            continue
        if finished_only:
            sec = state.peek(key)
            n_chunks = -(-len(sec.get("targets", [])) // batch_size)
            if "targets" not in sec or len(sec["done"]) < n_chunks:
                blocked |= {spec.threat} if spec.cascade else set()
                continue
        sec = state.section(key)
        if "targets" not in sec:
            sec.update(targets=(base.vote > 0.5).nonzero().flatten().tolist(), done={})
        targets = torch.tensor(sec["targets"], dtype=torch.long)
        chunks = [targets[i : i + batch_size] for i in range(0, len(targets), batch_size)]
        bar = _bar(len(targets), sum(len(chunks[int(b)]) for b in sec["done"]), f"{name} {label} {spec.norm}")
        for b, idx in enumerate(chunks):
            if str(b) in sec["done"]:
                continue
            t0 = time.time()
            rec = _attack_batch(spec, target, scorer, x, y, idx, derive_seed(seed, name, spec.key, before, b))
            sec["done"][str(b)] = rec | {"wall_s": round(time.time() - t0, 2)}
            state.save()
            bar.update(len(idx))
        bar.close()
        done = [sec["done"][str(b)] for b in range(len(chunks))]
        alone = Scores.cat([Scores.from_json(d) for d in done])
        after = base.put(targets, base.take(targets).worst(alone))
        final = after_final = None
        if spec.kind.stepped:
            final = Scores.cat([Scores.from_json(d["final"]) for d in done])
            after_final = base.put(targets, base.take(targets).worst(final))
        wall = sum(d["wall_s"] for d in done)
        labels = [e.label(target.randomized) for e in earlier]
        outcomes.append(
            Outcome(spec, label, targets, alone, after, labels, round(wall, 1), final, after_final)
        )
        if spec.cascade:
            worst[spec.threat] = after
            history.setdefault(spec.threat, []).append(spec)
        m = after.means()
        log.info(
            "%s %s %s eps=%.4g: %.4f vote, %.4f single, %.4f fixed",
            name,
            label,
            spec.norm,
            spec.eps,
            *m.values(),
        )
    return outcomes
