"""Fill the tables of docs/PERFORMANCE.md from the benchmarks' JSON results: python -m bench.report"""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load(name: str | tuple[str, ...]) -> dict | list[dict] | None:
    """One JSON file, or several (those present, None when none is)."""
    if isinstance(name, tuple):
        found = [d for d in map(_load, name) if d is not None]
        return found or None
    path = DOCS / name
    return json.loads(path.read_text()) if path.exists() else None


def embedder_table(d: dict) -> str:
    lines = [f"Machine: {d['machine']}; device {d['device']}; torch {d['torch']}, {d['threads']} threads; "
             f"measured fp32 matmul peak **{d['matmul_peak_gflops']} GFLOP/s**; input {d['image_size']} px unless "
             "the row says.", "",
             "| backbone | px | variant | batch | ms/image | images/s | GFLOP/image | share of matmul peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        size = r.get("image_size", d["image_size"])
        if "error" in r:
            lines.append(f"| {r['backbone']} | {size} | {r['variant']} | {r['batch']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['backbone']} | {size} | {r['variant']} | {r['batch']} | {r['ms_per_image']} | "
                         f"{r['images_per_s']} | {r['gflop_per_image']} | {r['share_of_peak']:.0%} |")
    return "\n".join(lines)


def serving_table(d: dict) -> str:
    lines = [f"Machine: {d['machine']}; demo index of 144 photos, queries drawn from {d['photos_uploaded']} photos; "
             "Locust closed loop (no think time); server, embedder and Locust share the 2 cores. Rows with "
             "failures are overload: their requests/s count the immediate 429 answers.", "",
             "| mode | load | requests | failures | requests/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for mode, row in d["modes"].items():
        s = row["sequential"]
        lines.append(f"| {mode} | one at a time | {s['requests']} | 0 | | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} |")
        for r in row["load"]:
            lines.append(f"| {mode} | {r['users']} users | {r['requests']} | {r['failures']} | {r['rps']} | "
                         f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} |")
    bare = d["bare_embedder_images_per_s"]
    lines += ["", f"Bare embedder in process: {bare['batch 1']} images/s at batch 1, {bare['batch 16']} at batch 16. "
              f"Best served throughput / bare embedder (batch 1): **{d['saturation_rps_over_bare_embedder_batch1']:.0%}**."]
    return "\n".join(lines)


def ann_table(d: dict) -> str:
    lines = [f"{d['n']:,} vectors x {d['dim']}-d ({d['data']}), {d['queries']} queries not in the index; "
             f"machine: {d['machine']}. Exact brute force (numpy, 2 cores): "
             f"**{d['exact']['single_query_p50_ms']} ms** per single query, "
             f"{d['exact']['batched_ms_per_query']} ms per query in batches of queries. The original design's "
             f"25088-d descriptor costs **{d['bytes_per_item_25088d_10_trees']:,} bytes per item** in Annoy "
             f"({d['bytes_per_item_25088d_10_trees'] * 1e6 / 1e9:,.0f} GB per million).", "",
             "| n_trees | build s | bytes/item | search_k | recall@10 | p50 ms | p95 ms |", "|---|---|---|---|---|---|---|"]
    for run in d["runs"]:
        for p in run["points"]:
            lines.append(f"| {run['n_trees']} | {run['build_s']} | {run['bytes_per_item']:,} | {p['search_k']} | "
                         f"{p['recall_at_10']} | {p['p50_ms']} | {p['p95_ms']} |")
    return "\n".join(lines)


def builder_table(d: dict) -> str:
    bare = ", ".join(f"batch {b}: {v}" for b, v in d["bare_embedder_images_per_s"].items())
    lines = [f"Catalogue: {d['catalogue']}; machine: {d['machine']}. Bare embedder in process (images/s): {bare}.", "",
             "| decode workers | batch | photos | embedding stage images/s | whole build images/s |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['workers']} | {r['batch']} | {r['photos']} | {r['embed_images_per_s']} | "
                     f"{r['whole_build_images_per_s']} |")
    return "\n".join(lines)


def loadtest_table(d: dict) -> str:
    """loadtests.run's summary.json or step.json; runs since 2026-12-05 also have each kind of request."""
    runs = d.get("runs") or [d["run"]]
    each = " for every kind of request" if any(r.get("kinds") for r in runs) else ""
    lines = [f"SLO: p95 <= {d['slo_ms']:.0f} ms{each}, no failed request.", "",
             "| users | requests | failures | requests/s | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for s, who in [(r, str(r["users"])), *((k, f"&nbsp;&nbsp;{k['name']}") for k in r.get("kinds", []))]:
            lines.append(f"| {who} | {s['requests']} | {s['failures']} | {s['rps']} | {s['p50_ms']:.0f} | "
                         f"{s['p95_ms']:.0f} | {s['p99_ms']:.0f} | {s['max_ms']:.0f} |")
    return "\n".join(lines)


# bench.overhead --upload: what each kind of run posted (runs before 2026-12-03 have no "upload": demo)
UPLOADS = {"demo": "demo photos (160 px PNG)", "phone": "phone photos as is (1600x1200 JPEG)",
           "page": "phone photos as the page sends them (693x520 JPEG)"}


def load_generator(d: dict) -> str:
    """Which load generator drove a bench.overhead run's closed loops: wrk since 2026-12-03, httpx before."""
    return "wrk" if "load_generator_cpu_s" in d["rows"][-1]["rounds"][0]["loads"][0] else "httpx"


def cores_label(cores) -> str:
    """'core 0' or 'cores 2, 3': where bench.overhead --apart put a service."""
    return ("core " if len(cores) == 1 else "cores ") + ", ".join(map(str, sorted(cores)))


def overhead_table(d: dict) -> str:
    """bench.overhead: each row's code against its own bare network, medians of alternating rounds."""
    upload = UPLOADS[d.get("upload", "demo")]
    apart = "embedder_cores" in d["rows"][-1].get("layout", {})  # --apart: the row's own cores and processes
    layout = d["rows"][-1]["layout"] if apart else d["layout"]
    names = list(dict.fromkeys(n for r in d["rows"] for n in r["served_over_bare"]))  # bare layouts, in order
    clients = ", ".join(map(str, d["rows"][-1].get("clients", (4, 8, 16))))
    has_spaced = all("bare_spaced_p50_ms" in r for r in d["rows"])  # measured since 2026-12-03
    spaced_head = ("bare forward p50 ms, spaced as lone searches | **HTTP / spaced bare** | " if has_spaced else "")
    where = ("the embedder on the GPU, server processes and load generator on the CPU cores" if "NVIDIA" in d["machine"]
             else "server, embedder and load generator share the cores")
    if apart:
        embedder_on = cores_label(layout["embedder_cores"])
        where = (f"each service a server of its own, as both manifests deploy them: the Embedder on {embedder_on}, "
                 f"the entry and the load generator on {cores_label(layout['entry_cores'])}; the bare network on "
                 f"{embedder_on} too")
    embedder = (f"{d['backbone']}, weights: {d['weights']}" + (" (speed only)" if d["weights"] == "random" else "")
                if d.get("backbone") else "default embedder")
    lines = [f"Machine: {d['machine']}; `{d['command']}`; the demo index ({embedder}), {d['photos']} {upload} "
             f"uploaded; {where} (load generator: {load_generator(d)}); rows that name no layout ran "
             f"{layout['entry_workers']} entry and {layout['embedder_workers']} embedder processes; batches of up "
             f"to {layout['embed_max_batch']}. Medians of {len(d['rows'][-1]['rounds'])} rounds; bare networks at "
             "their best batch of 1, 2, 4, 8" + ("; - where a row has no such bare layout." if any(
                 set(names) - set(r["served_over_bare"]) for r in d["rows"]) else "."), "",
             "| code | HTTP /search p50 ms | bare forward p50 ms | **HTTP / bare** | " + spaced_head +
             f"served requests/s (best of {clients} clients) | bare images/s: {' / '.join(names)} | "
             f"**served / bare**: {' / '.join(names)} |", "|---|---|---|---|---|---|---|" + "---|" * (2 * has_spaced)]
    for r in d["rows"]:
        bare = " / ".join(str(r["bare_best_images_per_s"].get(n, "-")) for n in names)
        ratio = " / ".join(f"{r['served_over_bare'][n]:.0%}" if n in r["served_over_bare"] else "-" for n in names)
        spaced = f"{r['bare_spaced_p50_ms']} | {r['http_over_bare_spaced']} | " if has_spaced else ""
        lines.append(f"| {r['code']} | {r['http_p50_ms']} | {r['bare_forward_p50_ms']} | {r['http_over_bare']} | "
                     f"{spaced}{r['best_rps']} | {bare} | {ratio} |")
    lines += ["", "Each round, and the CPU each part took per answered search at the best concurrency "
              "(ms of CPU; each core gives 1,000 ms a second):", "",
              "| code | round | HTTP / bare | served / bare | served requests/s | bare images/s by batch 1, 2, 4, 8 | "
              "CPU ms per search: embedder / entry / load generator |", "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        for i, rd in enumerate(r["rounds"], 1):
            bare = "; ".join(f"{n}: {', '.join(str(v) for v in rates.values())}"
                             for n, rates in rd["bare_images_per_s"].items())
            cpu = rd["cpu_ms_per_request"]
            ratio = " / ".join(f"{v:.0%}" for v in rd["served_over_bare"].values())
            lines.append(f"| {r['code']} | {i} | {rd['http_over_bare']} | {ratio} | {rd['best_rps']} | {bare} | "
                         f"{cpu['embedder']} / {cpu['entry']} / {cpu['load generator']} |")
    return "\n".join(lines)


def lone_search_table(runs: list[dict]) -> str:
    """bench.overhead of this checkout alone, one run per upload kind: a lone search against the bare pass,
    back to back and spaced as lone searches are; every round shown (the machine's noise is in the spread)."""
    lines = [f"Machine: {runs[0]['machine']}; the demo index (default embedder); the runs one after another; "
             f"closed loops driven by {load_generator(runs[0])}.", "",
             "| upload | round | HTTP /search p50 ms | bare forward p50 ms, back to back | **HTTP / bare** | "
             "bare forward p50 ms, spaced as lone searches | **HTTP / spaced bare** | served / bare throughput "
             "(one process / 2 x 1 thread) |", "|---|---|---|---|---|---|---|---|"]
    for d in runs:
        for i, r in enumerate(d["rows"][-1]["rounds"], 1):
            ratio = " / ".join(f"{v:.0%}" for v in r["served_over_bare"].values())
            lines.append(f"| {UPLOADS[d.get('upload', 'demo')]} | {i} | {r['http_p50_ms']} | "
                         f"{r['bare_forward_p50_ms']} | {r['http_over_bare']} | {r['bare_spaced_p50_ms']} | "
                         f"{r['http_over_bare_spaced']} | {ratio} |")
    lines += ["", "Commands: " + "; ".join(f"`{d['command']}`" for d in runs) + "; then `python -m bench.report`."]
    return "\n".join(lines)


def overhead_table_one_run(d: dict) -> str:
    """bench.overhead as it was before rounds (the GPU run of 2026-11-25)."""
    shared = ("the embedder on the GPU, server processes and load generator on the CPU cores" if "NVIDIA" in d["machine"]
              else "server, embedder and load generator share the cores")
    lines = [f"Machine: {d['machine']}; `{d['command']}`; the demo index, {d['photos']} demo photos (160 px PNG) "
             f"uploaded; {shared}. Bare embedder: back to back in process on the same device, best of batch 1 "
             "and 8.", "",
             "| code, index | HTTP /search p50 ms | bare forward p50 ms | **HTTP / bare** | saturation requests/s "
             "(concurrency 4 / 8 / 16) | bare images/s | **served / bare** |", "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        sat = " / ".join(str(x["rps"]) for x in r["saturation"])
        lines.append(f"| {r['code']} | {r['http_p50_ms']} | {r['bare_forward_p50_ms']} | {r['http_over_bare']} | "
                     f"{sat} | {max(r['bare_images_per_s'].values())} | {r['served_over_bare']:.0%} |")
    return "\n".join(lines)


def entry_threads_table(runs: list[dict]) -> str:
    """bench.entry_threads on each machine: the entry's off-loop work by pool size."""
    lines = ["| machine | pool threads | searches/s | CPU ms per search |", "|---|---|---|---|"]
    for d in runs:
        for r in d["rows"]:
            lines.append(f"| {d['machine']} | {r['threads']} | {r['searches_per_s']} | {r['cpu_ms_per_search']} |")
    lines += ["", f"{runs[0]['clients']} searches in flight. Commands: "
              + "; ".join(f"`{d['command']}` ({d['machine'].split(',')[1].strip()})" for d in runs) + "."]
    return "\n".join(lines)


def soak_table(d: dict) -> str:
    m = d["memory"]
    lines = [f"{d['rate']} requests/s started on schedule (open loop) for {d['minutes']:g} minutes after "
             f"{d['warmup_s']:g} s of warm-up: **{d['requests']:,} requests, {sum(d['errors'].values())} errors**"
             f"{' ' + str(d['errors']) if d['errors'] else ''}; server RSS (all processes) "
             f"{m['start']['total_bytes'] / 2**20:,.0f} MiB at start, {m['end']['total_bytes'] / 2**20:,.0f} MiB at "
             f"the end: **{m['growth_pct']:+.1f}%**.", "",
             "| window | requests | errors | requests/s | p50 ms | p95 ms | p99 ms | max ms | RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in d["windows"]:
        lat = w["latency"]
        lines.append(f"| {w['index']} | {w['requests']} | {w['errors']} | {w['rps']} | {lat['p50_ms']} | "
                     f"{lat['p95_ms']} | {lat['p99_ms']} | {lat['max_ms']} | "
                     f"{(w['rss_bytes'] or 0) / 2**20:,.0f} |")
    return "\n".join(lines)


def cuda_graphs_table(d: dict) -> str:
    lines = [f"Machine: {d['machine']}; `{d['command']}`; fp16; ms per batch (median, the two timed in turns); host CPU "
             "ms per batch (this process, the wait for the GPU included); cosine: the least between a photo's "
             "replayed and kernel-by-kernel vectors.", "",
             "| embedder | batch | kernel by kernel ms | CUDA graph ms | **speed-up** | CPU ms: kernel by kernel / graph "
             "| cosine |", "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['backbone']} {r['descriptor']} | {r['batch']} | {r['eager_ms']} | {r['graph_ms']} | "
                     f"{r['speedup']}x | {r['eager_cpu_ms']} / {r['graph_cpu_ms']} | {r['min_cosine']} |")
    return "\n".join(lines)


def ab_table(d: dict) -> str:
    """bench.ab_serving: each version's closed loops, medians of its rounds."""
    lines = [f"Machine: {d['machine']}; `{d['command']}`; the demo index ({d.get('backbone', 'default')}, weights: "
             f"{d.get('weights', 'default')}); closed loops driven by wrk; medians of {len(d['rounds'])} rounds, "
             "failures (non-2xx answers and socket errors) summed over them.", "",
             "| code | clients | answered searches/s | failed | p50 ms | p99 ms | embedder CPU ms per search |",
             "|---|---|---|---|---|---|---|"]
    for label, levels in d["summary"].items():
        for clients, r in levels.items():
            lines.append(f"| {label} | {clients} | {r['median_rps']} | **{r['failed']}** | {r['median_p50_ms']} | "
                         f"{r['median_p99_ms']} | {r['median_embedder_cpu_ms']} |")
    return "\n".join(lines)


def upload_flood_table(d: dict) -> str:
    lines = [f"Machine: {d['machine']}; `{d['command']}`; {d['clients']} requests of {d['mb']:g} MB sent at once "
             "per round; the entry process's RSS (MiB), sampled every 20 ms.", "",
             "| code | round | answers | seconds | RSS before | **peak RSS** | RSS a second after |",
             "|---|---|---|---|---|---|---|"]
    for row in d["rows"]:
        before = row["start_rss"]
        for i, r in enumerate(row["rounds"], 1):
            answers = ", ".join(f"{n} x {status}" for status, n in r["answers"].items())
            lines.append(f"| {row['code']} | {i} | {answers} | {r['seconds']} | {before / 2**20:,.0f} | "
                         f"**{r['peak_rss'] / 2**20:,.0f}** | {r['rss_after'] / 2**20:,.0f} |")
            before = r["rss_after"]
    return "\n".join(lines)


def embedder_records_table(d: dict) -> str:
    lines = [f"Machine: {d['machine']}; `{d['command']}`; one Embedder worker driven by {d['clients']} raw-socket "
             "clients with the entry's one-photo call, a server per row and round, rows alternating.", "",
             "| Embedder's per-call records | round | photos/s | **event loop CPU ms per call** | "
             "CPU ms per call on its other threads (the pass) |", "|---|---|---|---|---|"]
    for row in d["rows"]:
        for i, r in enumerate(row["rounds"], 1):
            lines.append(f"| {row['row']} | {i} | {r['photos_per_s']} | **{r['event_loop_ms_per_call']}** | "
                         f"{r['other_threads_ms_per_call']} |")
    return "\n".join(lines)


SECTIONS = {"overhead": ("overhead.json", overhead_table), "overhead-phone": ("overhead_phone.json", overhead_table),
            "overhead-page": ("overhead_page.json", overhead_table),
            "overhead-vgg16": ("overhead_vgg16.json", overhead_table),
            "overhead-apart": ("overhead_apart.json", overhead_table),
            "overhead-apart-page": ("overhead_apart_page.json", overhead_table),
            "overhead-apart-phone": ("overhead_apart_phone.json", overhead_table),
            "overhead-apart-k8s-page": ("overhead_apart_k8s_page.json", overhead_table),
            "overhead-apart-token-page": ("overhead_apart_token_page.json", overhead_table),
            "overhead-apart-coalesce-page": ("overhead_apart_coalesce_page.json", overhead_table),
            "overhead-shared-coalesce-page": ("overhead_shared_coalesce_page.json", overhead_table),
            "overhead-shared-page": ("overhead_shared_page.json", overhead_table),
            "overhead-apart-records-page": ("overhead_apart_records_page.json", overhead_table),
            "overhead-shared-records-page": ("overhead_shared_records_page.json", overhead_table),
            "embedder-records": ("embedder_records.json", embedder_records_table),
            "ab-slow-network": ("ab_slow_network.json", ab_table),
            "ab-pace-default": ("ab_pace_default.json", ab_table),
            "overhead-freed": ("overhead_freed.json", overhead_table),
            "overhead-dispatch": ("overhead_dispatch.json", overhead_table),
            "lone-search": (("lone_demo.json", "lone_page.json", "lone_phone.json"), lone_search_table),
            "embedder": ("embedder_speed.json", embedder_table),
            "serving": ("serving.json", serving_table), "builder": ("builder_speed.json", builder_table),
            "embedder-gpu": ("embedder_speed_gpu.json", embedder_table),
            "builder-gpu": ("builder_speed_gpu.json", builder_table),
            "overhead-gpu": ("overhead_gpu.json", overhead_table_one_run),
            "overhead-gpu-layouts": ("overhead_gpu_layouts.json", overhead_table),
            "overhead-gpu-threads": ("overhead_gpu_threads.json", overhead_table),
            "cuda-graphs": ("cuda_graphs_gpu.json", cuda_graphs_table),
            "overhead-gpu-graphs": ("overhead_gpu_graphs.json", overhead_table),
            "overhead-gpu-12x2": ("overhead_gpu_12x2.json", overhead_table),
            "entry-threads": (("entry_threads.json", "entry_threads_gpu.json"), entry_threads_table),
            "ann": ("ann_scale.json", ann_table), "loadtest-step": ("loadtest_step.json", loadtest_table),
            "loadtest-5min": ("loadtest_5min.json", loadtest_table),
            "loadtest-overload": ("loadtest_overload.json", loadtest_table), "soak": ("soak.json", soak_table),
            "loadtest-page-step": ("loadtest_page_step.json", loadtest_table),
            "loadtest-api-step-same-run": ("loadtest_api_step_same_run.json", loadtest_table),
            "upload-flood": ("upload_flood.json", upload_flood_table),
            "upload-flood-trim": ("upload_flood_trim.json", upload_flood_table)}


def main() -> None:
    path = DOCS / "PERFORMANCE.md"
    text = path.read_text()
    for name, (source, render) in SECTIONS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        data = _load(source)
        if data is None or start not in text:
            continue
        text = text[: text.index(start) + len(start)] + "\n" + render(data) + "\n" + text[text.index(end):]
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
