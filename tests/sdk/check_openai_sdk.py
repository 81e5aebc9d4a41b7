"""End-to-end check: the official OpenAI Python SDK through the proxy.

Starts two Azure-like mock upstreams (in this process: "east" on a dated api-version,
"west" on Azure's v1 API), writes a config pointing at them, starts the proxy binary
given as argv[1] (default: $CARGO_TARGET_DIR/debug/azure-openai-proxy, else
target/debug/...), and drives it with `OpenAI(base_url=...)` (at `/v1` and at an Azure
v1 base URL, `/openai/v1/`) and `AzureOpenAI(azure_endpoint=...)`: chat (plain and
streamed), completions, embeddings, the Responses API (plain, streamed, follow-ups with
`previous_response_id`), an audio transcription upload, a Realtime API session
(`client.realtime.connect`, against a WebSocket mock), the model list and an unknown
model. Prints one line per check and ends with "N passed, M failed"; exits non-zero if
any check failed.
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
received = []  # (upstream name, path, body) the mocks got, in order
NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}
RESPONSE_USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 17}


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

    def route(self, body):
        """(deployment, operation) of a request, from the URL shapes Azure serves."""
        m = re.fullmatch(r"/openai/deployments/([^/]+)/(.+)\?api-version=[\w-]+", self.path)
        if m:
            return m.groups()
        m = re.fullmatch(r"/openai/v1/([\w/]+)", self.path) or \
            re.fullmatch(r"/openai/(responses[\w/]*)\?api-version=[\w-]+", self.path)
        if m:
            return body.get("model"), m.group(1)
        return None, None

    def read_body(self):
        raw = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-type", "").startswith("multipart/form-data"):
            m = re.search(rb'name="model"\r\n\r\n([^\r]*)\r\n', raw)
            return {"model": m.group(1).decode() if m else None, "multipart_bytes": len(raw)}
        return json.loads(raw or b"{}")

    def do_GET(self):
        received.append((self.server.name, self.path, None))
        m = re.fullmatch(r"/openai/(?:v1/)?responses/([\w]+)(?:\?api-version=[\w-]+)?", self.path)
        stored = self.server.responses.get(m.group(1)) if m else None
        return self.reply(200, stored) if stored else self.reply(404, NOT_FOUND)

    def do_POST(self):
        body = self.read_body()
        received.append((self.server.name, self.path, body))
        dep, op = self.route(body)
        if not dep:
            return self.reply(404, NOT_FOUND)
        if self.headers.get("api-key") != UPSTREAM_KEY:
            return self.reply(401, {"error": {"code": "401", "message": "Access denied"}})
        if op == "responses":
            return self.response(dep, body)
        if op == "audio/transcriptions":
            return self.reply(200, {"text": f"transcribed by {dep} on {self.server.name}"})
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
        return self.reply(404, NOT_FOUND)

    def response(self, dep, body):
        """The Responses API: only the upstream that made a response knows its id."""
        prev = body.get("previous_response_id")
        if prev and prev not in self.server.responses:
            return self.reply(404, {"error": {"message": f"Previous response with id '{prev}' not found.",
                                              "type": "invalid_request_error", "param": "previous_response_id",
                                              "code": "previous_response_not_found"}})
        rid = f"resp_{self.server.name}_{len(self.server.responses) + 1}"
        text = f"Hello from {dep}"
        message = {"id": f"msg_{rid}", "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        done = {"id": rid, "object": "response", "created_at": 1, "status": "completed", "model": dep,
                "output": [message], "previous_response_id": prev, "parallel_tool_calls": True,
                "tool_choice": "auto", "tools": [], "usage": RESPONSE_USAGE}
        self.server.responses[rid] = done
        if not body.get("stream"):
            return self.reply(200, done)
        started = dict(done, status="in_progress", output=[], usage=None)
        events = [("response.created", {"response": started}), ("response.in_progress", {"response": started})]
        events += [("response.output_text.delta", {"item_id": message["id"], "output_index": 0,
                                                   "content_index": 0, "delta": d, "logprobs": []})
                   for d in ["Hello", " from ", dep]]
        events += [("response.output_item.done", {"output_index": 0, "item": message}),
                   ("response.completed", {"response": done})]
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for n, (kind, data) in enumerate(events):
            data = dict(data, type=kind, sequence_number=n)
            event = f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

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


def start_upstream(name):
    server = ThreadingHTTPServer(("127.0.0.1", 0), AzureMock)
    server.name, server.responses = name, {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_realtime_upstream():
    """A Realtime API mock on Azure's v1 URL: session events and a `response.done` with usage."""
    from websockets.sync.server import serve

    def handler(ws):
        received.append(("realtime", ws.request.path, ws.request.headers.get("api-key")))
        ws.send(json.dumps({"type": "session.created", "event_id": "e0",
                            "session": {"id": "s1", "type": "realtime", "model": "rt-v1"}}))
        for message in ws:
            event = json.loads(message)
            if event.get("type") == "session.update":
                ws.send(json.dumps({"type": "session.updated", "event_id": "e1",
                                    "session": event.get("session", {})}))
            elif event.get("type") == "response.create":
                usage = {"total_tokens": 30, "input_tokens": 10, "output_tokens": 20}
                ws.send(json.dumps({"type": "response.done", "event_id": "e2", "response": {
                    "id": "r1", "object": "realtime.response", "status": "completed",
                    "output": [], "usage": usage}}))

    server = serve(handler, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_proxy(binary, east_port, west_port, realtime_port):
    config_dir = tempfile.mkdtemp(prefix="aop-sdk-")
    with open(os.path.join(config_dir, "base.yaml"), "w") as f:
        f.write(f"""host: 127.0.0.1
port: 0
server: {{workers: 8}}
routing: {{strategy: round_robin}}
instances:
  - name: mock-east
    api_key: {UPSTREAM_KEY}
    api_base: http://127.0.0.1:{east_port}
    api_version: 2024-10-21
    supported_models: [gpt-4o, gpt-35-turbo-instruct, text-embedding-3-small, gpt-4.1]
    model_deployments: {{gpt-4o: gpt4o-deploy}}
  - name: mock-west
    api_key: {UPSTREAM_KEY}
    api_base: http://127.0.0.1:{west_port}
    api_version: v1
    supported_models: [gpt-4.1]
    model_deployments: {{gpt-4o-mini: mini-v1, whisper: whisper-v1}}
  - name: mock-realtime
    api_key: {UPSTREAM_KEY}
    api_base: http://127.0.0.1:{realtime_port}
    api_version: v1
    model_deployments: {{gpt-realtime: rt-v1}}
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
    east, west = start_upstream("east"), start_upstream("west")
    realtime = start_realtime_upstream()
    proc, url = start_proxy(binary, east.server_address[1], west.server_address[1],
                            realtime.socket.getsockname()[1])
    oai = OpenAI(base_url=f"{url}/v1", api_key="client-key", max_retries=0, timeout=20)
    # A client configured for an Azure v1 endpoint, pointed at the proxy instead.
    azure_v1 = OpenAI(base_url=f"{url}/openai/v1/", api_key="client-key", max_retries=0, timeout=20)
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
        assert received[before][2]["stream_options"] == {"include_usage": True}, received[before]

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
        assert ids == ["gpt-35-turbo-instruct", "gpt-4.1", "gpt-4o", "gpt-4o-mini", "gpt-realtime",
                       "text-embedding-3-small", "whisper"], ids

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
        east_paths = [path for name, path, _ in received if name == "east"]
        assert east_paths, "nothing reached the upstream"
        assert all(path.endswith("api-version=2024-10-21") for path in east_paths), east_paths

    def responses_plain():
        r = oai.responses.create(model="gpt-4o-mini", input="hi")
        assert r.output_text == "Hello from mini-v1", r
        assert r.usage.input_tokens == 12 and r.usage.output_tokens == 5, r.usage
        assert received[-1][:2] == ("west", "/openai/v1/responses"), received[-1]
        assert received[-1][2]["model"] == "mini-v1", received[-1]

    def responses_streamed():
        events = list(oai.responses.create(model="gpt-4o-mini", input="hi", stream=True))
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "Hello from mini-v1", text
        assert events[-1].response.usage.total_tokens == 17, events[-1]

    def responses_follow_ups_stay_on_one_instance():
        # gpt-4.1 is served by both upstreams, in turn: only the one that made a
        # response knows its id, so each follow-up must go back there.
        first = oai.responses.create(model="gpt-4.1", input="hi")
        home = first.id.split("_")[1]
        previous = first.id
        for _ in range(3):
            r = oai.responses.create(model="gpt-4.1", input="and then?", previous_response_id=previous)
            assert r.id.split("_")[1] == home, (home, r.id)
            previous = r.id
        again = oai.responses.retrieve(previous)
        assert again.id == previous and again.output_text.startswith("Hello from"), again

    def azure_v1_base_url():
        r = azure_v1.chat.completions.create(model="gpt-4o", messages=msgs)
        assert r.choices[0].message.content == "Hello from gpt4o-deploy", r
        r = azure_v1.responses.create(model="gpt-4o-mini", input="hi")
        assert r.output_text == "Hello from mini-v1", r

    def chat_on_a_v1_instance():
        r = oai.chat.completions.create(model="gpt-4o-mini", messages=msgs)
        assert r.choices[0].message.content == "Hello from mini-v1", r
        assert received[-1][:2] == ("west", "/openai/v1/chat/completions"), received[-1]

    def audio_transcription_upload():
        audio = b"ID3\x04\x00\x00\xff\xfb\x90\x00not really audio\x00"
        r = oai.audio.transcriptions.create(model="whisper", file=("a.mp3", audio, "audio/mpeg"))
        assert r.text == "transcribed by whisper-v1 on west", r
        assert received[-1][:2] == ("west", "/openai/v1/audio/transcriptions"), received[-1]

    def realtime_session():
        with oai.realtime.connect(model="gpt-realtime") as conn:
            assert conn.recv().type == "session.created"
            conn.session.update(session={"type": "realtime", "instructions": "be brief"})
            assert conn.recv().type == "session.updated"
            conn.response.create()
            done = conn.recv()
            assert done.type == "response.done", done
            assert done.response.usage.total_tokens == 30, done
        assert received[-1] == ("realtime", "/openai/v1/realtime?model=rt-v1", UPSTREAM_KEY), received[-1]

    checks = [chat, chat_stream, chat_stream_with_usage, completions, embeddings, models, unknown_model,
              azure_chat, azure_chat_stream, azure_embeddings, upstream_got_the_instance_api_version,
              responses_plain, responses_streamed, responses_follow_ups_stay_on_one_instance,
              azure_v1_base_url, chat_on_a_v1_instance, audio_transcription_upload,
              realtime_session]
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
        east.shutdown()
        west.shutdown()
        realtime.shutdown()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
