"""How each entry worker process is set up before it serves: its threads, its open files, its requests' heads."""

from __future__ import annotations

import asyncio
import logging
import resource
from concurrent.futures import ThreadPoolExecutor

from model_store.core_share import available_cores
from model_store.settings import Settings
from query.request_head import limit_request_heads

log = logging.getLogger("bentoml.imagesearch")


def set_up_entry_process(s: Settings) -> None:
    """Called by the entry's service instance, on its event loop."""
    _limit_blas_threads()
    # asyncio.to_thread's pool (decoding, index searches): a few threads, not Python's cores + 4
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
        s.entry_thread_count(available_cores()), thread_name_prefix="entry"))
    _open_files_up_to_the_hard_limit()
    # The guard only sees a request once uvicorn has read its head: limits on that part of its own
    limit_request_heads(s.max_head_bytes, s.head_timeout_s)


def _limit_blas_threads() -> None:
    """The entry process does only small matrix products; idle BLAS threads spinning after each one
    would take the cores the embedder needs (measured: docs/PERFORMANCE.md)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _open_files_up_to_the_hard_limit() -> None:
    """Each client connection is an open file, and as deployed idle ones are kept 620 s (deploy/k8s.yaml). The
    soft limit can be 1,024 in a container whose hard limit is far higher; past it the entry accepts no new
    connection. Like nginx and Go's runtime, the entry raises its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit above the kernel's nr_open
        log.warning("open files: soft limit stays %s (%s)", soft, exc)
