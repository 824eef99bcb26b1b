"""The builder's embedding stage on Ray Data (`build --engine ray`): for catalogues beyond one machine.

Fetching and decoding run as CPU tasks (`map_batches` over a function), the network in a pool of actors
(`compute=ActorPoolStrategy`, one GPU each where the cluster has GPUs); the driver writes every batch into the
same embedding cache as the in-process engine, so a killed build resumes and a rerun reuses, whichever engine
ran before. Everything after embedding is the in-process builder's. Thumbnails are written by the decoding
tasks: on a cluster, the thumbnail store must be a folder every node sees (or use image_url).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index_builder.extract import Extraction, PhotoBatches, default_batch_size, plan
from model_store.embedder import Embedder
from model_store.embedder_config import EmbedderConfig
from model_store.backbones import for_inference, get_backbone

CPU_ACTORS = 1  # embedding actors on a cluster without GPUs: one torch process uses a machine's cores well


def embedding_actors(ray: Any) -> tuple[int, int]:
    """(actors, GPUs per actor): one actor per GPU of the cluster, wherever the driver runs (a CPU head with
    GPU workers sees no CUDA itself), else CPU_ACTORS without GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return (gpus, 1) if gpus else (CPU_ACTORS, 0)


def read_and_decode(batch: dict[str, np.ndarray], *, spec: dict, thumbnails: str | None,
                    no_thumbnail: frozenset[int]) -> dict[str, np.ndarray]:
    """Ray task: {"i", "source"} -> {"i", "pixels", "error", "sha", "made", "fatal"} for one batch of photos.
    "fatal" carries an OSError of the stores (a full disk), not of a photo: Ray keeps only the text of a task's
    exception, so it travels as data and the driver raises it again."""
    from model_store.preprocess import PreprocessSpec

    ids = [int(i) for i in batch["i"]]
    sources = {i: str(s) for i, s in zip(ids, batch["source"])}  # PhotoBatches only looks sources up by index
    prep = PreprocessSpec.model_validate(spec)
    reader = PhotoBatches(sources, prep, Path(thumbnails) if thumbnails else None, no_thumbnail)
    fatal = ""
    try:
        samples = reader[ids]
    except OSError as exc:  # every row of the batch becomes an error; the driver stops the build on `fatal`
        fatal = json.dumps([exc.errno, exc.strerror or str(exc), str(exc.filename or "")])
        samples = [(i, np.zeros((3, prep.crop, prep.crop), np.uint8), "fatal", "", False) for i in ids]
    return {"i": np.array(ids), "pixels": np.stack([s[1] for s in samples]), "error": np.array([s[2] for s in samples]),
            "sha": np.array([s[3] for s in samples]), "made": np.array([s[4] for s in samples]),
            "fatal": np.array([fatal] * len(ids))}


class EmbedActor:
    """Ray actor: the embedder, built once from its config and weights, embedding decoded batches."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], device: str, half: bool):
        cfg = EmbedderConfig.model_validate(config)
        net = for_inference(get_backbone(cfg.backbone).build())  # the driver's embedder sends its folded weights
        net.load_state_dict(weights)
        self.embedder = Embedder(cfg, net, device, half)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.array([not e for e in batch["error"]])
        vectors = np.zeros((len(good), self.embedder.config.dim), np.float32)
        if good.any():
            vectors[good] = self.embedder.embed(batch["pixels"][good])
        return {"i": batch["i"], "vector": vectors, "error": batch["error"], "sha": batch["sha"], "made": batch["made"],
                "fatal": batch["fatal"]}


def extract_ray(sources: list[str], embedder: Embedder, cache: Any, *, batch_size: int | None, progress: bool,
                thumbnails: Path | None, no_thumbnail: frozenset[int], address: str | None,
                device: str = "auto", half: bool = True) -> Extraction:
    """The Ray Data twin of extract.extract: same inputs, same Extraction."""
    import ray

    start = time.perf_counter()
    p = plan(sources, embedder.config.dim, cache, thumbnails, no_thumbnail)
    errors: dict[int, str] = {}
    made = computed = 0
    if p.pending:
        started = not ray.is_initialized()
        if started:
            _join(ray, address)
        try:
            computed, made = _run(ray, sources, p, embedder, cache, errors, batch_size=batch_size, progress=progress,
                                  thumbnails=thumbnails, no_thumbnail=no_thumbnail, device=device, half=half)
        finally:
            if started:  # a local Ray we started must not outlive the build (its workers hold cores and memory)
                _wait_for_iteration_threads()
                ray.shutdown()
    return Extraction(p.vectors, errors, p.keys, computed, made, time.perf_counter() - start)


def _join(ray: Any, address: str | None) -> None:
    """ray.init: join the cluster at `address` (None: start a local Ray), our packages travelling to the
    workers so that any cluster can run them. A cluster that cannot be joined is a BuildError saying why."""
    import index_builder
    import model_store

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"py_modules": [index_builder, model_store]})
    except ConnectionError as exc:
        from index_builder.build import BuildError  # not at the top: the workers have no query package

        raise BuildError(cannot_join(address, exc)) from exc


def cannot_join(address: str | None, exc: BaseException) -> str:
    """What to do about a cluster that refused a driver: Ray 2.60 clusters want a token once their head has
    one (~/.ray/auth_token), and a driver given an address sends it only when RAY_AUTH_MODE=token."""
    chain = []
    while exc is not None and len(chain) < 5:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    where = address or "this machine"
    if any("InvalidAuthToken" in text for text in chain):
        return (f"the Ray cluster at {where} wants an authentication token: set RAY_AUTH_MODE=token and give this "
                "machine the cluster's token (~/.ray/auth_token as on its head node, or RAY_AUTH_TOKEN)")
    return f"cannot join the Ray cluster at {where}: {chain[0]}"


def _wait_for_iteration_threads(timeout_s: float = 30.0) -> None:
    """Let Ray Data's driver threads of an ended iteration finish before Ray shuts down. A closed iteration
    only signals them: one still fetching a block when ray.shutdown() runs makes Ray's core worker end the
    whole process with status 1, before the build can say why it failed (seen in about 1 of 10 full-disk
    builds). Ray Data does not expose them, so they are found by the names it gives them."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name == "iter_threaded" or thread.name.startswith(("StreamingExecutor", "ray-data-metadata")):
            thread.join(max(0.0, deadline - time.monotonic()))


def _run(ray: Any, sources: list[str], p: Any, embedder: Embedder, cache: Any, errors: dict[int, str], *,
         batch_size: int | None, progress: bool, thumbnails: Path | None, no_thumbnail: frozenset[int], device: str,
         half: bool) -> tuple[int, int]:
    """The Ray Data pipeline over the pending photos; fills p and errors, returns (embedded, thumbnails made)."""
    made = computed = 0
    ray.data.DataContext.get_current().enable_progress_bars = progress
    actors, gpus = embedding_actors(ray)
    batch_size = batch_size or default_batch_size(gpus > 0)
    ds = ray.data.from_items([{"i": i, "source": sources[i]} for i in p.pending])
    ds = ds.map_batches(read_and_decode, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs={"spec": embedder.config.preprocess.model_dump(),
                                   "thumbnails": str(thumbnails) if thumbnails else None,
                                   "no_thumbnail": no_thumbnail})
    ds = ds.map_batches(EmbedActor, batch_size=batch_size, batch_format="numpy", num_gpus=gpus,
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs={"config": embedder.config.model_dump(mode="json"),
                                               "weights": {k: v.cpu() for k, v in embedder.net.state_dict().items()},
                                               "device": device, "half": half})
    # Closed before the caller shuts Ray down: an iteration left by an exception (a full disk) would otherwise
    # stop Ray Data's executor and threads only when the generator is garbage-collected, after ray.shutdown().
    batches = iter(ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    with contextlib.closing(batches):
        for batch in batches:
            fatal = next((str(f) for f in batch["fatal"] if f), None)
            if fatal:
                raise OSError(*json.loads(fatal))
            rows = [(int(i), str(e), str(s), v) for i, e, s, v in zip(batch["i"], batch["error"], batch["sha"],
                                                                        batch["vector"])]
            cache.put([(p.cheap[i], s, v) for i, e, s, v in rows if not e])
            for i, e, s, v in rows:
                p.keys[i] = s
                if e:
                    errors[i] = e
                else:
                    p.vectors[i] = v
            computed += sum(1 for _, e, _, _ in rows if not e)
            made += int(np.sum(batch["made"]))
    return computed, made
