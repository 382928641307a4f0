"""What the routes share: the engine, settings, renderer, key mapper and metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

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
    pending_writebacks: int = 0
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
            metrics=Metrics(engine.store),
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
        with self._lock:
            self.pending_writebacks += 1

        def run() -> None:
            try:
                self.engine.writeback(result)
            except Exception:
                log.exception("writeback failed")
            finally:
                with self._lock:
                    self.pending_writebacks -= 1

        return run


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.kvfuse
    return state


StateDep = Annotated[ServerState, Depends(get_state)]
