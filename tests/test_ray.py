"""`build --engine ray`: Ray Data on a real local Ray, against the in-process engine."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import run_env
from index_builder.cache import EmbeddingCache
from index_builder.extract import extract
from model_store.embedder import Embedder, new_embedder
from test_build import _new_catalogue, index_versions

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install '.[ray]'")


def test_ray_gives_the_same_vectors_as_the_in_process_engine(tmp_path, ray_cluster):
    from index_builder.ray_engine import extract_ray

    catalogue = _new_catalogue(tmp_path / "cat", 20, seed=9000)
    sources = sorted(str(p) for p in catalogue.parent.glob("*.png")) + [str(tmp_path / "cat" / "missing.png")]
    config, net = new_embedder("efficientnet-lite0", "default", "rmac")
    embedder = Embedder(config, net, "cpu", False)
    local = extract(sources, embedder, EmbeddingCache("t", config.dim, tmp_path / "local-cache"), batch_size=8,
                    workers=0, progress=False)
    remote = extract_ray(sources, embedder, EmbeddingCache("t", config.dim, tmp_path / "ray-cache"), batch_size=8,
                         progress=False, thumbnails=None, no_thumbnail=frozenset(), address=None,
                         device="cpu", half=False)
    assert remote.computed == local.computed == 20
    assert remote.keys == local.keys and set(remote.errors) == set(local.errors) == {20}
    assert "not found" in remote.errors[20] or "No such file" in remote.errors[20]
    np.testing.assert_allclose(remote.vectors, local.vectors, atol=1e-5)


def test_a_cluster_with_gpus_gets_one_gpu_actor_per_gpu(tmp_path):
    """The driver may see no CUDA (a CPU head node): the cluster's GPUs decide. A real local Ray that declares
    two GPUs schedules the actors on them; the network itself runs on this machine's CPU."""
    from index_builder.ray_engine import embedding_actors, extract_ray

    catalogue = _new_catalogue(tmp_path / "cat", 6, seed=9100)
    sources = sorted(str(p) for p in catalogue.parent.glob("*.png"))
    config, net = new_embedder("efficientnet-lite0", "default", "gem", 64)
    embedder = Embedder(config, net, "cpu", False)
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)  # CPUs: 2 actors + decoding
    try:
        assert embedding_actors(ray) == (2, 1)
        out = extract_ray(sources, embedder, EmbeddingCache("g", config.dim, tmp_path / "cache"), batch_size=2,
                          progress=False, thumbnails=None, no_thumbnail=frozenset(), address=None, device="auto",
                          half=True)
    finally:
        ray.shutdown()
    assert out.computed == 6 and not out.errors
    np.testing.assert_allclose(out.vectors, embedder.embed(np.stack([_pixels(s, config) for s in sources])),
                               atol=1e-5)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert embedding_actors(ray) == (1, 0)
    finally:
        ray.shutdown()


def _pixels(path: str, config) -> np.ndarray:
    from model_store.preprocess import image_to_pixels, load_image_file

    return image_to_pixels(load_image_file(Path(path)), config.preprocess)


def test_a_store_failure_inside_a_task_fails_the_build_as_the_same_os_error(tmp_path):
    """Ray keeps only the text of a task's exception; a full disk or a broken thumbnail store must still reach
    the builder as an OSError naming the file, as it does in process."""
    from index_builder.ray_engine import extract_ray

    catalogue = _new_catalogue(tmp_path / "cat", 4, seed=9200)
    sources = sorted(str(p) for p in catalogue.parent.glob("*.png"))
    config, net = new_embedder("efficientnet-lite0", "default", "gem", 64)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("the thumbnail store cannot live here")
    with pytest.raises(OSError) as failure:
        extract_ray(sources, Embedder(config, net, "cpu", False), EmbeddingCache("s", config.dim, tmp_path / "c"),
                    batch_size=2, progress=False, thumbnails=blocker, no_thumbnail=frozenset(), address=None,
                    device="cpu", half=False)
    assert failure.value.errno is not None and "not-a-folder" in str(failure.value.filename)


def test_a_cluster_that_wants_a_token_is_named_with_what_to_set(tmp_path, python, ray_cluster):
    """A driver given an address sends Ray's token only when RAY_AUTH_MODE=token: without it, the build says
    so, as a build error (exit 2), not a traceback or a bare "failed to connect"."""
    catalogue = _new_catalogue(tmp_path / "cat", 2, seed=9300)
    before = index_versions()
    out = subprocess.run([python, "-m", "index_builder", "build", str(catalogue), "--engine", "ray", "--ray-address",
                          ray_cluster, "--no-progress"], capture_output=True, text=True, timeout=300,
                         env=run_env(RAY_AUTH_MODE="disabled", RAY_gcs_server_port_wait_time_s="2"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"the Ray cluster at {ray_cluster} wants an authentication token: set RAY_AUTH_MODE=token" in out.stderr
    assert "Traceback" not in out.stderr
    assert index_versions() == before
