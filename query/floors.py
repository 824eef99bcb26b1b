"""How similar a sold item must be to price a photo (/estimate) or vote on its category (/assist), by the
vector space of the index that answers.

A cosine means different things in different spaces. The builder's PCA-256 is centred: a catalogue photo's
best match among other products scores 0.66 on shop photos and 0.55 on COIL-100 (medians). A catalogue of under
512 photos is indexed in the embedder's raw descriptors, which are not centred and score higher: there the PCA
floors priced 88-95% of photos of never-sold shop products and named a category for nearly all of them.
Whitened PCA (--whiten) spreads cosines around 0: there the PCA floors priced 1% of photos of sold shop
products. Each space has floors measured on shop photos and COIL-100 (docs/EVALUATION.md: bench.pricing and
bench.category_floor for PCA, bench.space_floors for the others). A learned projection (opt-in) was not
measured: it gets PCA's floors, and an index of it should be measured before it is promoted.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Floors(BaseModel):
    """How similar sold items must be for /estimate to price a photo and for /assist to vote on its category
    (GET /index shows them)."""

    model_config = ConfigDict(frozen=True)
    price: float = Field(description="comparables must be at least this similar")
    vote: float = Field(description="neighbours must be at least this similar to vote on the category")
    space: str = Field(description="the index's vector space they were measured for (docs/EVALUATION.md)")


PCA = Floors(price=0.6, vote=0.55, space="PCA (measured at 256-d)")
RAW = Floors(price=0.7, vote=0.65, space="raw descriptors, a catalogue of under 512 photos (measured)")
WHITENED = Floors(price=0.275, vote=0.25, space="whitened PCA (measured at 256-d)")
UNMEASURED = Floors(price=PCA.price, vote=PCA.vote, space="a learned projection (PCA's floors, not measured)")
BY_PROJECTION = {"pca": PCA, "none": RAW, "pca-whiten": WHITENED}  # a manifest's `projection` -> its floors


def floors_for(projection: str, vote_override: float | None = None) -> Floors:
    """The floors for an index whose manifest names `projection`; `vote_override` (a setting) replaces the vote's."""
    floors = BY_PROJECTION.get(projection, UNMEASURED)
    if vote_override is not None:
        floors = floors.model_copy(update={"vote": vote_override,
                                           "space": floors.space + f"; vote floor set to {vote_override}"})
    return floors
