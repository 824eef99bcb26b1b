"""What a replica serves right now: a loaded index, the deployment it came from, and how answers label it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_store import stages
from model_store.index_artifact import Thresholds
from model_store.preprocess import upload_px
from query.floors import Floors, floors_for
from query.search_index import Filters, SearchIndex
from model_store.registry import get_model
from model_store.settings import get_settings
from query.errors import ApiError
from query.models import IndexInfo, Served


@dataclass(frozen=True)
class Active:
    """Replaced as a whole on a switch, so a request sees the old index or the new one, never a mix."""

    index: SearchIndex
    deployment: stages.Deployment
    served: Served

    def filters(self, **given) -> Filters:
        """Filters from request values; 400 naming the field for a category or range that cannot match."""
        f = Filters(**given)
        if f.category is not None and f.category.lower() not in self.index.categories:
            known = ", ".join(sorted(self.index.category_names)[:30])
            raise ApiError(f"unknown category {f.category!r}: use one of {known}", field="category")
        if f.min_price is not None and f.max_price is not None and f.min_price > f.max_price:
            raise ApiError(f"min_price {f.min_price:g} is above max_price {f.max_price:g}", field="min_price")
        if f.sold_after and f.sold_before and f.sold_after > f.sold_before:
            raise ApiError(f"sold_after {f.sold_after} is later than sold_before {f.sold_before}", field="sold_after")
        return f

    def thresholds(self) -> Thresholds:
        """Measured on this index's catalogue when it was built; else the configured fallbacks."""
        if self.index.manifest.thresholds is not None:
            return self.index.manifest.thresholds
        s = get_settings()
        return Thresholds(duplicate=s.duplicate_similarity, same=s.same_similarity, similar=s.similar_similarity,
                          measured={"source": "IMAGESEARCH_* settings: this index has no measured thresholds"})

    def floors(self) -> Floors:
        """How similar sold items must be to price a photo or vote on its category, in this index's space."""
        return floors_for(self.index.manifest.projection, get_settings().vote_min_similarity)

    def info(self) -> IndexInfo:
        m = self.index.manifest
        return IndexInfo(served=self.served, photos=m.n_photos, items=m.n_items, dim=m.dim, n_trees=m.n_trees,
                         search_k=m.search_k, ann_recall_at_10=m.ann_recall_at_10, built_at=m.built_at,
                         categories=sorted(self.index.category_names),
                         upload_px=upload_px(m.embedder_config.preprocess),
                         floors=self.floors(),
                         build=m.model_dump(mode="json", exclude={"embedder_config"}))


def load_active(deployment: stages.Deployment, path: Path | None, stage: str) -> Active:
    """Load the deployment's index (from `path`, or from the store); raises when it is missing or corrupt."""
    index = SearchIndex(path or Path(get_model(deployment.index).path), deployment.index)
    weights = index.manifest.embedder_config.weights
    served = Served(index=deployment.index, stage=stage, embedder=deployment.embedder,
                    weights=weights.source, pretrained=weights.pretrained,
                    warning=None if weights.pretrained else "embedder has RANDOM weights: results are not meaningful")
    return Active(index, deployment, served)


def stage_mtime() -> int | None:
    """When the stage record last changed (None without one)."""
    try:
        return (stages.stages_dir() / stages.STATE_FILE).stat().st_mtime_ns
    except OSError:
        return None
