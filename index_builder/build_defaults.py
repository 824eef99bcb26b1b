"""The builder's defaults, in a module that imports no torch: `python -m index_builder` shows them in its help
and runs `cache` and `demo` without loading torch (~1.5 s of each start)."""

from __future__ import annotations

import os
from typing import Literal

from model_store.embedder_config import Descriptor

ProjectionKind = Literal["learned", "pca", "none"]
# Regional GeM: top-1 0.655 against GeM's 0.612 on shop photos with EfficientNet-Lite2, at the same cost, and
# level on COIL-100 (docs/EVALUATION.md).
DEFAULT_DESCRIPTOR: Descriptor = "rmac"
# Learned projections beat PCA on unseen items of a shop-photo catalogue but lost to it against clean catalogue
# photos (docs/EVALUATION.md): PCA stays the default, `--projection learned` checks per catalogue.
DEFAULT_PROJECTION: ProjectionKind = "pca"
# Measured (docs/PERFORMANCE.md, builder): one decoding worker per spare core.
DEFAULT_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))
# Photos per forward pass. On a CPU small batches win: Lite2 builds 1.3-1.7x faster at 4 than at 16 on the
# 2-core VM (its activations stop fitting the caches); a GPU wants large ones (docs/PERFORMANCE.md).
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 4, 64
