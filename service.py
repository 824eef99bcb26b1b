"""BentoML services: Embedder (CNN with adaptive batching, GPU when present) and ImageSearch (the HTTP entry)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Optional

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from interfaces import (BatchSearchResponse, EstimateResponse, IndexInfo, ReloadResponse, SearchResponse, Served)
from model_store import stages
from model_store.index_artifact import ArtifactError, Filters, Match, SearchIndex
from model_store.preprocess import ImageError, ImageTooLarge, decode_image, image_to_array
from model_store.registry import get_model
from model_store.settings import get_settings
from pricing import estimate_price

log = logging.getLogger("bentoml.imagesearch")
settings = get_settings()
# Reads one small JSON file; None until an index is promoted (the services then start but stay unready).
SERVED = stages.served(settings.stage)
K = Annotated[int, Field(ge=1, le=settings.max_k, description=f"distinct items to return, 1..{settings.max_k}")]
ESTIMATE_NEIGHBOURS = 20


class ClientError(BentoMLException):
    """A request the client can fix; the status is 4xx and the message says what to change."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message, error_code=status)


@bentoml.service(
    resources={"gpu": 1, "cpu": "2"},
    workers=1,  # one model copy per GPU/CPU box; throughput comes from batching, not processes
    # Never the bottleneck: the entry service's max_concurrency is what sheds load.
    traffic={"timeout": 30, "max_concurrency": 256},
)
class Embedder:
    """(N, 3, H, W) preprocessed photos -> (N, D) L2-normalised descriptors."""

    model = bentoml.models.BentoModel(SERVED.embedder) if SERVED else None

    def __init__(self) -> None:
        from model_store.embedder import embedder_from_folder

        self.embedder = None
        if self.model is not None:  # BentoML resolves the class attribute to the stored model
            if settings.torch_threads:
                import torch
                torch.set_num_threads(settings.torch_threads)
            self.embedder = embedder_from_folder(Path(self.model.path), settings.device, settings.half_precision)
            if settings.torch_compile:
                import torch
                self.embedder.net = torch.compile(self.embedder.net, dynamic=True)
            log.info("embedder %s on %s (half=%s)", self.model.tag, self.embedder.device, self.embedder.half)

    def __is_ready__(self) -> bool:
        return self.embedder is not None

    @bentoml.api(batchable=settings.embed_batching, batch_dim=0, max_batch_size=settings.embed_max_batch_size,
                 max_latency_ms=settings.embed_max_latency_ms)
    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.embedder.embed(batch)

    @bentoml.api
    def describe(self) -> dict:
        """The loaded embedder's tag and config (empty when none is loaded)."""
        if self.embedder is None:
            return {}
        return {"tag": str(self.model.tag), "config": self.embedder.config.model_dump(mode="json")}


@dataclass(frozen=True)
class Active:
    """What is served right now; replaced as a whole on reload, so a request sees one or the other."""

    index: SearchIndex
    deployment: stages.Deployment
    served: Served


def _load(deployment: stages.Deployment, path: Path) -> Active:
    index = SearchIndex(path, deployment.index)
    weights = index.manifest.embedder_config.weights
    served = Served(index=deployment.index, stage=settings.stage, embedder=deployment.embedder,
                    weights=weights.source, pretrained=weights.pretrained,
                    warning=None if weights.pretrained else "embedder has RANDOM weights: results are not meaningful")
    return Active(index, deployment, served)


_instances: list["ImageSearch"] = []  # the service instance of this worker, for GET /index


async def _get_index(request: Request) -> JSONResponse:
    try:
        return JSONResponse(_instances[0].index_info().model_dump(mode="json"))
    except ClientError as exc:
        return JSONResponse({"error": str(exc)}, status_code=exc.error_code)


@bentoml.service(workers=1, traffic={"timeout": 30, "max_concurrency": settings.max_concurrency})
@bentoml.asgi_app(Starlette(routes=[Route("/index", _get_index, methods=["GET"])]), path="/")
class ImageSearch:
    """Photo in, similar sold items and an expected price out."""

    embedder = bentoml.depends(Embedder)
    index_model = bentoml.models.BentoModel(SERVED.index) if SERVED else None

    def __init__(self) -> None:
        self.active: Active | None = None
        self.embedder_tag: str | None = None
        self._switch_lock = asyncio.Lock()
        self._checked_at, self._stage_mtime = time.monotonic(), _stage_mtime()
        _instances[:] = [self]
        if SERVED is None:
            log.error("nothing is promoted to %s: not ready", settings.stage)
            return
        try:
            self.active = _load(SERVED, Path(self.index_model.path))
        except (ArtifactError, OSError) as exc:
            log.error("index %s cannot be served, not ready: %s", SERVED.index, exc)

    async def __is_ready__(self) -> bool:
        if self.active is None:
            return False
        if self.embedder_tag is None:
            self.embedder_tag = (await self.embedder.to_async.describe()).get("tag")
        return self.embedder_tag == self.active.index.manifest.embedder

    def _require(self) -> Active:
        if self.active is None:
            raise ClientError(f"no index is loaded for stage {settings.stage}", HTTPStatus.SERVICE_UNAVAILABLE)
        return self.active

    def _filters(self, active: Active, **given) -> Filters:
        f = Filters(**given)
        if f.category is not None and f.category.lower() not in active.index.categories:
            known = ", ".join(sorted(active.index.categories)[:30])
            raise ClientError(f"unknown category {f.category!r}: use one of {known}")
        if f.min_price is not None and f.max_price is not None and f.min_price > f.max_price:
            raise ClientError(f"min_price {f.min_price} is above max_price {f.max_price}")
        if f.sold_after and f.sold_before and f.sold_after > f.sold_before:
            raise ClientError(f"sold_after {f.sold_after} is later than sold_before {f.sold_before}")
        return f

    async def _embed(self, active: Active, images: list[Path]) -> np.ndarray:
        spec = active.index.manifest.embedder_config.preprocess

        def prepare(i: int, path: Path) -> np.ndarray:
            name = "image" if len(images) == 1 else f"images[{i}]"
            size = path.stat().st_size
            if size > settings.max_image_bytes:
                raise ImageTooLarge(f"{name} is {size:,} bytes; the limit is {settings.max_image_bytes:,}")
            img = decode_image(path.read_bytes(), max_bytes=settings.max_image_bytes,
                               max_pixels=settings.max_image_pixels, name=name)
            return image_to_array(img, spec)

        try:
            arrays = await asyncio.gather(*(asyncio.to_thread(prepare, i, p) for i, p in enumerate(images)))
        except ImageTooLarge as exc:
            raise ClientError(str(exc), HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
        except ImageError as exc:
            raise ClientError(str(exc), HTTPStatus.UNSUPPORTED_MEDIA_TYPE) from None
        batch = np.stack(arrays)
        for attempt in range(3):
            try:
                return await self.embedder.to_async.embed(batch)
            except aiohttp.ClientConnectionError:
                # BentoML's internal client reuses keep-alive connections the embedder already closed
                # (BentoML issue 4971, PR 5698); embedding is idempotent, so send it again.
                if attempt == 2:
                    raise
            except BentoMLException as exc:
                if exc.error_code in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
                    raise ClientError("the embedder is at capacity: retry in a second",
                                      HTTPStatus.TOO_MANY_REQUESTS) from None
                raise

    async def _neighbours(self, image: Path, k: int, **filters) -> tuple[Active, list[Match]]:
        await self._follow_stage()
        active = self._require()
        f = self._filters(active, **filters)
        descriptor = (await self._embed(active, [image]))[0]
        return active, await asyncio.to_thread(active.index.search, descriptor, k, f)

    @bentoml.api
    async def search(self, image: Path, k: K = 10, category: Optional[str] = None,
                     min_price: Optional[float] = None, max_price: Optional[float] = None,
                     sold_after: Optional[dt.date] = None, sold_before: Optional[dt.date] = None) -> SearchResponse:
        """The k most similar sold items (distinct items, best first) to the uploaded photo."""
        start = time.perf_counter()
        active, matches = await self._neighbours(image, k, category=category, min_price=min_price,
                                                 max_price=max_price, sold_after=sold_after, sold_before=sold_before)
        return SearchResponse(results=matches, served=active.served, took_ms=_ms(start))

    @bentoml.api
    async def estimate(self, image: Path, category: Optional[str] = None, sold_after: Optional[dt.date] = None,
                       sold_before: Optional[dt.date] = None) -> EstimateResponse:
        """Expected price from the most similar sold items, with a range and a confidence."""
        start = time.perf_counter()
        active, matches = await self._neighbours(image, ESTIMATE_NEIGHBOURS, category=category,
                                                 sold_after=sold_after, sold_before=sold_before)
        estimate = estimate_price(matches)
        return EstimateResponse(**estimate.model_dump(), served=active.served, took_ms=_ms(start))

    @bentoml.api
    async def search_batch(self, images: list[Path], k: K = 10, category: Optional[str] = None) -> BatchSearchResponse:
        """Several photos in one request: one result list per photo, in upload order."""
        start = time.perf_counter()
        if not 1 <= len(images) <= settings.max_batch_images:
            raise ClientError(f"send 1 to {settings.max_batch_images} photos in field images; got {len(images)}")
        await self._follow_stage()
        active = self._require()
        f = self._filters(active, category=category)
        descriptors = await self._embed(active, images)
        results = await asyncio.gather(*(asyncio.to_thread(active.index.search, d, k, f) for d in descriptors))
        return BatchSearchResponse(results=list(results), served=active.served, took_ms=_ms(start))

    def index_info(self) -> IndexInfo:
        """The served index: version, stage, counts, embedder and build metadata."""
        active = self._require()
        m = active.index.manifest
        return IndexInfo(served=active.served, photos=m.n_photos, items=m.n_items, dim=m.dim, n_trees=m.n_trees,
                         search_k=m.search_k, ann_recall_at_10=m.ann_recall_at_10, built_at=m.built_at,
                         categories=sorted(active.index.category_names),
                         build=m.model_dump(mode="json", exclude={"embedder_config"}))

    @bentoml.api
    async def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Serve what is promoted to this stage now (after promote or rollback). Needs the admin token."""
        token = ctx.request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not settings.admin_token or not hmac.compare_digest(token, settings.admin_token):
            raise ClientError("send the admin token as 'Authorization: Bearer <IMAGESEARCH_ADMIN_TOKEN>'",
                              HTTPStatus.UNAUTHORIZED)
        return await self._switch()

    async def _switch(self) -> ReloadResponse:
        """Load what the stage record names now and swap it in; one switch at a time."""
        async with self._switch_lock:
            deployment = stages.current(settings.stage)
            old = self.active
            if deployment is None:
                raise ClientError(f"nothing is promoted to {settings.stage}", HTTPStatus.CONFLICT)
            if old is not None and deployment.index == old.deployment.index:
                return ReloadResponse(changed=False, served=old.served)
            self.embedder_tag = self.embedder_tag or (await self.embedder.to_async.describe()).get("tag")
            if deployment.embedder != self.embedder_tag:
                raise ClientError(f"{deployment.index} needs embedder {deployment.embedder}, but the embedder "
                                  f"service runs {self.embedder_tag}: redeploy the service", HTTPStatus.CONFLICT)
            try:
                new = await asyncio.to_thread(_load, deployment, Path(get_model(deployment.index).path))
            except (ArtifactError, LookupError, OSError) as exc:
                raise ClientError(f"cannot load {deployment.index}, still serving the old index: {exc}",
                                  HTTPStatus.CONFLICT) from None
            self.active = new  # one reference swap: requests in flight keep the index they started with
            log.info("now serving %s (was %s)", deployment.index, old and old.deployment.index)
            return ReloadResponse(changed=True, served=new.served, previous=old and old.deployment.index)

    async def _follow_stage(self) -> None:
        """Every follow_stage_s, switch if the stage record changed: each replica follows promotions."""
        now = time.monotonic()
        if settings.follow_stage_s <= 0 or now - self._checked_at < settings.follow_stage_s:
            return
        self._checked_at = now
        mtime = _stage_mtime()  # None without a stage record (a container serving its packed served.json)
        if mtime is not None and mtime != self._stage_mtime:
            self._stage_mtime = mtime
            try:
                await self._switch()
            except ClientError as exc:
                log.warning("stage %s changed but was not loaded: %s", settings.stage, exc)


def _stage_mtime() -> int | None:
    try:
        return (stages.stages_dir() / stages.STATE_FILE).stat().st_mtime_ns
    except OSError:
        return None


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
