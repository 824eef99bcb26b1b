"""What decides which vector a photo gets, as plain data: read by every manifest without loading torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from model_store.preprocess import PreprocessSpec

Descriptor = Literal["gem", "rmac", "pool5"]


class WeightsInfo(BaseModel):
    """Where a network's weights came from. pretrained=False means random: answers must say so."""

    source: str
    pretrained: bool
    sha256: str


class EmbedderConfig(BaseModel):
    """Everything that decides which vector a photo gets."""

    backbone: str
    descriptor: Descriptor
    gem_p: float = 3.0
    dim: int
    preprocess: PreprocessSpec
    weights: WeightsInfo
