"""What the routes share: the engine, settings, renderer, key mapper and metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from blending import scheduler
from blending.engine import Engine, PrefillResult
from server.config import Settings
from server.metrics import Metrics
from server.render import Renderer
from server.tenancy import KeyMapper, load_secret

log = logging.getLogger("kvfuse.server")


@dataclass
class ServerState:
    engine: Engine
    settings: Settings
    renderer: Renderer
    keys: KeyMapper
    metrics: Metrics
    eos_ids: tuple[int, ...]
    pending_writebacks: int = 0  # all tenants
    pending_by_tenant: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def build(cls, engine: Engine, settings: Settings) -> ServerState:
        eos: set[int] = set()
        for source in (
            engine.tokenizer.eos_token_id,
            getattr(engine.model.generation_config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list | tuple):
                eos.update(int(t) for t in source)
        return cls(
            engine=engine,
            settings=settings,
            renderer=Renderer(engine.tokenizer),
            keys=KeyMapper(load_secret(settings.key_secret, settings.data_dir)),
            metrics=Metrics(engine.store, engine.model_lock, engine.guard),
            eos_ids=tuple(sorted(eos)),
        )

    @property
    def model_name(self) -> str:
        return self.engine.loaded.name

    def writeback_task(self, result: PrefillResult, requested_mode: str) -> Callable[[], None]:
        """A background task storing what ``result`` computed; counted in ``pending_writebacks`` from
        now until it has run. Failures are logged, never raised. A request that asked for ``dense``
        neither reads nor writes the cache (it is the baseline), so its task does nothing."""
        if requested_mode == "dense":
            return lambda: None
        tenant = result.namespace
        with self._lock:
            self.pending_writebacks += 1
            self.pending_by_tenant[tenant] = self.pending_by_tenant.get(tenant, 0) + 1

        def run() -> None:
            try:
                with scheduler.tenant(tenant):  # the tenant's own turns of the fair model lock
                    self.engine.writeback(result)
            except Exception:
                log.exception("writeback failed")
            finally:
                with self._lock:
                    self.pending_writebacks -= 1
                    self.pending_by_tenant[tenant] -= 1
                    if not self.pending_by_tenant[tenant]:
                        del self.pending_by_tenant[tenant]

        return run

    def pending(self, tenant: str | None) -> int:
        """Writebacks not yet done: the tenant's own, or all (None)."""
        with self._lock:
            return self.pending_writebacks if tenant is None else self.pending_by_tenant.get(tenant, 0)


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.kvfuse
    return state


StateDep = Annotated[ServerState, Depends(get_state)]
