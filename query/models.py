"""Request and answer models of the HTTP API (they are what the OpenAPI page at / documents)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, Field

from model_store.index_artifact import MAX_PRICE
from model_store.settings import get_settings
from query.floors import Floors
from query.search_index import Match

_max_k = get_settings().max_k
K = Annotated[int, Field(ge=1, le=_max_k, description=f"distinct items to return, 1..{_max_k}")]
Price = Annotated[Optional[float], Field(ge=0, le=MAX_PRICE, allow_inf_nan=False, description="a price, 0 or more")]
Category = Annotated[Optional[str], Field(min_length=1, max_length=200, description="one of GET /index's categories")]
_max_photos = get_settings().max_batch_images
# The counts are in the OpenAPI document (minItems, maxItems); the request guard refuses other counts first.
BatchImages = Annotated[list[Path], Field(
    min_length=1, max_length=_max_photos, description=f"1 to {_max_photos} photos, each searched on its own")]
# Declared with a default of () in service.py: BentoML cannot build an input model with Optional[list[Path]].
MoreImages = Annotated[list[Path], Field(
    max_length=_max_photos,
    description=f"up to {_max_photos} more photos of the same item (other sides, a label, a maker's mark): the item "
                "is searched as one, which finds it more often than any one photo")]


class SimilarQuery(BaseModel):
    """GET /similar/{item_id}'s query parameters."""

    k: K = 10
    category: Category = None
    min_price: Price = None
    max_price: Price = None
    sold_after: Optional[dt.date] = None
    sold_before: Optional[dt.date] = None


class Served(BaseModel):
    """Which index and embedder produced an answer. pretrained=False: the answer is not meaningful."""

    index: str = Field(description="index version, e.g. image-index:abc123")
    stage: str
    embedder: str
    weights: str = Field(description="where the embedder's weights came from")
    pretrained: bool
    warning: str | None = Field(None, description="set when the embedder has random weights")


class SearchResponse(BaseModel):
    results: list[Match] = Field(description="k distinct sold items, most similar first")
    served: Served
    took_ms: float


class BatchSearchResponse(BaseModel):
    results: list[list[Match]] = Field(description="one list per uploaded photo, in upload order")
    served: Served
    took_ms: float


class Estimate(BaseModel):
    """price is null when no sold item is close enough; reason then says so."""

    price: float | None = Field(None, description="similarity-weighted median of the comparables' prices")
    low: float | None = Field(None, description="weighted 20th percentile")
    high: float | None = Field(None, description="weighted 80th percentile")
    currency: str | None = None
    confidence: float = Field(0.0, ge=0, le=1, description="falls when comparables are far, few or disagree")
    comparables: list[Match] = []
    reason: str | None = None


class EstimateResponse(Estimate):
    served: Served
    took_ms: float


class IndexInfo(BaseModel):
    served: Served
    photos: int
    items: int
    dim: int
    n_trees: int
    search_k: int
    ann_recall_at_10: float
    built_at: dt.datetime
    categories: list[str]
    upload_px: int = Field(description="the short side, in pixels, past which a photo gains nothing: clients "
                                       "save bandwidth and time by downscaling uploads to it (the page does)")
    floors: Floors
    build: dict[str, Any] = Field(description="the index manifest: build parameters, timings, evaluation")


class ReloadResponse(BaseModel):
    changed: bool
    served: Served
    previous: str | None = None


class CategoryVote(BaseModel):
    """The category the nearest sold items vote for, each weighted by its similarity."""

    suggested: str | None = Field(None, description="null when no sold item is similar enough (reason says so)")
    confidence: float = Field(0.0, ge=0, le=1, description="share of the vote the suggestion got")
    runner_up: str | None = None
    runner_up_confidence: float = Field(0.0, ge=0, le=1)
    neighbours: int = Field(0, description="how many items voted")
    reason: str | None = Field(None, description="why there is no suggestion, when there is none")


class AssistResponse(BaseModel):
    """Everything a cataloguer's tool needs for one new item, from one photo."""

    category: CategoryVote
    duplicates: list[Match] = Field(description="catalogue items with a photo at least duplicate_threshold similar to "
                                                "one of the photos sent: maybe the same item or photo listed again")
    duplicate_threshold: float
    estimate: Estimate
    nearest: list[Match] = Field(description="k distinct sold items, filters applied, most similar first")
    served: Served
    took_ms: float


class CompareThresholds(BaseModel):
    same: float = Field(description="verdict 'same' at or above this similarity")
    similar: float = Field(description="verdict 'similar' at or above this similarity, below 'same'")


class CompareResponse(BaseModel):
    similarity: float = Field(description="cosine similarity of the two photos' vectors, -1..1")
    verdict: str = Field(description="same (the same item or product), similar (alike), or different")
    thresholds: CompareThresholds
    served: Served
    took_ms: float


class SimilarResponse(BaseModel):
    item_id: str = Field(description="the catalogue item the results are like (never among them)")
    results: list[Match]
    served: Served
    took_ms: float
