"""The long-generation scenario of scripts/bench.sh (`scripts/bench.sh long-generation`).

  long_generation.py BINARY [SECONDS] [TIMEOUT]

Two healthy upstreams that take 10 ms per `max_tokens` token before they answer (as a
non-streamed generation does), a proxy in front of them with `routing.timeout: TIMEOUT`
(default 10 s: shorter than a long request takes, the harsh case), three clients sending
requests of 1,500 max_tokens one after another, and one client sending small requests
(1 token), for SECONDS (default 50). Prints one line: circuits opened, long requests
generated more than once (seen by both upstreams or twice by one), small requests
failed, and how the long requests ended.
"""

import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PER_TOKEN = 0.010
LONG, SMALL = 1500, 1
generated = collections.Counter()
lock = threading.Lock()


class Generating(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        tokens = int(body.get("max_tokens", 1))
        with lock:
            generated[body["messages"][0]["content"]] += 1
        time.sleep(tokens * PER_TOKEN)
        answer = json.dumps({"id": "c", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5}}).encode()
        try:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        except OSError:
            pass  # the proxy gave up on it

    def log_message(self, *args):
        pass


def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Generating)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(port, content, max_tokens):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps({"model": "m", "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": content}]}).encode(),
        headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 50
    timeout = sys.argv[3] if len(sys.argv) > 3 else "10"
    a, b, port = upstream(), upstream(), free_port()
    cfg = tempfile.mkdtemp()
    with open(os.path.join(cfg, "base.yaml"), "w") as f:
        f.write(f"""host: 127.0.0.1
port: {port}
logging: {{level: error}}
routing: {{timeout: {timeout}}}
instances:
  - {{name: a, api_key: k, api_base: 'http://127.0.0.1:{a}', api_version: 2024-10-21, priority: 1, supported_models: [m]}}
  - {{name: b, api_key: k, api_base: 'http://127.0.0.1:{b}', api_version: 2024-10-21, priority: 2, supported_models: [m]}}
""")
    proxy = subprocess.Popen([binary, "--config-dir", cfg], stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except Exception:
                time.sleep(0.02)
        end = time.monotonic() + seconds
        longs, smalls = collections.Counter(), collections.Counter()
        opened = [0]

        def client(name, max_tokens, statuses):
            n = 0
            while time.monotonic() < end:
                n += 1
                status = chat(port, f"{name}.{n}", max_tokens)
                with lock:
                    statuses[status] += 1

        def watch():
            was = set()
            while time.monotonic() < end:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/instances") as r:
                    now = {i["name"] for i in json.load(r)["instances"] if i["status"] == "circuit_open"}
                opened[0] += len(now - was)
                was = now
                time.sleep(0.2)

        threads = [threading.Thread(target=client, args=(f"long {k}", LONG, longs)) for k in range(3)]
        threads += [threading.Thread(target=client, args=("small", SMALL, smalls)),
                    threading.Thread(target=watch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        twice = sum(1 for k, n in generated.items() if k.startswith("long") and n > 1)
        failed = sum(n for s, n in smalls.items() if s != 200)
        print(f"circuits opened {opened[0]} (target 0); long requests generated more than once "
              f"{twice} (target 0); small requests failed {failed} of {sum(smalls.values())} "
              f"(target 0); long requests answered {dict(sorted(longs.items()))} "
              f"(routing.timeout {timeout} s, {seconds:g} s run)")
    finally:
        proxy.terminate()
        proxy.wait()


if __name__ == "__main__":
    main()
