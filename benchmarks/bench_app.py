"""The search page under load and bad input: app.py on loopback, driven through its HTTP API by concurrent clients.

    python -m benchmarks.bench_app [--index search_index] [--clients 1 4 16] [--seconds 30] [--like_share 0.25]

For each client count: that many threads, each with its own gradio_client, send queries back to back for --seconds
(text queries: titles of the indexed papers; a --like_share of them "papers like these" by an indexed id). Printed:
queries answered per second, p50/p95 latency as a client sees it (the queue's wait included), errors, and the
server's peak resident memory (VmHWM, the whole run so far). Then each bad input once (empty, 100,000 characters,
binary, unknown domain, unknown id), its message, and a normal query after it: the server must keep serving.
"""

import argparse
import statistics
import threading
import time
from pathlib import Path

from benchmarks.app_server import free_port, serve

BAD_INPUTS = {
    "empty query": ("/search", ("", "predict", 10)),
    "100,000 characters": ("/search", (("spasticity " * 9_091)[:100_000], "predict", 10)),
    "binary": ("/search", (bytes(range(256)).decode("latin-1") * 4, "predict", 10)),
    "unknown domain": ("/search", ("baclofen", "Cardiology_1999", 10)),
    "unknown paper id": ("/like", ("W0000000000", 10)),
}


def queries(index: str, count: int) -> tuple[list[str], list[str]]:
    """(titles, ids) of the first `count` indexed papers."""
    import pyarrow.parquet as pq

    first = sorted((Path(index) / "chunks").glob("*.parquet"))[0]
    table = pq.read_table(first, columns=["id", "text"]).slice(0, count).to_pydict()
    return [text.split(". ")[0] for text in table["text"]], [str(i) for i in table["id"]]


def peak_memory_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def load(url: str, clients: int, seconds: float, titles: list[str], ids: list[str], like_share: float) -> dict:
    from gradio_client import Client

    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + seconds

    def client_loop(number: int):
        client = Client(url, verbose=False)
        k = number
        while time.monotonic() < deadline:
            k += clients
            like = (k % 100) < like_share * 100
            started = time.perf_counter()
            try:
                if like:
                    client.predict(ids[k % len(ids)], 10, api_name="/like")
                else:
                    client.predict(titles[k % len(titles)], "predict", 10, api_name="/search")
                with lock:
                    latencies.append(time.perf_counter() - started)
            except Exception as error:  # counted and shown: under load nothing may fail
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"clients": clients, "answered": len(latencies), "qps": len(latencies) / wall,
            "p50": statistics.median(ordered) if ordered else float("nan"),
            "p95": ordered[int(0.95 * (len(ordered) - 1))] if ordered else float("nan"), "errors": errors}


def bad_inputs(url: str, title: str) -> list[tuple[str, str, bool]]:
    """(input, the message the client got, whether a normal query was answered right after)."""
    from gradio_client import Client

    client, rows = Client(url, verbose=False), []
    for name, (api, arguments) in BAD_INPUTS.items():
        try:
            client.predict(*arguments, api_name=api)
            message = "(answered, no error)"
        except Exception as error:
            message = str(error).splitlines()[0]
        served = bool(client.predict(title, "predict", 3, api_name="/search")[1]["data"])
        rows.append((name, message, served))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="search_index")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--like_share", type=float, default=0.25)
    args = parser.parse_args()
    titles, ids = queries(args.index, 500)
    port = free_port()
    server = serve(args.index, port)
    url = f"http://127.0.0.1:{port}/"
    try:
        print("\n| clients | queries answered | queries/s | p50 latency | p95 latency | errors | server peak memory |")
        print("|---|---|---|---|---|---|---|")
        for clients in args.clients:
            result = load(url, clients, args.seconds, titles, ids, args.like_share)
            print(f"| {clients} | {result['answered']} | {result['qps']:.1f} | {result['p50'] * 1000:.0f} ms | "
                  f"{result['p95'] * 1000:.0f} ms | {len(result['errors'])} | {peak_memory_gib(server.pid):.2f} GiB |",
                  flush=True)
            for error in result["errors"][:3]:
                print(f"  error: {error[:200]}")
        print("\n| bad input | message | next query answered |\n|---|---|---|")
        for name, message, served in bad_inputs(url, titles[0]):
            print(f"| {name} | {message} | {'yes' if served else 'NO'} |")
        print(f"\nserver still running: {server.poll() is None}; peak memory {peak_memory_gib(server.pid):.2f} GiB")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
