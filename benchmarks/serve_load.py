"""Load on ``tf-diffusion serve``: N requests from C concurrent webuiapi clients on the tiny-shapes model.

Every request has its own prompt and seed; each answer must carry exactly those (its PNG's parameters and
``info``), or the run fails: none lost, none mixed up. A full queue's 503 is counted as refused (a client
may retry; each client retries up to ``--retries`` times). Prints p50 / p95 latencies of the completed requests and the server process's resident
memory after a warm-up and after the run (graph mode on a CPU, as the server runs there).

    PYTHONPATH=. python benchmarks/serve_load.py [--requests 50] [--clients 10] [--queue-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


def rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--retries",
        type=int,
        default=100,
        help="times a client resends a request refused with 503 (0.1 s apart)",
    )
    args = parser.parse_args()

    import numpy as np
    import webuiapi

    from tf_diffusion.execution.compiling import memory_mappings
    from tf_diffusion.serve import ModelRegistry, Server, ServerState

    registry = ModelRegistry("tiny-shapes")
    registry.load()
    server = Server(ServerState(registry, queue_size=args.queue_size), port=0).start()
    payload = {"width": args.size, "height": args.size, "steps": args.steps, "sampler_name": "Euler a"}
    warm = webuiapi.WebUIApi(port=server.port)
    for _ in range(2):  # traces the graphs once; the run then measures serving
        warm.txt2img(prompt="warm-up", seed=0, **payload)
    rss_before, maps_before = rss_mib(), memory_mappings()

    lock = threading.Lock()
    next_index = [0]
    latencies, refused, wrong, errors = [], [], [], []
    answers_503 = [0]

    def client():
        api = webuiapi.WebUIApi(port=server.port)
        while True:
            with lock:
                i = next_index[0]
                if i >= args.requests:
                    return
                next_index[0] += 1
            prompt, seed = f"a red circle number {i}", 1000 + i
            start = time.perf_counter()
            result = None
            for _ in range(args.retries + 1):
                try:
                    result = api.txt2img(prompt=prompt, seed=seed, **payload)
                    break
                except RuntimeError as e:
                    if not (e.args and e.args[0] == 503):
                        errors.append((i, str(e)[:200]))
                        break
                    with lock:
                        answers_503[0] += 1
                    time.sleep(0.1)
            if result is None:
                if not errors or errors[-1][0] != i:
                    refused.append(i)
                continue
            elapsed = time.perf_counter() - start  # from the first try, waiting and retries included
            text = result.image.info.get("parameters", "")
            ok = (
                result.info["all_seeds"] == [seed]
                and result.info["all_prompts"] == [prompt]
                and text.startswith(prompt + "\n")
                and f"Seed: {seed}," in text
            )
            with lock:
                (latencies if ok else wrong).append(elapsed if ok else i)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rss_after, maps_after = rss_mib(), memory_mappings()
    server.stop()

    report = {
        "requests": args.requests,
        "clients": args.clients,
        "queue_size": args.queue_size,
        "image": f"{args.size}x{args.size}, {args.steps} steps, Euler a, tiny-shapes, graph mode",
        "completed": len(latencies),
        "refused_503": len(refused),
        "answers_503": answers_503[0],
        "mixed_up": len(wrong),
        "other_errors": errors,
        "lost": args.requests - len(latencies) - len(refused) - len(wrong) - len(errors),
        "p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
        "wall_s": round(wall, 2),
        "rss_mib_before": round(rss_before, 1),
        "rss_mib_after": round(rss_after, 1),
        "memory_mappings_before": None if maps_before is None else maps_before[0],
        "memory_mappings_after": None if maps_after is None else maps_after[0],
    }
    print(json.dumps(report, indent=2))
    return 0 if not wrong and not errors and report["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
