"""BentoML services: Embedder (CNN with adaptive batching, GPU when present) and ImageSearch (the HTTP entry)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from http import HTTPStatus
from pathlib import Path
from typing import Optional, Sequence

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from model_store import stages
from model_store.core_share import MAX_WAIT_S, SPIN_COUNT, busy_threads, share_of_worker, worker_count
from model_store.gpu_probe import embeds_on_gpu
from model_store.malloc import ONE_ARENA
from model_store.settings import SettingsError, get_settings

try:  # before the query modules, which read the settings as they load
    settings = get_settings()
except SettingsError as exc:  # one line an operator can act on, not BentoML's 40-line traceback of the import
    raise SystemExit(f"cannot start the service: {exc}") from None

from query.active import Active
from query.assist import assist, estimate as estimate_for
from query.bearer import carries
from query.bentoml_fixes import (api_errors_in_one_line, batching_backstop_at_least, keep_answering_after_sigterm,
                                 media_types_worked_out_once, metrics_of_its_own, never_hold_batches_back,
                                 own_answers_in_one_shape, start_dead_workers_again, tune_client)
from query.client_limit import ClientLimit
from query.compare import cosine, verdict
from query.cors import OneShapeCORS
from query.embed_pace import MARGIN, EmbedPace, embed_pace
from query.embedder_calls import EmbedderCalls
from query.embedder_token import EmbedderTokenGuard, send_token
from query.entry_process import set_up_entry_process
from query.errors import ApiError, answers_errors
from query.fields import EndpointFields, read_query_params
from query.guard import RequestGuard
from query.models import (K, AssistResponse, BatchImages, BatchSearchResponse, Category, CompareResponse,
                          CompareThresholds, EstimateResponse, IndexInfo, MoreImages, Price, ReloadResponse,
                          SearchResponse, SimilarQuery, SimilarResponse)
from query.pages import SEARCH_PAGE, SearchPageFiles, api_page_file
from query.photos import thumbnail_response
from query.replica import Replica
from query.search_index import item_query
from query.uploads import field_names, upload_pixels

log = logging.getLogger("bentoml.imagesearch")
# Reads one small JSON file; None until an index is promoted (the services then start but stay unready).
SERVED = stages.served(settings.stage)
EMBED_ON_GPU = embeds_on_gpu(settings.device)
EMBEDDER_WORKERS = worker_count(settings.embedder_workers, EMBED_ON_GPU)
EMBED_MAX_BATCH = settings.embed_batch_limit(EMBED_ON_GPU)


def embedder_call_records(access_log: bool, tracing: bool) -> dict:
    """The Embedder's per-call records, off by default: each call is one the entry makes and logs already, and
    BentoML's access log line and OpenTelemetry span (recorded even with no exporter) were a third of the
    Embedder's event loop per call (docs/PERFORMANCE.md, section 6). On, BentoML's own configuration applies."""
    records = {} if access_log else {"logging": {"access": {"enabled": False}}}
    return records | ({} if tracing else {"tracing": {"excluded_urls": ["."]}})  # "." matches every URL


@bentoml.service(
    resources={"gpu": 1, "cpu": "2"},
    workers=EMBEDDER_WORKERS,  # one per GPU; on a CPU one per core, sharing the cores (model_store/core_share.py)
    # max_concurrency is never the bottleneck: the entry's guard sheds load first.
    traffic={"timeout": 30, "max_concurrency": 256, "concurrency": settings.embedder_concurrency},
    # Idle torch threads stop spinning sooner (the workers share the cores); the torch thread allocates from
    # the main arena, which keeps the memory a pass frees for the next one (model_store/malloc.py).
    envs=[SPIN_COUNT, *([ONE_ARENA] if settings.keep_freed_memory else [])],
    **embedder_call_records(settings.embedder_access_log, settings.embedder_tracing),
)
class Embedder:
    """(N, 3, H, W) uint8 photos, resized and cropped -> (N, D) L2-normalised descriptors."""

    model = bentoml.models.BentoModel(SERVED.embedder) if SERVED else None

    def __init__(self) -> None:
        self.embedder = None
        self.cores = share_of_worker(EMBEDDER_WORKERS, bentoml.server_context.worker_index, EMBED_ON_GPU,
                                     settings.torch_threads)
        never_hold_batches_back()  # BentoML's batching otherwise slows lone searches after a burst
        # Every torch call of this process runs on this one thread. The event loop stays free during a pass, so
        # calls that arrive meanwhile are read and queued and leave together as the next batch; and no second
        # thread ever starts an OpenMP team: once a process holds more OpenMP threads than cores, libgomp
        # stops spinning and every pass slows down (28 -> 40 ms for one photo on 2 cores, docs/PERFORMANCE.md).
        self.torch = ThreadPoolExecutor(1, thread_name_prefix="torch")
        batch_s = None
        if self.model is not None:  # BentoML resolves the class attribute to the stored model
            batch_s = self.torch.submit(self._load).result()
        # A slower network's waits are longer: each limit grows as the embed deadline does (query/embed_pace.py)
        self.measured = {"batch_s": batch_s, "max_batch": EMBED_MAX_BATCH, "workers": EMBEDDER_WORKERS,
                         "worker": f"{socket.gethostname()}/{os.getpid()}"}  # the entry tells the workers apart
        pace = _pace_of(self.measured)
        longer = pace.deadline_s / settings.embed_deadline_s
        batching_backstop_at_least(settings.embed_max_latency_ms / 1000 * longer)
        if self.cores and batch_s:  # waiting for a core as long as another worker's pass may take
            self.cores.max_wait_s = max(MAX_WAIT_S, MARGIN * batch_s)
        if bentoml.server_context.worker_index is not None:  # under `bentoml serve`: the entry drains first
            keep_answering_after_sigterm(settings.embedder_drain_s * longer)
        log.info("embedder pace: %s", pace.why)

    def _load(self) -> float:
        """Load and warm up the stored embedder; returns the seconds a full batch takes as a busy worker runs it."""
        import torch

        from model_store.embedder import embedder_from_folder

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        embedder = embedder_from_folder(Path(self.model.path), settings.device, settings.half_precision)
        if settings.torch_compile:
            embedder.net, embedder.cuda_graphs = torch.compile(embedder.net, dynamic=True), False
        # Before readiness, every batch size adaptive batching can form: on a GPU the first pass of each
        # new size takes seconds, longer than the entry's embed deadline (measured: docs/PERFORMANCE.md)
        warm_s = embedder.warm_up(tuple(range(1, EMBED_MAX_BATCH + 1)))
        log.info("embedder %s on %s (half=%s, %d CUDA graphs), warmed up in %.1f s", self.model.tag,
                 embedder.device, embedder.half, len(embedder.graphs), warm_s)
        # A full batch timed as a busy worker runs it (where workers share a CPU, on its share of the cores):
        # this worker's waits and the entry's (from `describe`) are sized from it
        batch_s = round(embedder.time_pass(EMBED_MAX_BATCH, busy_threads(EMBEDDER_WORKERS) if self.cores else None), 4)
        self.embedder = embedder
        return batch_s

    def __is_ready__(self) -> bool:
        return self.embedder is not None

    @bentoml.api(batchable=settings.embed_batching, batch_dim=0, max_batch_size=EMBED_MAX_BATCH,
                 max_latency_ms=settings.embed_max_latency_ms)
    async def embed(self, batch: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self.torch, self._embed, batch)

    def _embed(self, batch: np.ndarray) -> np.ndarray:
        with self.cores.busy() if self.cores else nullcontext():
            return self.embedder.embed(batch)

    @bentoml.api
    def describe(self) -> dict:
        """The loaded embedder's tag and config (empty when none is loaded)."""
        if self.embedder is None:
            return {}
        return {"tag": str(self.model.tag), "config": self.embedder.config.model_dump(mode="json"),
                "pace": self.measured}


media_types_worked_out_once(Embedder)
# Deployed apart, its port unpickles what it is sent: only the entry may call it (without a token: a warning)
Embedder.add_asgi_middleware(EmbedderTokenGuard, token=settings.embedder_token)
api_errors_in_one_line()  # a client's mistake is one line of log, not an ERROR and its traceback
start_dead_workers_again(settings.worker_check_s)  # promptly, and in a container too
metrics_of_its_own()  # a second server on this store no longer deletes the first one's Prometheus files
own_answers_in_one_shape()  # BentoML's backstop 504 too: {"error", "field"} and nosniff


def _pace_of(measured: dict) -> EmbedPace:
    """The embed deadline and photos in flight for an embedder that measured `measured` (its describe's
    "pace"; {} when it measured nothing)."""
    return embed_pace(measured.get("batch_s"), measured.get("max_batch", EMBED_MAX_BATCH),
                      measured.get("workers", EMBEDDER_WORKERS), settings.search_workers, settings.embed_deadline_s,
                      settings.max_photos_in_flight)


_instances: list["ImageSearch"] = []  # the service instance of this worker, for GET /index and readiness


SIMILAR_FIELDS = EndpointFields.of(SimilarQuery)
NO_FIELDS = EndpointFields({}, {})  # GET /index's


@answers_errors
async def _get_index(request: Request) -> JSONResponse:
    read_query_params(request.query_params.multi_items(), NO_FIELDS, "/index")  # it would ignore one: refused
    return JSONResponse(_instances[0].index_info().model_dump(mode="json"))


@answers_errors
async def _get_similar(request: Request) -> JSONResponse:
    params = read_query_params(request.query_params.multi_items(), SIMILAR_FIELDS, "/similar")
    answer = await _instances[0].similar(request.path_params["item_id"], **params)
    return JSONResponse(answer.model_dump(mode="json"))


@answers_errors
async def _get_photo(request: Request) -> Response:
    return thumbnail_response(_instances[0].replica.require(), request.path_params["name"], request.headers)


ROUTES = [Route("/index", _get_index, methods=["GET"]),
          Route("/similar/{item_id:path}", _get_similar, methods=["GET"]),
          Route("/photos/{name}", _get_photo, methods=["GET"]),
          Route("/ui", lambda request: RedirectResponse("/ui/", status_code=308), methods=["GET"]),
          Mount("/ui", SearchPageFiles(directory=SEARCH_PAGE, html=True)),
          Route("/", api_page_file("index.html"), methods=["GET"]),  # in place of BentoML's own (query/pages.py)
          Route("/api-page.js", api_page_file("api-page.js"), methods=["GET"])]


# runner_probe off: __is_ready__ asks the embedder itself, within a deadline and saying why it failed (BentoML's
# own probe waited 5 s on a dead embedder and then answered 500)
@bentoml.service(workers=settings.search_workers,
                 traffic={"timeout": settings.entry_backstop_s, "concurrency": settings.search_concurrency},
                 runner_probe={"enabled": False, "timeout": 1, "period": 10})
@bentoml.asgi_app(Starlette(routes=ROUTES), path="/")
class ImageSearch:
    """Photo in, similar sold items and an expected price out. Every error answers
    {"error": "what is wrong and what to send", "field": "the field at fault, or null"}."""

    embedder = bentoml.depends(Embedder)
    index_model = bentoml.models.BentoModel(SERVED.index) if SERVED else None

    def __init__(self) -> None:
        _instances[:] = [self]
        set_up_entry_process(settings)
        tune_client(self.embedder)
        if settings.embedder_token:
            send_token(self.embedder, settings.embedder_token)
        self.calls = EmbedderCalls(self.embedder, _pace_of, max_batch=EMBED_MAX_BATCH,
                                   retry_share=settings.embed_retry_share, lost_s=settings.embedder_lost_s,
                                   request_timeout_s=settings.request_timeout_s)
        self.replica = Replica(settings.stage, self.calls.known_tag)
        self.replica.start(SERVED, Path(self.index_model.path) if SERVED else None)
        if settings.follow_stage_s > 0:
            self._follower = asyncio.get_running_loop().create_task(self.replica.follow_stage(settings.follow_stage_s))

    async def __is_ready__(self) -> bool:
        """Ready when an index is loaded and the embedder answers, now (each probe asks it), running the
        embedder the index was built with."""
        if self.replica.active is None:
            return False
        try:
            tag = await self.calls.ask_tag(retry=False)
        except ApiError as exc:  # the embedder is still starting, or gone: not ready, and /readyz says why
            self.replica.problem = exc.message
            return False
        return self.replica.built_with(tag)

    async def __is_alive__(self) -> bool:
        """Alive unless the embedder this server runs has answered nothing for embedder_lost_s and does not
        answer now either. Its dead workers are started again; this is for a server where that does not help,
        so that the orchestrator restarts it."""
        if not self.calls.health.restart_needed():
            return True
        try:
            await self.calls.ask_tag(retry=False)
            return True
        except ApiError:
            self.replica.problem = (f"the embedder service has not answered for "
                                    f"{self.calls.health.lost_for_s():.0f} s: restart the server")
            return False

    async def _embed(self, active: Active, images: list[Path], names: list[str] | None = None) -> np.ndarray:
        """Embedder descriptors of uploaded photos; `names` are their fields, for the errors."""
        spec, names = active.index.manifest.embedder_config.preprocess, names or field_names(len(images))
        self.calls.refuse_what_would_time_out(len(images))  # before its photos are decoded, on an overloaded server
        pixels = await asyncio.gather(*(asyncio.to_thread(upload_pixels, path, name, spec, settings)
                                        for path, name in zip(images, names)))
        return await self.calls.embed(np.stack(pixels))

    async def _item_photos(self, active: Active, image: Path, more_images: Sequence[Path]) -> np.ndarray:
        """The vectors (index space) of `image` and any `more_images` of the same item (other sides, a label)."""
        names = ["image", *(f"more_images[{i}]" for i in range(len(more_images)))]
        return await self._vectors(active, [image, *more_images], names)

    async def _vectors(self, active: Active, images: list[Path], names: list[str] | None = None) -> np.ndarray:
        """The photos' vectors in the index's space (projected, L2-normalised)."""
        return active.index.project(await self._embed(active, images, names))

    @bentoml.api
    async def search(self, image: Path, k: K = 10, category: Category = None, min_price: Price = None,
                     max_price: Price = None, sold_after: Optional[dt.date] = None,
                     sold_before: Optional[dt.date] = None, more_images: MoreImages = ()) -> SearchResponse:
        """The k most similar sold items (distinct items, best first) to the item in the uploaded photo(s)."""
        start = time.perf_counter()
        active = self.replica.require()
        f = active.filters(category=category, min_price=min_price, max_price=max_price, sold_after=sold_after,
                           sold_before=sold_before)
        query = item_query(await self._item_photos(active, image, more_images))
        matches = await asyncio.to_thread(active.index.nearest, query, k, f)
        return SearchResponse(results=matches, served=active.served, took_ms=_ms(start))

    @bentoml.api
    async def estimate(self, image: Path, category: Category = None, sold_after: Optional[dt.date] = None,
                       sold_before: Optional[dt.date] = None, more_images: MoreImages = ()) -> EstimateResponse:
        """Expected price from the most similar sold items, with a range and a confidence."""
        start = time.perf_counter()
        active = self.replica.require()
        f = active.filters(category=category, sold_after=sold_after, sold_before=sold_before)
        query = item_query(await self._item_photos(active, image, more_images))
        estimate = await asyncio.to_thread(estimate_for, active.index, query, f, active.floors())
        return EstimateResponse(**estimate.model_dump(), served=active.served, took_ms=_ms(start))

    @bentoml.api
    async def search_batch(self, images: BatchImages, k: K = 10, category: Category = None) -> BatchSearchResponse:
        """Several photos in one request (1 to IMAGESEARCH_MAX_BATCH_IMAGES): one result list per photo."""
        start = time.perf_counter()
        active = self.replica.require()
        f = active.filters(category=category)
        descriptors = await self._embed(active, images)
        results = await asyncio.gather(*(asyncio.to_thread(active.index.search, d, k, f) for d in descriptors))
        return BatchSearchResponse(results=list(results), served=active.served, took_ms=_ms(start))

    @bentoml.api
    async def assist(self, image: Path, k: K = 10, category: Category = None, min_price: Price = None,
                     max_price: Price = None, sold_after: Optional[dt.date] = None,
                     sold_before: Optional[dt.date] = None, more_images: MoreImages = ()) -> AssistResponse:
        """For a new item's photo: the category its neighbours vote for, catalogue items so close they may be
        duplicates, the expected price and the k nearest items (filters apply to those two)."""
        start = time.perf_counter()
        active = self.replica.require()
        f = active.filters(category=category, min_price=min_price, max_price=max_price, sold_after=sold_after,
                           sold_before=sold_before)
        photos = await self._item_photos(active, image, more_images)
        parts = await asyncio.to_thread(assist, active.index, photos, k, f, vote_neighbours=settings.vote_neighbours,
                                        vote_temperature=settings.vote_temperature,
                                        floors=active.floors(),
                                        duplicate_threshold=active.thresholds().duplicate)
        return AssistResponse(**parts, served=active.served, took_ms=_ms(start))

    @bentoml.api
    async def compare(self, image_a: Path, image_b: Path) -> CompareResponse:
        """How similar two photos are: cosine similarity and a verdict (same, similar, different)."""
        start = time.perf_counter()
        active = self.replica.require()
        a, b = await self._vectors(active, [image_a, image_b], ["image_a", "image_b"])
        measured = active.thresholds()
        thresholds = CompareThresholds(same=measured.same, similar=measured.similar)
        similarity = cosine(a, b)
        return CompareResponse(similarity=similarity, verdict=verdict(similarity, thresholds), thresholds=thresholds,
                               served=active.served, took_ms=_ms(start))

    async def similar(self, item_id: str, k: int = 10, **filters) -> SimilarResponse:
        """GET /similar/{item_id}: items like a catalogue item, from its stored photo vectors (no upload)."""
        start = time.perf_counter()
        active = self.replica.require()
        if not item_id:
            raise ApiError("item_id is empty: ask for GET /similar/<item_id>, with an item_id from a search's results",
                           HTTPStatus.BAD_REQUEST, "item_id")
        f = active.filters(**filters)
        vector = active.index.item_vector(item_id)
        if vector is None:
            raise ApiError(f"no item {item_id[:100]!r} in index {active.served.index}", HTTPStatus.NOT_FOUND,
                           "item_id")
        results = await asyncio.to_thread(active.index.nearest, vector, k, f, item_id)
        return SimilarResponse(item_id=item_id, results=results, served=active.served, took_ms=_ms(start))

    def index_info(self) -> IndexInfo:
        """The served index: version, stage, counts, embedder and build metadata."""
        return self.replica.require().info()

    @bentoml.api
    async def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Serve what is promoted to this stage now (after promote or rollback). Needs the admin token."""
        if not settings.admin_token:
            follows = (f"it follows promotions on its own within {settings.follow_stage_s:g} s"
                       if settings.follow_stage_s else "it serves what was promoted when it started")
            raise ApiError(f"reload is off: this server has no IMAGESEARCH_ADMIN_TOKEN ({follows}); to switch at "
                           "once, set the token where it runs and send it as 'Authorization: Bearer <token>'",
                           HTTPStatus.FORBIDDEN)
        if not carries(ctx.request.headers.get("authorization", "").encode("latin-1"), settings.admin_token):
            raise ApiError("send the admin token as 'Authorization: Bearer <IMAGESEARCH_ADMIN_TOKEN>'",
                           HTTPStatus.UNAUTHORIZED)
        return await self.replica.switch()


if settings.cors_origins:  # closed by default; the outermost of our middlewares, so errors carry CORS headers too
    ImageSearch.add_asgi_middleware(OneShapeCORS, allow_origins=settings.cors_origins,
                                    allow_methods=["GET", "POST"], allow_headers=["*"], max_age=600)
ImageSearch.add_asgi_middleware(
    RequestGuard, service=ImageSearch, max_concurrency=settings.max_concurrency,
    max_request_bytes=settings.max_request_bytes, max_file_bytes=settings.max_image_bytes,
    max_files=settings.max_batch_images, timeout_s=settings.request_timeout_s, max_uploads=settings.max_uploads,
    upload_timeout_s=settings.upload_timeout_s, max_body_bytes=settings.max_body_bytes,
    client_limit=ClientLimit(settings.client_photos_per_s, settings.client_burst_photos, settings.forwarded_hops)
    if settings.client_photos_per_s else None,
    health_problem=lambda: _instances[0].replica.problem if _instances else "starting up")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
