"""Request and answer models of the HTTP API (they are what the OpenAPI page at / documents)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field

from model_store.index_artifact import Match


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
    build: dict[str, Any] = Field(description="the index manifest: build parameters, timings, evaluation")


class ReloadResponse(BaseModel):
    changed: bool
    served: Served
    previous: str | None = None
