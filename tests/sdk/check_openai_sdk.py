"""End-to-end check: the official OpenAI Python SDK through the proxy.

Starts an Azure-like mock upstream (in this process), writes a config pointing at it,
starts the proxy binary given as argv[1] (default: $CARGO_TARGET_DIR/debug/
azure-openai-proxy, else target/debug/...), and drives it with `OpenAI(base_url=...)` and
`AzureOpenAI(azure_endpoint=...)`: chat (plain and streamed), completions, embeddings,
the model list and an unknown model. Prints one line per check and ends with
"N passed, M failed"; exits non-zero if any check failed.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
from openai import AzureOpenAI, OpenAI

UPSTREAM_KEY = "mock-upstream-key"
received = []  # (path, body) the mock got, in order


class AzureMock(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("apim-request-id", "mock-apim")
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        received.append((self.path, body))
        m = re.fullmatch(r"/openai/deployments/([^/]+)/(.+)\?api-version=[\w-]+", self.path)
        if not m:
            return self.reply(404, {"error": {"code": "404", "message": "Resource not found"}})
        if self.headers.get("api-key") != UPSTREAM_KEY:
            return self.reply(401, {"error": {"code": "401", "message": "Access denied"}})
        dep, op = m.groups()
        usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        if op == "chat/completions" and body.get("stream"):
            return self.stream(dep, (body.get("stream_options") or {}).get("include_usage"), usage)
        if op == "chat/completions":
            return self.reply(200, {"id": "c1", "object": "chat.completion", "created": 1, "model": dep,
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": f"Hello from {dep}"}}],
                                    "usage": usage})
        if op == "completions":
            return self.reply(200, {"id": "t1", "object": "text_completion", "created": 1, "model": dep,
                                    "choices": [{"index": 0, "text": "once upon", "finish_reason": "stop",
                                                 "logprobs": None}], "usage": usage})
        if op == "embeddings":
            return self.reply(200, {"object": "list", "model": dep, "usage": {"prompt_tokens": 2, "total_tokens": 2},
                                    "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]})
        return self.reply(404, {"error": {"code": "404", "message": "Resource not found"}})

    def stream(self, dep, include_usage, usage):
        def chunk(delta, finish=None, choices=True):
            c = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": dep,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
            if include_usage:
                c["usage"] = None
            return c
        events = [{"id": "", "object": "", "created": 0, "model": "", "choices": [],
                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]},
                  chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop")]
        if include_usage:
            last = chunk({}, choices=False)
            last["usage"] = usage
            events.append(last)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for e in [json.dumps(e) for e in events] + ["[DONE]"]:
            data = f"data: {e}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def start_proxy(binary, upstream_port):
    config_dir = tempfile.mkdtemp(prefix="aop-sdk-")
    with open(os.path.join(config_dir, "base.yaml"), "w") as f:
        f.write(f"""host: 127.0.0.1
port: 0
server: {{workers: 8}}
instances:
  - name: mock-east
    api_key: {UPSTREAM_KEY}
    api_base: http://127.0.0.1:{upstream_port}
    api_version: 2024-10-21
    supported_models: [gpt-4o, gpt-35-turbo-instruct, text-embedding-3-small]
    model_deployments: {{gpt-4o: gpt4o-deploy}}
""")
    proc = subprocess.Popen([binary, "--config-dir", config_dir], stderr=subprocess.PIPE, text=True,
                            env={"PATH": os.environ.get("PATH", "")})
    found = {}

    def read_stderr():
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m and "url" not in found:
                found["url"] = m.group(1)

    threading.Thread(target=read_stderr, daemon=True).start()
    deadline = time.time() + 20
    while "url" not in found and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if "url" not in found:
        proc.kill()
        raise SystemExit("the proxy did not start")
    return proc, found["url"]


def main():
    # Where `cargo build` put it: $CARGO_TARGET_DIR when set, as cargo does.
    default = os.path.join(os.environ.get("CARGO_TARGET_DIR") or "target", "debug",
                           "azure-openai-proxy")
    binary = sys.argv[1] if len(sys.argv) > 1 else default
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), AzureMock)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    proc, url = start_proxy(binary, upstream.server_address[1])
    oai = OpenAI(base_url=f"{url}/v1", api_key="client-key", max_retries=0, timeout=20)
    azure = AzureOpenAI(azure_endpoint=url, api_key="client-key", api_version="2024-10-21",
                        max_retries=0, timeout=20)
    msgs = [{"role": "user", "content": "hi"}]

    def chat():
        r = oai.chat.completions.create(model="gpt-4o", messages=msgs)
        assert r.choices[0].message.content == "Hello from gpt4o-deploy", r
        assert r.usage.total_tokens == 9

    def chat_stream():
        before = len(received)
        chunks = list(oai.chat.completions.create(model="gpt-4o", messages=msgs, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello", text
        assert all(c.usage is None for c in chunks), "the proxy's usage chunk reached the client"
        assert received[before][1]["stream_options"] == {"include_usage": True}, received[before]

    def chat_stream_with_usage():
        chunks = list(oai.chat.completions.create(model="gpt-4o", messages=msgs, stream=True,
                                                  stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 9, chunks[-1]

    def completions():
        r = oai.completions.create(model="gpt-35-turbo-instruct", prompt="tell")
        assert r.choices[0].text == "once upon", r

    def embeddings():
        r = oai.embeddings.create(model="text-embedding-3-small", input="hello")
        assert r.data[0].embedding == [0.5, -0.25], r

    def models():
        ids = sorted(m.id for m in oai.models.list())
        assert ids == ["gpt-35-turbo-instruct", "gpt-4o", "text-embedding-3-small"], ids

    def unknown_model():
        try:
            oai.chat.completions.create(model="gpt-4", messages=msgs)
        except openai.NotFoundError as e:
            assert e.body["code"] == "model_not_found", e.body
        else:
            raise AssertionError("no NotFoundError")

    def azure_chat():
        r = azure.chat.completions.create(model="gpt-4o", messages=msgs)
        assert r.choices[0].message.content == "Hello from gpt4o-deploy", r

    def azure_chat_stream():
        chunks = list(azure.chat.completions.create(model="gpt-4o", messages=msgs, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"

    def azure_embeddings():
        r = azure.embeddings.create(model="text-embedding-3-small", input="hello")
        assert r.data[0].embedding == [0.5, -0.25], r

    def upstream_got_the_instance_api_version():
        assert received, "nothing reached the upstream"
        assert all(path.endswith("api-version=2024-10-21") for path, _ in received), received

    checks = [chat, chat_stream, chat_stream_with_usage, completions, embeddings, models, unknown_model,
              azure_chat, azure_chat_stream, azure_embeddings, upstream_got_the_instance_api_version]
    passed = failed = 0
    try:
        for check in checks:
            try:
                check()
                print(f"ok {check.__name__}")
                passed += 1
            except Exception as e:  # report every check, whatever broke it
                print(f"FAIL {check.__name__}: {type(e).__name__}: {e}")
                failed += 1
    finally:
        proc.kill()
        upstream.shutdown()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
