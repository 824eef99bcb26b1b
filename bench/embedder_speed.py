"""Embedder speed per backbone, descriptor, batch size and cheap speed-up, against the machine's matmul peak.

    python -m bench.embedder_speed           # writes docs/embedder_speed.json
    python -m bench.embedder_speed --quick   # tiny sizes: the smoke run the tests use
    python -m bench.embedder_speed --device cuda --out docs/embedder_speed_gpu.json   # a GPU: fp16 and fp32
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import torch
import typer

from bench.ann_scale import machine
from model_store.embedder import Embedder, new_embedder, pick_device

DOCS = Path(__file__).resolve().parents[1] / "docs"
app = typer.Typer(add_completion=False)


def matmul_peak_gflops(n: int = 2048, reps: int = 10, device: str = "cpu") -> float:
    """Best fp32 GEMM rate: the physical floor for a convolutional network on this machine."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = 0.0
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_image(net: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def time_batches(fn: Callable[[np.ndarray], np.ndarray], batch: int, size: int, reps: int) -> float:
    """Median seconds per image over reps calls of fn on a batch (one warm-up call first)."""
    x = np.random.default_rng(0).integers(0, 256, size=(batch, 3, size, size), dtype=np.uint8)
    fn(x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / batch


def interleaved(fns: list[Callable[[np.ndarray], np.ndarray]], batch: int, size: int, reps: int) -> list:
    """Median seconds per image of each fn, timed round-robin so machine noise hits all alike."""
    x = np.random.default_rng(0).integers(0, 256, size=(batch, 3, size, size), dtype=np.uint8)
    times: list[list[float] | str] = [[] for _ in fns]
    for _ in range(reps + 1):  # the first round warms up (and compiles)
        for i, fn in enumerate(fns):
            if isinstance(times[i], str):
                continue
            try:
                start = time.perf_counter()
                fn(x)
                times[i].append(time.perf_counter() - start)
            except Exception as exc:
                times[i] = str(exc)[:200]
    return [t if isinstance(t, str) else float(np.median(t[1:])) / batch for t in times]


@app.command()
def main(quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         device: str = "auto",
         backbones: Annotated[str, typer.Option(help="comma-separated backbones")] = "efficientnet-lite0,vgg16",
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "embedder_speed.json") -> None:
    dev = str(pick_device(device))
    peak = matmul_peak_gflops(512 if quick else 2048, 3 if quick else 10, dev)
    cuda = dev.startswith("cuda")
    batches = [1, 4] if quick else ([1, 8, 32, 64, 128, 256] if cuda else [1, 2, 4, 8, 16, 32, 64])
    rows = []
    for backbone in backbones.split(","):
        # VGG16 speed needs no real weights (none can be had here); each network at its own input size
        weights = "random" if backbone == "vgg16" else "default"
        config, net = new_embedder(backbone, weights, "gem", 64 if quick else None)
        size = config.preprocess.crop
        gflop = flops_per_image(net, size) / 1e9
        for half in ([True, False] if cuda else [False]):
            embedder = Embedder(config, copy.deepcopy(net), dev, half=half)  # Embedder moves and casts in place
            for batch in ([1] if quick and backbone == "vgg16" else batches):
                s = time_batches(embedder.embed, batch, size, 2 if quick else (3 if backbone == "vgg16" else 5))
                rows.append({"backbone": backbone, "image_size": size, "batch": batch,
                             "variant": "default (inference_mode, channels_last, Lite's batch norms folded)" + (", fp16" if half else ""),
                             "ms_per_image": round(s * 1000, 2), "images_per_s": round(1 / s, 1),
                             "gflop_per_image": round(gflop, 2), "share_of_peak": round(gflop / s / peak, 3)})
                print(json.dumps(rows[-1]), flush=True)
    size = 64 if quick else 224
    rows += variants(size, quick, dev, peak)
    result = {"machine": machine(), "device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "matmul_peak_gflops": round(peak, 1), "image_size": size, "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if not quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


def variants(size: int, quick: bool, dev: str, peak: float) -> list[dict]:
    """Lite0 at batch 8 with one speed-up toggled at a time, and the pool5 descriptor, timed interleaved."""
    batch, reps, rows = (2 if quick else 8), (2 if quick else 15), []
    config, net = new_embedder("efficientnet-lite0", "default", "gem", size)
    gflop = flops_per_image(net, size) / 1e9

    plain_net = copy.deepcopy(net).to(dev)

    def plain(x: np.ndarray) -> np.ndarray:  # fp32, no channels_last, no_grad instead of inference_mode
        with torch.no_grad():
            return plain_net(torch.from_numpy(x).to(dev).float()).mean(dim=(2, 3)).cpu().numpy()

    pool5_config, pool5_net = new_embedder("efficientnet-lite0", "default", "pool5", size)
    published = Embedder(config, copy.deepcopy(net), dev)
    published.net = copy.deepcopy(net).to(dev, memory_format=torch.channels_last).eval()
    candidates = [("default (inference_mode, channels_last, Lite's batch norms folded)",
                   Embedder(config, copy.deepcopy(net), dev).embed),
                  ("batch norms not folded (the network as published)", published.embed),
                  ("no_grad, contiguous (no speed-ups)", plain),
                  ("pool5 descriptor", Embedder(pool5_config, pool5_net, dev).embed)]
    threads = torch.get_num_threads()
    for n in ([1] if threads > 1 and not dev.startswith("cuda") else []):
        def limited(x: np.ndarray, n: int = n, e: Embedder = Embedder(config, copy.deepcopy(net), dev)) -> np.ndarray:
            torch.set_num_threads(n)
            try:
                return e.embed(x)
            finally:
                torch.set_num_threads(threads)
        candidates.append((f"torch threads={n}", limited))
    if not quick:
        compiled = Embedder(config, copy.deepcopy(net), dev)
        compiled.net = torch.compile(compiled.net)
        candidates.append(("torch.compile", compiled.embed))
    medians = interleaved([fn for _, fn in candidates], batch, size, reps)
    for (name, _), s in zip(candidates, medians):
        if isinstance(s, str):  # torch.compile needs a C compiler; report instead of failing
            rows.append({"backbone": "efficientnet-lite0", "variant": name, "batch": batch, "error": s})
            continue
        rows.append({"backbone": "efficientnet-lite0", "variant": name, "batch": batch,
                     "ms_per_image": round(s * 1000, 2), "images_per_s": round(1 / s, 1),
                     "gflop_per_image": round(gflop, 2), "share_of_peak": round(gflop / s / peak, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    app()
