"""Loads for scripts/bench.sh that wrk cannot make. Each prints one line of numbers.

  loads.py startup BINARY CONFIG_DIR PORT
      median ms, over 5 starts, from exec to the first served /v1/models
  loads.py held BINARY CONFIG_DIR PORT UPSTREAM_PORT N
      N streams held open at once through the proxy, against a slow SSE upstream (in a
      process of its own, so that neither runs out of descriptors):
      "<started> <seconds to start them all> <proxy RSS kB>"
  loads.py slow-upstream PORT
      that upstream: an event every second on each stream
  loads.py crowd PORT IDLE SLOW
      IDLE idle connections and SLOW slowloris heads (a byte every second) held open
      against a running proxy, then 20 normal requests one after another:
      "<idle open> <slow open> <median ms> <max ms>"
  loads.py embeddings BINARY CONFIG_DIR PORT UPSTREAM_PORT N
      N embeddings requests at once through the proxy, each answered by a local
      upstream (a thread per connection) with 2,048 x 3,072 floats (about 82 MB):
      "<answers whole> <bytes per answer> <seconds> <proxy peak RSS kB (VmHWM)>"
  loads.py partial-heads PORT N
      N connections from 127.0.0.1, each a partial head (a byte more every 3 s), held
      open against a running proxy; then, 20 times each on a new connection from the
      same address, /health and a chat request:
      "<opened> <still open> <health max ms> <chat max ms>"
"""

import asyncio
import statistics
import subprocess
import sys
import time
import urllib.request


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1])


def wait_listening(port, tries=2000):
    import socket
    for _ in range(tries):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.005)
    raise SystemExit(f"nothing listens on {port}")


def wait_ready(port, path="/health", tries=2000):
    for _ in range(tries):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1).read()
            return
        except Exception:
            time.sleep(0.0005)
    raise SystemExit("the proxy did not start")


def startup(binary, cfg, port):
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        p = subprocess.Popen([binary, "--config-dir", cfg], stderr=subprocess.DEVNULL)
        wait_ready(port, "/v1/models")
        runs.append((time.perf_counter() - t) * 1000)
        p.terminate()
        p.wait()
    print(f"{statistics.median(runs):.1f}")


async def slow_upstream(reader, writer):
    # Azure-like SSE that keeps the stream open: an event at once, then one every 10 s
    # for 2 minutes (sparse, so that the load generator keeps up with 10,000 streams).
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        ev = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
        for _ in range(12):
            writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            await writer.drain()
            await asyncio.sleep(10)
    except BaseException:  # includes the cancellation at the end: the stream just stops
        pass
    writer.close()


async def stream_client(port, started, writers):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    writers.append(w)
    body = b'{"model":"gpt-4o","stream":true,"messages":[]}'
    w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await w.drain()
    await r.readuntil(b"data:")
    started.append(time.perf_counter())


async def serve_slow(port):
    server = await asyncio.start_server(slow_upstream, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


async def held(binary, cfg, port, upstream_port, n):
    upstream = subprocess.Popen([sys.executable, __file__, "slow-upstream", str(upstream_port)])
    proxy = subprocess.Popen([binary, "--config-dir", cfg], stderr=subprocess.DEVNULL)
    try:
        await asyncio.to_thread(wait_listening, upstream_port)
        await asyncio.to_thread(wait_ready, port)
        started, writers = [], []
        in_flight = asyncio.Semaphore(500)  # so that the listen backlogs keep up

        async def one():
            async with in_flight:
                await stream_client(port, started, writers)

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)], return_exceptions=True)
        took = (max(started) - t0) if started else float("nan")
        await asyncio.sleep(1)
        rss = rss_kb(proxy.pid)
        print(f"{len(started)} {took:.2f} {rss}")
        for w in writers:
            w.close()
    finally:
        proxy.kill()
        proxy.wait()
        upstream.kill()
        upstream.wait()


async def half_heads(port, n, head):
    """Up to n connections, each sent `head` (not ended): their readers and writers."""
    readers, writers = [], []
    for _ in range(n):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(head)
            readers.append(r)
            writers.append(w)
        except OSError:
            break
    return readers, writers


async def trickle(writers, every):
    """A byte more on each open connection every `every` seconds, until cancelled."""
    while True:
        await asyncio.sleep(every)
        for w in writers:
            if not w.is_closing():
                w.write(b"X")


async def crowd(port, idle, slow):
    conns = []
    for _ in range(idle):
        try:
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError:
            break
    idle_open = len(conns)
    _, slow_writers = await half_heads(port, slow, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

    dripping = asyncio.create_task(trickle(slow_writers, 1))
    await asyncio.sleep(1)
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'

    def one():
        t = time.perf_counter()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        return (time.perf_counter() - t) * 1000

    times = [await asyncio.to_thread(one) for _ in range(20)]
    dripping.cancel()
    print(f"{idle_open} {len(slow_writers)} {statistics.median(times):.2f} {max(times):.2f}")
    for _, w in conns:
        w.close()
    for w in slow_writers:
        w.close()


def embeddings_answer():
    """About 82 MB: 2,048 embeddings of 3,072 floats, as Azure writes them."""
    row = "[" + ",".join(f"{(i % 997) / 997 - 0.5:.9f}" for i in range(3072)) + "]"
    rows = ",".join(
        f'{{"object":"embedding","index":{i},"embedding":{row}}}' for i in range(2048)
    )
    return (
        f'{{"object":"list","data":[{rows}],"model":"text-embedding-3-large",'
        f'"usage":{{"prompt_tokens":2048,"total_tokens":2048}}}}'
    ).encode()


def serve_embeddings(port, body):
    import http.server
    import threading

    class Upstream(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def embeddings(binary, cfg, port, upstream_port, n):
    import concurrent.futures
    import json

    body = embeddings_answer()
    upstream = serve_embeddings(upstream_port, body)
    proxy = subprocess.Popen([binary, "--config-dir", cfg], stderr=subprocess.DEVNULL)
    try:
        wait_ready(port)
        request = json.dumps(
            {"model": "text-embedding-3-large", "input": ["x"] * 2048}
        ).encode()

        def one(_):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/embeddings",
                data=request,
                headers={"content-type": "application/json"},
            )
            got = 0
            with urllib.request.urlopen(req, timeout=300) as r:
                while chunk := r.read(1 << 20):
                    got += len(chunk)
            return got

        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            sizes = list(pool.map(one, range(n)))
        seconds = time.perf_counter() - t
        with open(f"/proc/{proxy.pid}/status") as f:
            peak = int(next(l for l in f if l.startswith("VmHWM")).split()[1])
        whole = sum(1 for s in sizes if s == len(body))
        print(f"{whole} {len(body)} {seconds:.1f} {peak}")
    finally:
        proxy.terminate()
        proxy.wait()
        upstream.shutdown()


async def partial_heads(port, n):
    import http.client
    readers, writers = await half_heads(port, n, b"GET /health HTTP/1.1\r\nHost: x\r\n")

    dripping = asyncio.create_task(trickle(writers, 3))
    await asyncio.sleep(1)
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'

    def one(method, path, payload):
        t = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        c.close()
        if r.status != 200:
            raise SystemExit(f"{method} {path}: {r.status}")
        return (time.perf_counter() - t) * 1000

    health, chat = [], []
    for _ in range(20):
        health.append(await asyncio.to_thread(one, "GET", "/health", None))
        chat.append(await asyncio.to_thread(one, "POST", "/v1/chat/completions", body))
    dripping.cancel()
    still_open = sum(1 for r in readers if not r.at_eof())
    print(f"{len(writers)} {still_open} {max(health):.2f} {max(chat):.2f}")
    for w in writers:
        w.close()


def main():
    what, args = sys.argv[1], sys.argv[2:]
    if what == "startup":
        startup(*args)
    elif what == "held":
        asyncio.run(held(args[0], args[1], int(args[2]), int(args[3]), int(args[4])))
    elif what == "slow-upstream":
        asyncio.run(serve_slow(int(args[0])))
    elif what == "partial-heads":
        asyncio.run(partial_heads(int(args[0]), int(args[1])))
    elif what == "crowd":
        asyncio.run(crowd(int(args[0]), int(args[1]), int(args[2])))
    elif what == "embeddings":
        embeddings(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
