"""Every tunable of the engine, in one typed object read from IMAGESEARCH_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

Stage = Literal["staging", "production"]
STAGES: tuple[Stage, ...] = ("staging", "production")

# Model-store names of the two kinds of artifact this project registers.
EMBEDDER_MODEL = "image-embedder"
INDEX_MODEL = "image-index"


class Settings(BaseSettings):
    """Defaults are the tuned values; docs/PERFORMANCE.md says where each comes from."""

    model_config = SettingsConfigDict(env_prefix="IMAGESEARCH_", extra="ignore")

    # --- serving -----------------------------------------------------------------
    stage: Stage = Field("production", description="Which stage the service serves.")
    admin_token: str = Field("", description="Bearer token for POST /reload; empty disables it.")
    embedder_token: str = Field(
        "", description="A secret both services are given where the Embedder is deployed apart: it then answers only "
        "calls that carry it (query/embedder_token.py); empty: it answers any caller that reaches its port."
    )
    follow_stage_s: float = Field(
        5.0, ge=0, description="Seconds between checks of the stage record by each replica; 0 = only /reload."
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest upload accepted.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest width*height decoded.")
    min_image_bytes_per_megapixel: int = Field(
        500, ge=0, description="Fewest bytes per megapixel of an upload over 2 MP in a format decoded whole (all but "
        "JPEG, which is decoded at a fraction of its size): a 6000x4000 lossless WebP of one colour is 978 bytes and "
        "took 0.24 s to decode, as long as a photo of megabytes (docs/PERFORMANCE.md). Photos hold 25 times this or "
        "more; 0 = no floor."
    )
    max_request_bytes: int = Field(50 * 1024 * 1024, gt=0, description="Largest request body (all parts).")
    max_head_bytes: int = Field(
        32 * 1024, ge=1024, le=60 * 1024, description="Largest request URL and headers together; more get 414 or 431 "
        "as soon as that much has arrived (uvicorn reads them before anything else, without a limit of its own). At "
        "most 60 KB: httptools cannot parse a URL over 64 KB."
    )
    head_timeout_s: float = Field(
        10.0, gt=0, description="Longest a request's URL and headers may take to arrive (from the connection's start, "
        "or a later request's first byte); slower get 408, and a connection that sends nothing is closed."
    )
    max_k: int = Field(100, gt=0, description="Largest k a search may ask for.")
    max_batch_images: int = Field(16, gt=0, description="Most photos in one /search_batch call, and in more_images.")
    device: str = Field("auto", description="torch device for the embedder: auto, cpu, cuda, cuda:N.")
    half_precision: bool = Field(True, description="Use fp16 on a CUDA device.")
    torch_compile: bool = Field(False, description="torch.compile the embedder network at startup.")
    cuda_graphs: bool = Field(
        True, description="On a GPU, record each batch size the embedder warms up as a CUDA graph and replay it: "
        "one launch per pass instead of one per kernel (docs/PERFORMANCE.md, section 7). Off with torch_compile."
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")
    keep_freed_memory: bool = Field(
        True, description="On a CPU, a process running the network keeps the memory a pass frees for the next one "
        "(model_store/malloc.py): without it, page faults took 29-35% of a pass (docs/PERFORMANCE.md)."
    )
    embed_batching: bool = Field(True, description="Adaptive batching of embed calls (off: one call per request).")
    embed_max_batch_size: int = Field(
        0, ge=0, description="Adaptive batching: most photos per batch; 0 = 4 on a CPU, 8 on a GPU (measured)."
    )
    embed_max_latency_ms: int = Field(
        3000, ge=1, description="Adaptive batching: BentoML refuses (429) a photo it expects to wait longer. Only a "
        "backstop: its estimate counts the whole queue as one batch and drops the oldest photo; at 1000-1500 it "
        "refused 3-30% of searches at 16 clients whose real wait was ~0.5 s. The entry's max_concurrency bounds "
        "the queue instead (docs/PERFORMANCE.md)."
    )
    embed_deadline_s: float = Field(
        1.2, gt=0, description="Deadline of one call to the embedder; a call past it is sent once more, then 503. "
        "Longer where the embedder's measured pass needs it (query/embed_pace.py)."
    )
    worker_check_s: float = Field(
        1.0, gt=0, description="How often `bentoml serve` (circus) looks for dead workers to start again; "
        "BentoML's own is 10 s."
    )
    embedder_lost_s: float = Field(
        120.0, ge=0, description="/livez fails once the embedder this server runs has answered no call for this "
        "long and does not answer its own either, so that the orchestrator restarts a server whose dead embedder "
        "workers, started again, do not come back (never for an embedder deployed apart); 0 = never."
    )
    embedder_drain_s: float = Field(
        3.0, ge=0, description="After SIGTERM the embedder answers this long before it stops, so searches the "
                               "entry received still finish (two embed deadlines and some)."
    )
    embed_retry_share: float = Field(
        0.1, ge=0, le=1, description="Retries of late or dropped embed calls may add at most this share to the "
        "calls sent (plus a reserve of 10): an embedder that is only behind is not sent its load twice."
    )
    request_timeout_s: float = Field(10.0, gt=0, description="Longest an API request may run before a 503.")
    max_concurrency: int = Field(32, ge=1, description="Requests the entry service takes at once; more get 429. "
                                 "A request counts once its body has arrived.")
    max_photos_in_flight: int = Field(
        32, ge=1, description="Most photos an entry process has at the embedder at once (fewer where the embedder's "
        "measured pass is slow: query/embed_pace.py); an embed call waits its turn beyond it (a /search_batch call "
        "weighs as many photos as it sends), so the embedder's queue stays within the embed deadline."
    )
    max_uploads: int = Field(64, ge=1, description="Request bodies the entry receives at once (each up to "
                             "max_request_bytes); more get 429.")
    upload_timeout_s: float = Field(30.0, gt=0, description="Longest a request's body may take to arrive; "
                                    "slower gets 408.")
    max_body_bytes: int = Field(
        512 * 2**20, gt=0, description="Bytes of request bodies an entry process holds at once (each is kept, and "
        "copied, until its answer leaves); a request that would pass it gets 429 before its body is read. Never "
        "below max_request_bytes: one body of that size always fits."
    )
    client_photos_per_s: float = Field(
        0, ge=0, le=10_000, description="Photos a second each client may send, sustained; past its burst a client "
        "gets 429 with Retry-After while others are served (query/client_limit.py). 0 = no per-client limit. Per "
        "entry process: N processes or replicas let a client have up to N times as many."
    )
    client_burst_photos: int = Field(
        32, ge=1, le=10_000, description="Photos a client may send at once above its rate (two full /search_batch "
        "calls by default)."
    )
    forwarded_hops: int = Field(
        0, ge=0, le=10, description="Proxies in front of the entry that append the address they saw to "
        "X-Forwarded-For (an ingress or load balancer: 1). The client is the address that many entries from the "
        "right; 0 = the connection's peer, and the header is ignored (any client can write it)."
    )
    search_workers: int = Field(
        1, ge=1, le=64, description="Entry service processes. More than one only where spare cores exist (a GPU "
        "box): each answers /reload for itself, the others follow the stage record within follow_stage_s."
    )
    entry_threads: int = Field(
        0, ge=0, le=64, description="Threads each entry process decodes photos and searches the index on; 0 = one "
        "per core it may use, at most 4. Python's default (cores + 4, up to 32) lets 20 threads contend for one "
        "process's interpreter lock on a 16-core box (docs/PERFORMANCE.md, section 7)."
    )
    search_concurrency: int = Field(
        16, ge=1, description="Requests in flight one entry replica handles well: the autoscaling target."
    )
    embedder_workers: int = Field(
        0, ge=0, le=64, description="Embedder processes; 0 = one on a GPU, one per core (at most 4) on a CPU, "
        "sharing the cores: a lone request uses them all, concurrent batches one each."
    )
    embedder_concurrency: int = Field(16, ge=1, description="Embed calls in flight one embedder replica handles well.")
    embedder_access_log: bool = Field(
        False, description="An access log line for each embed call the entry makes (an internal hop: the entry logs "
        "every request). Off, the Embedder's event loop does ~10% less per call (docs/PERFORMANCE.md, section 6)."
    )
    embedder_tracing: bool = Field(
        False, description="OpenTelemetry spans for the Embedder's calls. BentoML records one per call even with no "
        "exporter configured, ~a quarter of the Embedder's event loop per call: on where BentoML's tracing is set up."
    )
    cors_origins: list[str] = Field(
        [], description='Origins allowed to call the API from a browser (JSON list, e.g. ["https://shop.example"]); '
                        "empty: no cross-origin access."
    )
    # --- answers ---------------------------------------------------------------
    # Each index carries thresholds measured on its own catalogue (index_builder/calibrate.py); these are used
    # only for an index without them (one item, or built before they existed). Values: the default embedder
    # with PCA-256 on the grocery train photos (docs/EVALUATION.md).
    duplicate_similarity: float = Field(
        0.857, ge=-1, le=1, description="Fallback: /assist flags a catalogue photo at least this similar."
    )
    same_similarity: float = Field(0.273, ge=-1, le=1, description="Fallback: /compare says 'same' from here.")
    similar_similarity: float = Field(0.169, ge=-1, le=1, description="Fallback: /compare says 'similar' from here.")
    vote_neighbours: int = Field(10, ge=1, le=100, description="/assist: nearest items that vote on the category.")
    vote_temperature: float = Field(
        0.05, gt=0, description="/assist: a neighbour's vote is exp(-(best similarity - its similarity) / this)."
    )
    # Measured per vector space (query/floors.py): 0.55 in the builder's PCA-256, where on shop photos it removes
    # about three wrong suggestions (mostly for kinds the catalogue never sold) for each right one it loses;
    # 0.65 in the raw descriptors of a catalogue under 512 photos, 0.25 in whitened PCA (bench.category_floor,
    # bench.space_floors).
    vote_min_similarity: float | None = Field(
        None, ge=-1, le=1, description="/assist: only nearest items at least this similar vote; none: no category. "
        "Unset: the floor measured for the index's vector space (0.55 with PCA, 0.65 without, 0.25 whitened)."
    )
    # --- building ----------------------------------------------------------------
    backbone: str = Field(
        "efficientnet-lite2", description="Default backbone of new embedders (chosen on shop photos: docs/EVALUATION.md)."
    )
    max_bad_row_share: float = Field(
        0.2, ge=0, le=1, description="A build fails when more than this share of rows is unusable."
    )
    target_recall: float = Field(0.95, gt=0, le=1, description="ANN recall@10 the builder tunes for.")
    # --- promotion ---------------------------------------------------------------
    min_promote_recall: float = Field(
        0.9, ge=0, le=1, description="Promotion refuses an index whose measured recall@10 is lower."
    )
    max_promote_item_loss: float = Field(
        0.05, ge=0, le=1, description="Promotion refuses a version lacking more than this share of the served items."
    )
    stages_dir: Path | None = Field(
        None, description="Where stage records live; default $BENTOML_HOME/stages."
    )


    def entry_thread_count(self, cores: int) -> int:
        """Threads for the entry's work off the event loop: the setting, else one per core (at most 4)."""
        return self.entry_threads or max(1, min(cores, 4))

    @property
    def entry_backstop_s(self) -> float:
        """BentoML's own timeout for an entry request, past every limit the guard answers first (the upload's,
        then the request's): BentoML's answers a bare 504 (query.bentoml_fixes.own_answers_in_one_shape). At a
        fixed 30 s it fired with the upload timeout, so a body shorter than its Content-Length got that 504
        instead of the guard's 408."""
        return self.upload_timeout_s + self.request_timeout_s + 5

    def embed_batch_limit(self, gpu: bool) -> int:
        """Most photos in one embedder batch: the setting, else 4 on a CPU (Lite2 runs fastest per photo at 2-4
        there; 8 was 20-30% slower) and 8 on a GPU."""
        return self.embed_max_batch_size or (8 if gpu else 4)


class SettingsError(ValueError):
    """IMAGESEARCH_* variables that do not hold valid values, named as they are set."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:  # pydantic names the fields (max_k), not the variables that were set
        wrong = [f"{Settings.model_config['env_prefix']}{'.'.join(map(str, e['loc'])).upper()}={e['input']!r}: "
                 f"{e['msg']}" for e in exc.errors()]
        raise SettingsError("; ".join(wrong) + " (README, Configuration)") from None
