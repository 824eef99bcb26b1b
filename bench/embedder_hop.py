"""The embedder hop alone: the Embedder service as `bentoml serve` runs it, driven directly, against the bare network.

    python -m bench.embedder_hop                # docs/embedder_hop.json
    python -m bench.embedder_hop --quick        # a tiny network, seconds-long loops (the tests')

bench.overhead holds the whole service (entry and embedder on the same cores) against the bare network. Here
the entry idles: closed loops of raw-socket clients (threads of this process, ~0.2 ms of CPU a call) send the
Embedder, on the Unix socket BentoML gives it, the very call the entry makes for one photo (its uint8 pixels
in BentoML's pickle encoding), and its photos/s are held against the bare network's best rate on the same
cores (bench/bare_worker.py), bare and served alternating round by round. What the hop leaves of the bare rate
bounds what the whole service can reach with an entry that costs nothing.
"""

from __future__ import annotations

import json
import resource
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from bench.ann_scale import command_line, machine
from bench.overhead import (DOCS, LEAD_S, QUICK_LEAD_S, BareEmbedders, bare_rates, cpu_ms_per_request, cpu_seconds,
                            demo_index)
from bench.server import ROOT, Server
from model_store.core_share import available_cores


def embed_call(embedder_tag: str) -> bytes:
    """The HTTP request the entry sends the Embedder for one photo, byte for byte (BentoML's own client builds it)."""
    from _bentoml_impl.client.http import SyncHTTPClient

    import service
    from model_store.embedder import load_embedder

    crop = load_embedder(embedder_tag, "cpu", False).config.preprocess.crop
    client = SyncHTTPClient("http://localhost", media_type="application/vnd.bentoml+pickle", service=service.Embedder,
                            server_ready_timeout=0)
    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, crop, crop), dtype=np.uint8)
    request = client._build_request(client.endpoints["embed"], (), {"batch": pixels}, {})
    body = request.read()
    headers = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()
                      if k.lower() not in ("host", "content-length", "connection"))
    return f"POST /embed HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


def read_answer(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """(status, bytes past the answer) of one HTTP answer with a Content-Length."""
    while b"\r\n\r\n" not in buf:
        buf += _recv(sock)
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += _recv(sock)
    return head.split()[1], rest[length:]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the embedder closed the connection")
    return data


def closed_loop(path: str, call: bytes, clients: int, seconds: float) -> dict:
    """Photos/s, failures, p50 and the CPU seconds this process (the clients) took, for `clients` connections sending
    `call` back to back (the keys of bench.wrk.closed_loop, so overhead.cpu_ms_per_request reads it)."""
    stop, answered, failed, ms = time.perf_counter() + seconds, [0] * clients, [0] * clients, []

    def client(i: int) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            buf = b""
            while time.perf_counter() < stop:
                start = time.perf_counter()
                sock.sendall(call)
                status, buf = read_answer(sock, buf)
                if status == b"200":
                    answered[i] += 1
                    ms.append((time.perf_counter() - start) * 1000)
                else:
                    failed[i] += 1

    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, after, n = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF), sum(answered)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"clients": clients, "answered": n, "failed": sum(failed), "photos_per_s": round(n / elapsed, 1),
            "p50_ms": round(statistics.median(ms), 1) if ms else 0.0, "load_generator_cpu_s": cpu}


def saturate(srv: Server, path: str, call: bytes, levels: tuple[int, ...], seconds: float) -> list[dict]:
    """A closed loop at each level, with the CPU per photo of each server role (the entry idles) and the clients."""
    loads = []
    for clients in levels:
        before = cpu_seconds(srv)
        r = closed_loop(path, call, clients, seconds)
        r["cpu_ms_per_request"] = cpu_ms_per_request(before, cpu_seconds(srv), r)
        loads.append(r)
    return loads


def embedder_socket(srv: Server) -> str:
    """The Unix socket the entry reaches the Embedder on (BentoML passes it to the entry in BENTOML_RUNNER_MAP)."""
    runner_map = json.loads(srv.processes()["entry"][0].environ()["BENTOML_RUNNER_MAP"])
    return runner_map["Embedder"].removeprefix("file://")


def promoted_demo_index(prefix: str, quick: bool) -> tuple[Path, str, bytes]:
    """The demo index in production in a temporary store: (its folder, its embedder's tag, the entry's call)."""
    from model_store import stages
    from model_store.registry import get_model

    tmp, _, tag = demo_index(prefix, quick)
    stages.promote(tag, "production", force=True)
    embedder = get_model(tag).info.metadata["embedder"]
    return tmp, embedder, embed_call(embedder)


def main(rounds: Annotated[int, typer.Option(help="alternating bare/served rounds")] = 3,
         clients: Annotated[list[int], typer.Option(help="closed loops' client counts")] = [1, 4, 8, 16],  # noqa: B006
         seconds: Annotated[float, typer.Option(help="seconds per closed loop")] = 15,
         bare_seconds: Annotated[float, typer.Option(help="seconds per bare rate (layout and batch)")] = 6,
         quick: Annotated[bool, typer.Option(help="a tiny network, one short round, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "embedder_hop.json") -> None:
    tmp, embedder, call = promoted_demo_index("bench-hop-", quick)
    cores = 1 if quick else available_cores()
    rounds, levels = (1, (2,)) if quick else (rounds, tuple(clients))
    seconds, bare_seconds = (2, 1) if quick else (seconds, bare_seconds)
    per_round = []
    bare = BareEmbedders(ROOT, embedder, cores, lead_s=QUICK_LEAD_S if quick else LEAD_S)
    try:
        with Server(tmp / "serve.log").wait() as srv:
            path = embedder_socket(srv)
            closed_loop(path, call, max(levels), 2 if quick else 5)  # warm-up
            for _ in range(rounds):
                rates = bare_rates(bare, cores, bare_seconds)
                loads = saturate(srv, path, call, levels, seconds)
                best = max(loads, key=lambda r: r["photos_per_s"])
                per_round.append({"bare_images_per_s": rates, "served": loads, "best_photos_per_s": best["photos_per_s"],
                                  "served_over_bare": {name: round(best["photos_per_s"] / max(r.values()), 3)
                                                       for name, r in rates.items()}})
                print(json.dumps(per_round[-1]), flush=True)
    finally:
        bare.close()
    names = list(per_round[0]["served_over_bare"])
    result = {"machine": machine(), "command": command_line("bench.embedder_hop"), "embedder": embedder,
              "call_bytes": len(call), "rounds": per_round,
              "served_over_bare": {n: round(statistics.median(r["served_over_bare"][n] for r in per_round), 3)
                                   for n in names}}
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}), flush=True)
    if not quick:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
