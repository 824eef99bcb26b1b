"""Embedders: a backbone plus a descriptor, saved in and loaded from the model store."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from model_store import pooling
from model_store.backbones import for_inference, get_backbone, resolve_weights
from model_store.embedder_config import Descriptor, EmbedderConfig
from model_store.malloc import keep_freed_memory
from model_store.registry import get_model, list_models, register
from model_store.settings import EMBEDDER_MODEL, get_settings

log = logging.getLogger(__name__)
CONFIG_FILE = "embedder.json"
WEIGHTS_FILE = "weights.pt"


def descriptor_dim(backbone: str, descriptor: Descriptor, crop: int) -> int:
    """gem, rmac: one number per channel; pool5: the whole flattened last feature map (stride 32)."""
    channels = get_backbone(backbone).channels
    return channels * (crop // 32) ** 2 if descriptor == "pool5" else channels


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Embedder:
    """(N, 3, crop, crop) uint8 pixels (preprocess.image_to_pixels) -> (N, dim) float32 L2-normalised vectors.

    On a CUDA device each batch shape that `warm_up` runs is recorded as a CUDA graph and replayed from then on:
    one launch for the whole pass instead of one per kernel, whose launches otherwise take most of a small
    batch's time (docs/PERFORMANCE.md, section 7). Other shapes run as they come. `cuda_graphs` None follows
    the settings (IMAGESEARCH_CUDA_GRAPHS)."""

    def __init__(self, config: EmbedderConfig, net: torch.nn.Module, device: str = "auto", half: bool = True,
                 cuda_graphs: bool | None = None):
        self.config = config
        self.device = pick_device(device)
        self.half = half and self.device.type == "cuda"
        settings = get_settings()
        self.cuda_graphs = self.device.type == "cuda" and (settings.cuda_graphs if cuda_graphs is None else cuda_graphs)
        self.graphs: dict[tuple[int, ...], CudaGraphPass] = {}
        if self.device.type == "cpu" and settings.keep_freed_memory:
            keep_freed_memory()  # process-wide: its activations are what a CPU process allocates most
        net = for_inference(net.eval()).to(self.device, memory_format=torch.channels_last)
        self.net = (net.half() if self.half else net).eval()
        # (x / 255 - mean) / std as one multiply and one subtract per pixel, on the device
        std, mean = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (config.preprocess.std,
                                                                                      config.preprocess.mean))
        self._scale, self._shift = (1.0 / (255.0 * std)).to(self.device), (mean / std).to(self.device)

    @torch.inference_mode()
    def embed(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != np.uint8:
            raise TypeError(f"embed takes uint8 pixels (N, 3, H, W); got {batch.dtype}")
        graph = self.graphs.get(batch.shape)
        if graph is not None:
            return graph.run(batch)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        return self._forward(x).cpu().numpy()

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels on the device -> float32 descriptors on the device."""
        x = (pixels.float() * self._scale - self._shift).contiguous(memory_format=torch.channels_last)
        fmap = self.net(x.half() if self.half else x).float()
        if self.config.descriptor == "gem":
            return pooling.gem(fmap, self.config.gem_p)
        if self.config.descriptor == "rmac":
            return pooling.rmac(fmap, self.config.gem_p)
        return torch.nn.functional.normalize(fmap.flatten(1), dim=1)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Run each batch size once on blank pixels (and record it as a CUDA graph, see the class); seconds
        taken. The first pass on a GPU loads CUDA's kernels and takes seconds: a service does it before it is
        ready, not inside a client's deadline."""
        start, crop = time.perf_counter(), self.config.preprocess.crop
        for n in batch_sizes:
            blank = np.zeros((n, 3, crop, crop), dtype=np.uint8)
            self.embed(blank)
            if self.cuda_graphs and blank.shape not in self.graphs:
                self._record(blank.shape)
        return time.perf_counter() - start

    def time_pass(self, n: int, threads: int | None = None, passes: int = 2) -> float:
        """Seconds a pass of `n` photos takes (the mean of `passes`, after warm_up ran that size), on a CPU with
        `threads` torch threads (then as many as before)."""
        crop, before = self.config.preprocess.crop, torch.get_num_threads()
        blank = np.zeros((n, 3, crop, crop), dtype=np.uint8)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        try:
            start = time.perf_counter()
            for _ in range(passes):
                self.embed(blank)
            return (time.perf_counter() - start) / passes
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    @torch.inference_mode()
    def _record(self, shape: tuple[int, ...]) -> None:
        try:
            self.graphs[shape] = CudaGraphPass(self._forward, shape, self.device)
        except RuntimeError as exc:  # a pass CUDA cannot record still runs as it is
            log.warning("batch shape %s not recorded as a CUDA graph (%s): it runs kernel by kernel", shape, exc)


class CudaGraphPass:
    """One batch shape's pass recorded once as a CUDA graph, then replayed on new pixels copied into the same
    device memory. Not thread-safe: replays share their input and output memory (one torch thread calls it)."""

    def __init__(self, forward, shape: tuple[int, ...], device: torch.device):
        self.pixels = torch.zeros(shape, dtype=torch.uint8, device=device)
        side = torch.cuda.Stream(device)  # CUDA records what a stream of its own runs, warmed up there first
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            forward(self.pixels)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = forward(self.pixels)

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.pixels.copy_(torch.from_numpy(np.ascontiguousarray(batch)))
        self.graph.replay()
        return self.out.cpu().numpy()  # a copy: the next replay overwrites self.out


def new_embedder(backbone: str, weights: str = "default", descriptor: Descriptor = "gem",
                 image_size: int | None = None) -> tuple[EmbedderConfig, torch.nn.Module]:
    """Build a network and its config; image_size None is the backbone's own (smaller only for fast tests)."""
    net, info = resolve_weights(backbone, weights)
    image_size = image_size or get_backbone(backbone).preprocess.crop
    prep = get_backbone(backbone).preprocess.model_copy(update={"resize": image_size, "crop": image_size})
    config = EmbedderConfig(backbone=backbone, descriptor=descriptor, dim=descriptor_dim(backbone, descriptor, image_size),
                            preprocess=prep, weights=info)
    return config, net


def save_embedder(config: EmbedderConfig, net: torch.nn.Module) -> str:
    """Register an embedder, or return the stored one with the same config (same weights checksum)."""
    for model in list_models(EMBEDDER_MODEL):
        if model.info.metadata.get("config") == config.model_dump(mode="json"):
            return str(model.tag)

    def write(folder: Path) -> None:
        torch.save(net.state_dict(), folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(config.model_dump_json(indent=2))

    labels = {"backbone": config.backbone, "descriptor": config.descriptor, "dim": str(config.dim),
              "weights": "pretrained" if config.weights.pretrained else "random"}
    return register(EMBEDDER_MODEL, labels, {"config": config.model_dump(mode="json")}, write)


def load_embedder(tag: str, device: str = "auto", half: bool = True) -> Embedder:
    """The stored embedder `tag`, on `device`; weights are loaded with weights_only=True."""
    return embedder_from_folder(Path(get_model(tag).path), device, half)


def embedder_from_folder(folder: Path, device: str = "auto", half: bool = True) -> Embedder:
    config = EmbedderConfig.model_validate(json.loads((folder / CONFIG_FILE).read_text()))
    net = get_backbone(config.backbone).build()
    net.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return Embedder(config, net, device, half)
