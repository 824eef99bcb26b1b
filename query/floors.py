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

from dataclasses import dataclass


@dataclass(frozen=True)
class Floors:
    price: float  # comparables must be at least this similar
    vote: float  # neighbours must be at least this similar to vote on the category
    space: str  # what they were measured in, for the answers' reasons and /index


PCA = Floors(0.6, 0.55, "PCA (measured at 256-d)")
RAW = Floors(0.7, 0.65, "raw descriptors, a catalogue of under 512 photos (measured)")
WHITENED = Floors(0.275, 0.25, "whitened PCA (measured at 256-d)")
UNMEASURED = Floors(PCA.price, PCA.vote, "a learned projection (PCA's floors, not measured)")


def floors_for(projection: str, vote_override: float | None = None) -> Floors:
    """The floors for an index whose manifest names `projection`; `vote_override` (a setting) replaces the vote's."""
    floors = {"pca": PCA, "none": RAW, "pca-whiten": WHITENED}.get(projection, UNMEASURED)
    if vote_override is not None:
        floors = Floors(floors.price, vote_override, floors.space + f"; vote floor set to {vote_override}")
    return floors
