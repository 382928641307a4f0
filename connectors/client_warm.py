"""Chunk warming shared by the retriever / postprocessor / agent adapters.

A :class:`ChunkWarmer` precomputes the KV of texts that are about to appear in prompts, through the
sidecar (``POST /v1/chunks``) or an in-process :class:`blending.engine.Engine`. It never raises: a
failure is counted and logged, so warming can sit on a retrieval path without breaking it. With
``background=True`` the work runs on one worker thread and ``warm`` returns at once.

Where the KV is computed: ``system_prompt=None`` stores the chunks *standalone* (no prefix), which every
chat reuses whatever its system prompt (the sidecar falls back to the standalone key); a system prompt
stores them after that prompt's chat prefix, which only chats with that system prompt hit, at a higher
fidelity.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from connectors.client import KVFuseClient

log = logging.getLogger("kvfuse.connectors")


class ChunkWarmer:
    """Warm chunk KV via ``client`` (a sidecar) or ``engine`` (in-process, namespace ``namespace``)."""

    def __init__(
        self,
        client: KVFuseClient | None = None,
        *,
        engine: Any = None,
        system_prompt: str | None = None,
        namespace: str = "default",
        background: bool = False,
        batch_size: int = 8,
    ) -> None:
        if (client is None) == (engine is None):
            raise ValueError("give exactly one of client (a sidecar) or engine (in-process)")
        self.client, self.engine = client, engine
        self.system_prompt, self.namespace = system_prompt, namespace
        self.background, self.batch_size = background, max(1, batch_size)
        self.warmed = self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._pending: list[Future[list[str]]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._prefix: str | None = None

    def warm(self, texts: Sequence[str]) -> list[str] | None:
        """Warm ``texts`` (blank ones and duplicates skipped). Returns the chunk keys (``[]`` after a
        logged failure), or None when the work was handed to the background thread."""
        unique = list(dict.fromkeys(t for t in texts if t and t.strip()))
        if not unique:
            return []
        if not self.background:
            return self._warm_safe(unique)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvfuse-warm")
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._executor.submit(self._warm_safe, unique))
        return None

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for background warming handed out so far."""
        with self._lock:
            pending = list(self._pending)
        wait(pending, timeout=timeout_s)

    def close(self) -> None:
        self.flush()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _warm_safe(self, texts: list[str]) -> list[str]:
        try:
            keys = self._warm(texts)
        except Exception as exc:  # warming is an optimisation: never let it break the caller
            with self._lock:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("kvfuse: warming %d chunk(s) failed, continuing without: %s", len(texts), exc)
            return []
        with self._lock:
            self.warmed += len(texts)
        return keys

    def _warm(self, texts: list[str]) -> list[str]:
        keys: list[str] = []
        for i in range(0, len(texts), self.batch_size):
            batch = texts[i : i + self.batch_size]
            if self.client is not None:
                standalone = self.system_prompt is None
                prefix = "" if standalone else self.system_prompt
                keys += self.client.warm(batch, prefix=prefix, raw_prefix=standalone)["keys"]
            else:
                keys += [k.hex for k in self.engine.warm(batch, self.namespace, self._engine_prefix())]
        return keys

    def _engine_prefix(self) -> str | None:
        if self.system_prompt is None:
            return None
        if self._prefix is None:
            from blending.render import Renderer  # the chat prefix exactly as the sidecar renders it

            self._prefix = Renderer(self.engine.tokenizer).chat_prefix(self.system_prompt)
        return self._prefix
