"""The served model version and its hot swap.

A candidate is verified (``model_store.store.verify``: checksums + manifest schema), its facts
checked, its backend loaded and warmed up and self-tested, all in a worker thread **beside** the
active version; only then is the single ``active`` reference swapped, on the event loop, under a
lock that serialises swaps. Requests lease the slot they start on: in-flight requests finish on
their version, and a retired version is closed (batcher drained, backend released) when its last
lease ends. A candidate that would change what answers mean — another class list (names,
order or count) or another input size — is refused by reload and the watcher whatever its
numbers; only an operator's explicit activation with ``accept_contract_change`` serves it.
A refused candidate is remembered with its reason (``/v1/models``, the
``atop_model_reloads{result="refused"}`` counter, a warning in the log) and the old version keeps
serving. The first version to serve (at startup, or found by the watcher after
``wait_for_model``) counts as ``result="loaded"``: it replaces nothing, so it is no swap. The
watcher polls the store and moves to the newest valid version unless one is pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from model_store import store
from service.backends import Backend, BackendError, load_backend
from service.batcher import Batcher
from service.schemas import Outcome
from service.selftest import Facts, Refused, manifest_facts, robustness_regressions, self_test

log = logging.getLogger("atop.service")
SERVED = ("loaded", "swapped")  # outcomes after which the candidate serves: first load, or a swap


class NotReady(Exception):
    """No version is loaded (startup, or every candidate was refused)."""


@dataclass(eq=False)
class Slot:
    name: str
    version: int
    manifest: dict
    facts: Facts
    backend: Backend
    batcher: Batcher
    loaded_at: float = field(default_factory=time.time)
    selftest: dict = field(default_factory=dict)
    leases: int = 0
    retired: bool = False


def contract_changes(candidate: dict, active: dict) -> list[str]:
    """How ``candidate``'s manifest would change what the active version's answers mean: its
    class list (names, order, count) and the input size the service decodes images to."""
    changes = []
    new, old = list(candidate.get("classes") or []), list(active.get("classes") or [])
    if new != old:
        if len(new) != len(old):
            changes.append(f"{len(new)} classes instead of {len(old)}")
        elif sorted(new) == sorted(old):
            changes.append("the same classes in another order (answers would be relabelled)")
        else:
            gone = [c for c in old if c not in new]
            came = [c for c in new if c not in old]
            changes.append(
                f"classes {', '.join(came) or 'renamed'} in place of {', '.join(gone) or 'others'}"
            )
    size_new = (candidate.get("rt") or {}).get("image_size")
    size_old = (active.get("rt") or {}).get("image_size")
    if size_new != size_old:
        changes.append(f"{size_new}-px input instead of {size_old}-px")
    elif candidate.get("input") != active.get("input"):
        changes.append(f"input {candidate.get('input')} instead of {active.get('input')}")
    return changes


class Registry:
    def __init__(self, settings, metrics, *, loader=load_backend):
        self.settings, self.metrics, self.loader = settings, metrics, loader
        self.name = settings.model_name
        self.root = Path(settings.store) if settings.store else store.default_store()
        self.active: Slot | None = None
        self.pinned: int | None = settings.pin_version
        self.refused: dict[int, str] = {}
        self.last: Outcome | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None

    # --- serving -----------------------------------------------------------------------------
    def acquire(self) -> Slot:
        """The active slot, leased: it stays open until ``release``, across any swap."""
        slot = self.active
        if slot is None:
            raise NotReady()
        slot.leases += 1
        return slot

    def release(self, slot: Slot) -> None:
        slot.leases -= 1
        if slot.retired and slot.leases == 0:
            self._spawn(self._close(slot))

    # --- loading -----------------------------------------------------------------------------
    def _prepare_blocking(self, mv: store.ModelVersion) -> tuple[dict, Facts, Backend, dict]:
        try:
            manifest = store.verify(mv.path)
        except store.StoreError as e:
            raise Refused(f"verify failed: {e}") from e
        facts = manifest_facts(manifest)
        if facts.samples > self.settings.max_samples:
            log.warning(
                "%s v%d: serving.samples=%d exceeds this server's max_samples=%d; requests without "
                "`samples` get %d draws, not the %d its evaluation assumed",
                mv.name,
                mv.version,
                facts.samples,
                self.settings.max_samples,
                self.settings.max_samples,
                facts.samples,
            )
            facts = replace(facts, samples=self.settings.max_samples)
        try:
            backend = self.loader(mv.path, manifest, self.settings)
        except BackendError as e:
            raise Refused(str(e)) from e
        try:
            parity = (manifest.get("graph") or {}).get("parity")
            report = self_test(backend, facts, self.settings.max_batch_size, parity)
        except Exception:
            backend.close()
            raise
        return manifest, facts, backend, report

    def _contract_guard(self, manifest: dict) -> None:
        """Refuse a candidate whose answers would mean something else than the active one's."""
        if self.active is None:
            return
        changes = contract_changes(manifest, self.active.manifest)
        if changes:
            raise Refused(
                f"it changes what answers mean vs v{self.active.version}: {'; '.join(changes)};"
                " an operator must activate it with accept_contract_change=true"
            )

    def _gate(self, manifest: dict) -> None:
        """Automatic swaps refuse a candidate whose measured robustness regressed."""
        tol = self.settings.robustness_tolerance
        if self.active is None:
            return
        worse = robustness_regressions(manifest, self.active.manifest, tol)
        if worse:
            raise Refused(
                f"measured robustness regressed by more than {tol} vs v{self.active.version} "
                f"({'; '.join(worse)}); activate it explicitly to override"
            )

    async def _try(self, mv: store.ModelVersion, *, gated: bool, contract_change_ok: bool = False) -> Outcome:
        log.info("loading candidate %s v%d from %s", mv.name, mv.version, mv.path)
        t0 = time.perf_counter()
        try:
            # Both cheap, from the manifest list_versions validated: before any loading.
            if not contract_change_ok:
                self._contract_guard(mv.manifest)
            if gated:
                self._gate(mv.manifest)
            manifest, facts, backend, report = await asyncio.to_thread(self._prepare_blocking, mv)
        except Exception as e:  # Refused, or anything unexpected: the candidate does not serve
            reason = str(e) if isinstance(e, Refused) else f"{type(e).__name__}: {e}"
            self.refused[mv.version] = reason
            self.metrics.reloads.labels("refused").inc()
            serving = f"still serving v{self._active_v()}" if self.active else "nothing is served yet"
            log.warning("refused %s v%d: %s; %s", mv.name, mv.version, reason, serving)
            return Outcome(
                result="refused", active_version=self._active_v(), candidate=mv.version, message=reason
            )
        s = self.settings
        batcher = Batcher(
            backend,
            max_batch_size=s.max_batch_size,
            max_delay_ms=s.max_delay_ms,
            queue_size=s.queue_size,
            metrics=self.metrics,
            name=f"v{mv.version}",
        )
        batcher.start()
        slot = Slot(mv.name, mv.version, manifest, facts, backend, batcher, selftest=report)
        old, self.active = self.active, slot  # the swap: one reference, on the event loop
        result = "swapped" if old is not None else "loaded"  # the first version replaces nothing
        self.refused.pop(mv.version, None)
        self.metrics.set_active(mv.version)
        self.metrics.reloads.labels(result).inc()
        log.info(
            "serving %s v%d (%s on %s, %d draw%s per answer by default, ready in %.2fs)%s",
            mv.name,
            mv.version,
            backend.name,
            backend.device,
            facts.samples,
            "" if facts.samples == 1 else "s",
            time.perf_counter() - t0,
            f"; retiring v{old.version}" if old else "",
        )
        if old is not None:
            self._retire(old)
        return Outcome(result=result, active_version=mv.version, candidate=mv.version)

    # --- public operations -------------------------------------------------------------------
    async def scan(self) -> list[store.ModelVersion]:
        return await asyncio.to_thread(store.list_versions, self.root, self.name)

    async def start(self) -> None:
        """Load the pinned version, or the newest one that passes. If none does: raise (fail
        fast), or with ``wait_for_model`` stay up not ready until the watcher finds one."""
        versions = await self.scan()
        if self.pinned is not None:
            versions = [v for v in versions if v.version == self.pinned]
        async with self._lock:
            for mv in sorted(versions, key=lambda v: v.version, reverse=True):
                self.last = await self._try(mv, gated=False)
                if self.last.result in SERVED:
                    return
        what = f"version {self.pinned} of " if self.pinned else ""
        if not versions:
            names = sorted({mv.name for mv in await asyncio.to_thread(store.list_versions, self.root)})
            there = f"it holds {', '.join(names)}" if names else "it holds no model"
            problem = f"no {what}model {self.name!r} in store {self.root} ({there}; choose with --model-name)"
        else:
            reasons = "; ".join(f"v{v}: {r}" for v, r in sorted(self.refused.items()))
            problem = f"no loadable {what}version of {self.name!r} in {self.root}: {reasons}"
        if not self.settings.wait_for_model:
            raise RuntimeError(problem)
        log.warning("%s; not ready, waiting for the store watcher to find one", problem)

    async def reload(self, *, unpin: bool = False) -> Outcome:
        """Move to the newest valid version newer than the active one, or to the pinned one."""
        async with self._lock:
            if unpin:
                self.pinned = None
            current = self._active_v() or 0
            outcome = Outcome(result="unchanged", active_version=self._active_v(), message="no newer version")
            if self.pinned is not None and current == self.pinned:
                outcome.message = f"pinned to v{self.pinned}"
                candidates = []
            elif self.pinned is not None:
                candidates = [v for v in await self.scan() if v.version == self.pinned]
            else:
                candidates = [v for v in await self.scan() if v.version > current]
            for mv in sorted(candidates, key=lambda v: v.version, reverse=True):
                if mv.version in self.refused:
                    continue
                outcome = await self._try(mv, gated=True)
                if outcome.result in SERVED:
                    break
            if outcome.result == "unchanged":
                self.metrics.reloads.labels("unchanged").inc()
            self.last = outcome
            return outcome

    async def activate(
        self, version: int, *, pin: bool = True, accept_contract_change: bool = False
    ) -> Outcome:
        """Serve exactly ``version`` (roll back or forward) and pin it; KeyError if unknown.
        The robustness gate does not apply; a changed class list or input size is refused
        unless ``accept_contract_change``."""
        async with self._lock:
            match = [v for v in await self.scan() if v.version == version]
            if not match:
                raise KeyError(version)
            if self._active_v() == version:
                outcome = Outcome(
                    result="unchanged", active_version=version, candidate=version, message="already active"
                )
                self.metrics.reloads.labels("unchanged").inc()
            else:
                outcome = await self._try(match[0], gated=False, contract_change_ok=accept_contract_change)
            if pin and outcome.result != "refused":
                self.pinned = version
            self.last = outcome
            return outcome

    # --- watching and closing ----------------------------------------------------------------
    def start_watching(self) -> None:
        if self.settings.poll_interval_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="store-watcher")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.reload()
            except Exception:  # a broken store must not kill the watcher
                log.exception("store poll failed")

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        async with self._lock:  # let a swap in progress finish, so nothing is left open
            slot, self.active = self.active, None
        self.metrics.set_active(None)
        if slot is not None:
            await self._close(slot)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _active_v(self) -> int | None:
        return self.active.version if self.active else None

    def _retire(self, slot: Slot) -> None:
        slot.retired = True
        if slot.leases == 0:
            self._spawn(self._close(slot))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, slot: Slot) -> None:
        await slot.batcher.aclose()
        await asyncio.to_thread(slot.backend.close)
        log.info("closed %s v%d", slot.name, slot.version)
