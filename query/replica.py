"""What this replica serves, switched to what its stage names after a promotion or rollback, and why it
serves nothing when it does not."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Awaitable, Callable

from model_store import stages
from query.active import Active, load_active, stage_mtime
from query.errors import ApiError
from query.models import ReloadResponse

log = logging.getLogger("bentoml.imagesearch")


class Replica:
    """The index a replica serves (`active`), or why it is not ready or not alive (`problem`, for /readyz and
    /livez). A switch replaces `active` whole: a request in flight keeps the index it started with."""

    def __init__(self, stage: str, embedder_tag: Callable[[], Awaitable[str]]) -> None:
        self.stage = stage
        self.active: Active | None = None
        self.problem: str | None = None
        self._embedder_tag = embedder_tag  # the tag of the embedder the service runs
        self._switch_lock = asyncio.Lock()
        self._stage_mtime = stage_mtime()

    def start(self, deployment: stages.Deployment | None, path: Path | None) -> None:
        """Serve `deployment` (what the stage named when the service was declared), its index read from `path`.
        Whatever is wrong with it leaves the replica up and unready, saying why."""
        if deployment is None:
            self.problem = f"nothing is promoted to {self.stage}"
        else:
            try:
                self.active = load_active(deployment, path, self.stage)
            except Exception as exc:  # noqa: BLE001 -- any broken artifact leaves the service up and unready
                self.problem = f"index {deployment.index} cannot be served: {exc}"
        if self.problem:
            log.error("not ready: %s", self.problem)

    def require(self) -> Active:
        """The served index; 503 saying why when there is none."""
        if self.active is None:
            raise ApiError(f"not ready: {self.problem}", HTTPStatus.SERVICE_UNAVAILABLE)
        return self.active

    def built_with(self, tag: str) -> bool:
        """Whether the served index was built with the embedder `tag` runs; if not, `problem` says so."""
        needs = self.active.index.manifest.embedder
        if tag != needs:
            self.problem = (f"index {self.active.served.index} needs embedder {needs}, the embedder service runs "
                            f"{tag}: redeploy")
        return tag == needs

    async def switch(self) -> ReloadResponse:
        """Load what the stage record names now and swap it in; one switch at a time. A version that
        cannot be loaded is never switched to: the old one keeps serving."""
        async with self._switch_lock:
            deployment = stages.current(self.stage)
            old = self.active
            if deployment is None:
                raise ApiError(f"nothing is promoted to {self.stage}", HTTPStatus.CONFLICT)
            if old is not None and deployment.index == old.deployment.index:
                return ReloadResponse(changed=False, served=old.served)
            if deployment.embedder != (tag := await self._embedder_tag()):
                raise ApiError(f"{deployment.index} needs embedder {deployment.embedder}, but the embedder "
                               f"service runs {tag}: redeploy the service", HTTPStatus.CONFLICT)
            try:
                new = await asyncio.to_thread(load_active, deployment, None, self.stage)
            except Exception as exc:  # noqa: BLE001 -- whatever is wrong with it, the old index stays
                raise ApiError(f"cannot load {deployment.index}, still serving "
                               f"{old.served.index if old else 'nothing'}: {exc}", HTTPStatus.CONFLICT) from None
            self.active, self.problem = new, None  # one reference swap: requests in flight keep their index
            log.info("now serving %s (was %s)", deployment.index, old and old.deployment.index)
            return ReloadResponse(changed=True, served=new.served, previous=old and old.deployment.index)

    async def follow_stage(self, every_s: float) -> None:
        """Forever, every `every_s`: switch when the stage record changed. Requests never wait for a switch;
        each replica follows promotions by itself."""
        while True:
            await asyncio.sleep(every_s)
            mtime = stage_mtime()  # None without a stage record (a container serving its packed served.json)
            if mtime is None or mtime == self._stage_mtime:
                continue
            self._stage_mtime = mtime
            try:
                await self.switch()
            except ApiError as exc:
                log.warning("stage %s changed but was not loaded: %s", self.stage, exc.message)
                if self.active is None:
                    self.problem = exc.message
            except Exception:  # noqa: BLE001 -- following must never stop
                log.exception("following stage %s failed", self.stage)
