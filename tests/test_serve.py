"""`ferry serve`: every endpoint answers what the runtime computes in-process, concurrent requests
share backend calls, and every limit is a 4xx / 503 / 504 JSON error naming it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ferry.errors import FerryError
from ferry.runtime import load
from ferry.runtime.serve import QueueFull, RequestBatcher, ServeLimits, create_app

DATES = ["March 5, 2021", "12/25/2003", "5th of May, 1999", "Feb 3, 2025", "31st of July, 2008",
         "Saturday, April 26, 1969"]


def started(app) -> TestClient:
    """A client of `app` once its warm-up is done."""
    client = TestClient(app)
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load(tiny_bundle)


@pytest.fixture(scope="module")
def client(model):
    client = started(create_app(model, limits=ServeLimits(max_new_tokens=40,
                                                          max_input_tokens=24, max_inputs=8)))
    yield client
    client.__exit__(None, None, None)


def metric(client: TestClient, name: str) -> float:
    """The value of one unlabelled sample in /metrics."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


# ---------------------------------------------------------------- ferry's endpoints


def test_generate_answers_what_the_runtime_generates(client, model):
    for parameters in ({}, {"num_beams": 3, "length_penalty": 0.5},
                       {"do_sample": True, "seed": 3, "top_k": 5}):
        response = client.post("/generate", json={"inputs": DATES[:3], "parameters": parameters})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["outputs"] == model.generate(DATES[:3], **parameters), parameters
        assert body["finish_reasons"] == ["stop"] * 3
        assert body["usage"]["completion_tokens"] == sum(
            len(text) + 1 for text in body["outputs"])  # a token per character, and EOS
    capped = client.post("/generate", json={"inputs": DATES[0],
                                            "parameters": {"max_new_tokens": 4}}).json()
    assert capped["outputs"] == model.generate([DATES[0]], max_new_tokens=4)
    assert capped["finish_reasons"] == ["length"]
    several = client.post("/generate", json={"inputs": DATES[0], "parameters": {
        "num_beams": 3, "num_return_sequences": 2}}).json()
    assert several["outputs"] == model.generate(DATES[:1], num_beams=3, num_return_sequences=2)


def test_concurrent_requests_share_one_backend_call(model):
    client = started(create_app(model, limits=ServeLimits(max_wait_ms=500, max_batch=16)))
    try:
        before = metric(client, "ferry_batch_size_count")
        with ThreadPoolExecutor(len(DATES)) as pool:
            answers = list(pool.map(lambda text: client.post(
                "/generate", json={"inputs": text}).json()["outputs"][0], DATES))
        assert answers == model.generate(DATES)
        batches = metric(client, "ferry_batch_size_count") - before
        assert metric(client, "ferry_batch_size_sum") >= len(DATES)
        assert 1 <= batches < len(DATES), batches  # some requests rode along with others
    finally:
        client.__exit__(None, None, None)


def test_streamed_pieces_join_to_the_generated_text(client, model):
    response = client.post("/generate/stream", json={"inputs": DATES[1]})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response.text)
    assert data[-1] == "[DONE]" and len(data) > 3
    assert "".join(json.loads(d)["text"] for d in data[:-1]) == model.generate(DATES[1])[0]
    refused = client.post("/generate/stream", json={"inputs": DATES[1],
                                                    "parameters": {"num_beams": 2}})
    assert refused.status_code == 400 and "num_beams=1" in refused.json()["error"]["message"]


def test_concurrent_streams_share_one_generation(model):
    client = started(create_app(model, limits=ServeLimits(max_wait_ms=500, max_batch=16)))
    try:
        before = metric(client, "ferry_batch_size_count")
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda text: client.post(
                "/generate/stream", json={"inputs": text}).text, DATES[:4]))
        joined = ["".join(json.loads(d)["text"] for d in events(body)[:-1]) for body in bodies]
        assert joined == model.generate(DATES[:4])
        assert 1 <= metric(client, "ferry_batch_size_count") - before < 4
    finally:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------- OpenAI-style


def test_openai_completions_follow_the_openai_shape(client, model):
    body = client.post("/v1/completions", json={"model": "bundle", "prompt": DATES[:2],
                                                "temperature": 0, "max_tokens": 20}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["text"] for c in body["choices"]] == model.generate(DATES[:2], max_new_tokens=20)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                             + body["usage"]["completion_tokens"])
    sampled = client.post("/v1/completions", json={"prompt": DATES[0], "n": 3, "seed": 1,
                                                   "temperature": 0.7, "top_p": 0.9}).json()
    assert [c["text"] for c in sampled["choices"]] == model.generate(
        DATES[:1], do_sample=True, temperature=0.7, top_p=0.9, top_k=0, seed=1,
        num_return_sequences=3, max_new_tokens=16)[0]
    stream = client.post("/v1/completions", json={"prompt": DATES[2], "temperature": 0,
                                                  "stream": True})
    data = events(stream.text)
    assert data[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == \
        model.generate(DATES[2], max_new_tokens=16)[0]
    for refused in ({"logprobs": 2}, {"echo": True}, {"best_of": 2}, {"presence_penalty": 1},
                    {"suffix": "x"}, {"logit_bias": {"5": 1}}, {"functions": []}):
        response = client.post("/v1/completions", json={"prompt": DATES[0], **refused})
        assert response.status_code == 400, refused
        assert next(iter(refused)) in response.json()["error"]["message"]


def test_models_and_health_describe_the_bundle(client):
    assert client.get("/health").json() == {"status": "ok"}
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "bundle" and card["capabilities"] == ["generate"]
    assert card["architecture"] == "encoder-decoder" and card["backend"].startswith("onnxruntime")
    missing = client.post("/classify", json={"inputs": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"
    wrong = client.get("/generate")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["message"] == "Method Not Allowed"
    assert client.post("/generate", json={"inputs": DATES[0]}).headers["x-ferry-instance"]
    exposed = client.get("/metrics").text
    for counted in ('endpoint="/health",status="200"', 'endpoint="/generate",status="200"',
                    'endpoint="/generate",status="405"', 'endpoint="unrouted",status="404"'):
        assert "ferry_requests_total{" + counted + "}" in exposed, counted


def test_a_client_that_disconnects_lets_its_request_go(model, monkeypatch):
    """A non-streamed request whose client disconnects while it waits is abandoned (its rows
    leave the running batch, or are never computed) and nothing is sent."""
    import asyncio

    futures = []
    submit = RequestBatcher.submit
    monkeypatch.setattr(RequestBatcher, "submit", lambda self, key, inputs: futures.append(
        submit(self, key, inputs)) or futures[-1])
    app = create_app(model, limits=ServeLimits(max_new_tokens=100), warm_up=False)
    body = json.dumps({"inputs": DATES[0], "parameters": {
        "max_new_tokens": 100, "min_new_tokens": 100}}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/generate", "raw_path": b"/generate",
             "query_string": b"", "root_path": "", "headers": [], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 2)}
    sent = []

    async def scenario() -> None:
        left = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message) -> None:
            sent.append(message)

        async with app.router.lifespan_context(app):
            answering = asyncio.ensure_future(app(scope, receive, send))
            while not (futures and futures[0].running()):
                await asyncio.sleep(0.001)
            left.set()  # the client goes while its row is being decoded
            await asyncio.wait_for(answering, 30)

    asyncio.run(scenario())
    assert futures[0].abandoned and sent == []


def test_an_unexpected_failure_is_a_logged_json_500(model, monkeypatch, caplog):
    broken = load(model.bundle.path)

    def fail(*args, **kwargs):
        raise RuntimeError("no kernel for this CPU")

    broken.generate_ids = fail
    client = started(create_app(broken, limits=ServeLimits(continuous=False), warm_up=False))
    try:
        answer = client.post("/generate", json={"inputs": DATES[0]})
        assert answer.status_code == 500
        assert answer.json()["error"] == {
            "message": "internal error (RuntimeError); see the server's log",
            "type": "server_error", "code": 500}
        assert "no kernel for this CPU" in caplog.text
    finally:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize(("request_body", "status", "words"), [
    ({"inputs": DATES[0], "parameters": {"max_new_tokens": 41}}, 400, "max_new_tokens is 40"),
    ({"inputs": DATES[0], "parameters": {"max_length": 50}}, 400, "max_new_tokens is 40"),
    ({"inputs": DATES[0] * 5}, 400, "max_input_tokens is 24"),
    ({"inputs": [DATES[0]] * 9}, 400, "max_inputs is 8"),
    ({"inputs": DATES[0], "parameters": {"num_beam": 2}}, 400, "unknown generation argument"),
    ({"inputs": DATES[0], "parameters": {"top_k": -1}}, 400, "top_k"),
    ({"inputs": DATES[0], "parameters": {"diversity_penalty": 1.0}}, 400, "not supported"),
    ({"inputs": DATES[0], "extra": 1}, 400, "unknown field(s) ['extra']"),
    ({"inputs": [1, 2]}, 400, "inputs"),
    ({"inputs": DATES[0], "truncation": "yes"}, 400, "truncation"),
    ("x" * 2_000_000, 413, "max_body_bytes"),
])
def test_each_limit_is_a_json_error_naming_it(client, request_body, status, words):
    response = client.post("/generate", json=request_body)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


def test_truncation_lets_an_over_long_input_through(client, model):
    long_input = "Saturday, the 26th day of April in the year 1969 " * 3
    response = client.post("/generate", json={"inputs": long_input, "truncation": True})
    assert response.status_code == 200
    assert response.json()["outputs"] == model.generate(long_input, truncation=24)
    broken = client.post("/generate", content=b"{not json", headers={
        "content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_a_full_queue_is_503_with_retry_after_and_time_runs_out_as_504(model):
    client = started(create_app(model, limits=ServeLimits(max_queue=1, max_wait_ms=1500,
                                                          max_batch=8, timeout_s=5)))
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.post, "/generate", json={"inputs": DATES[0]})
            deadline = time.monotonic() + 5
            while metric(client, "ferry_queue_depth") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = client.post("/generate", json={"inputs": DATES[1]})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "busy" in refused.json()["error"]["message"]
            assert waiting.result().status_code == 200
    finally:
        client.__exit__(None, None, None)
    client = started(create_app(model, limits=ServeLimits(max_wait_ms=2000, timeout_s=0.2)))
    try:
        late = client.post("/generate", json={"inputs": DATES[0]})
        assert late.status_code == 504 and "timeout_s" in late.json()["error"]["message"]
    finally:
        client.__exit__(None, None, None)


def test_an_api_key_guards_everything_but_the_probes(model):
    client = started(create_app(model, limits=ServeLimits(api_key="s3cret"), warm_up=False))
    try:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post("/generate", json={"inputs": DATES[0]}, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/metrics").status_code == 401
        ok = client.post("/generate", json={"inputs": DATES[0]},
                         headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    finally:
        client.__exit__(None, None, None)
    with pytest.raises(FerryError, match="max_batch must be ≥ 1"):
        ServeLimits(max_batch=0)


# ---------------------------------------------------------------- task bundles


def test_task_endpoints_answer_what_the_task_model_answers(task_bundles):
    texts = ["Load the bundle and run it.", "Returns the sum.", "Export every graph."]
    for endpoint, bundle in task_bundles.items():
        model = load(bundle)
        client = started(create_app(model, limits=ServeLimits(max_wait_ms=50)))
        try:
            assert client.get("/v1/models").json()["data"][0]["capabilities"] == [endpoint]
            assert client.post("/generate", json={"inputs": "x"}).status_code == 404
            if endpoint == "answer":
                body = {"questions": ["What runs?"] * 3, "contexts": texts}
                expected = model.answer(body["questions"], texts)
            else:
                body = {"inputs": texts}
                expected = getattr(model, endpoint)(texts)
            with ThreadPoolExecutor(2) as pool:  # two clients, possibly one batch
                answers = [pool.submit(client.post, f"/{endpoint}", json=body) for _ in "ab"]
                answers = [answer.result() for answer in answers]
            for response in answers:
                assert response.status_code == 200, response.text
                assert response.json()["results"] == json.loads(json.dumps(expected))
        finally:
            client.__exit__(None, None, None)


# ---------------------------------------------------------------- the batcher itself


def test_the_batcher_groups_by_key_drops_cancelled_requests_and_isolates_a_bad_input():
    calls: list[tuple] = []
    release = threading.Event()

    def run(key, inputs):
        release.wait(5)
        calls.append((key, list(inputs)))
        if "bad" in inputs:
            raise FerryError("bad input")
        return [f"{key}:{x}" for x in inputs]

    batcher = RequestBatcher(run, max_batch=4, max_wait_ms=200, max_queue=6)
    try:
        a = batcher.submit("k", ["a1", "a2"])
        b = batcher.submit("j", ["b"])
        c = batcher.submit("k", ["c"])
        gone = batcher.submit("k", ["gone"])
        assert gone.cancel()  # its client left before the batch ran
        with pytest.raises(QueueFull):
            batcher.submit("k", ["x", "y", "z"])  # 4 waiting + 3 > 6
        release.set()
        assert a.result(5) == ["k:a1", "k:a2"] and c.result(5) == ["k:c"]
        assert b.result(5) == ["j:b"]
        assert calls[:2] == [("k", ["a1", "a2", "c"]), ("j", ["b"])]
        good, bad = batcher.submit("k", ["fine"]), batcher.submit("k", ["bad"])
        assert good.result(5) == ["k:fine"]  # its batch failed for the other's input: rerun
        with pytest.raises(FerryError, match="bad input"):
            bad.result(5)
    finally:
        batcher.close(5)
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit("k", ["late"])


def test_after_a_batch_ends_the_next_waits_for_its_clients_to_come_back():
    """Closed-loop clients come back one by one after their answers: the next batch takes all
    of them (not the first few, which would split the clients into two alternating batches),
    and a request nobody follows waits only a bounded share of the last batch's run time."""
    sizes: list[int] = []

    def run(key, inputs):
        sizes.append(len(inputs))
        time.sleep(0.4)  # a long batch: its refill time is 0.1 s
        return list(inputs)

    batcher = RequestBatcher(run, max_batch=8, max_wait_ms=5, max_queue=64)
    try:
        first = [batcher.submit("k", [f"a{i}"]) for i in range(4)]
        for future in first:
            future.result(5)
        successors = []
        for i in range(4):  # each 10 ms after the last: more than max_wait_ms apart at first
            time.sleep(0.01 if i else 0.015)
            successors.append(batcher.submit("k", [f"b{i}"]))
        for future in successors:
            future.result(5)
        assert sizes == [4, 4]
        time.sleep(0.2)  # the refill time is over: a lone request waits max_wait_ms only
        started = time.monotonic()
        batcher.submit("k", ["c"]).result(5)
        assert sizes == [4, 4, 1] and time.monotonic() - started < 0.4 + 0.09
    finally:
        batcher.close(5)


def test_requests_ending_inside_a_continuous_batch_rejoin_it_together():
    """The successors of requests that end inside a running continuous batch join it as one
    group once all are back (not one by one as they come: that would split the clients into
    ever more groups); one that never comes is waited for a bounded time only."""
    joins: list[list[str]] = []
    step_s = 0.02

    def run_continuous(key, admissions):
        running: list[list] = []  # [request, steps left] (its input names them: "a0:10")
        while True:
            group = admissions.take(4 - len(running), len(running))
            if group:
                joins.append([r.inputs[0].split(":")[0] for r in group])
            running += [[r, int(r.inputs[0].split(":")[1])] for r in group]
            if not running:
                return
            time.sleep(step_s)
            for row in running:
                row[1] -= 1
                if not row[1]:
                    row[0].resolve(list(row[0].inputs))
            running = [row for row in running if row[1]]

    batcher = RequestBatcher(lambda key, inputs: inputs, max_batch=4, max_wait_ms=5,
                             max_queue=64, max_join_wait_ms=10_000, continuous=lambda key: True,
                             run_continuous=run_continuous)
    try:
        first = [batcher.submit("k", [f"a{i}:{n}"]) for i, n in enumerate((10, 10, 40, 40))]
        first[0].result(5)  # a0 and a1 ran ~0.2 s: their successors are waited for ~50 ms
        time.sleep(0.005)
        b0 = batcher.submit("k", ["b0:5"])
        time.sleep(0.02)  # b0 alone would have made JOIN_SHARE of the two running rows
        b1 = batcher.submit("k", ["b1:5"])
        b0.result(5), b1.result(5)
        time.sleep(0.04)  # b1's successor never comes; b0's comes after the wait (~25 ms)
        batcher.submit("k", ["c0:2"]).result(5)
        assert not first[2].done()  # c0 joined the running batch, not after it
        first[2].result(5)
        assert joins == [["a0", "a1", "a2", "a3"], ["b0", "b1"], ["c0"]]
    finally:
        batcher.close(5)


# ---------------------------------------------------------------- the command


def test_ferry_serve_answers_over_http_and_drains_on_sigterm(tiny_bundle):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "ferry", "serve", str(tiny_bundle), "--port", str(port),
         "--max-wait-ms", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "FERRY_API_KEY": "k"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "ferry serve never became ready"
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{base}/generate", data=json.dumps({"inputs": DATES[0]}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer k"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["outputs"] == load(tiny_bundle).generate(
                DATES[:1])
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    # uvicorn drains, then re-raises the signal it caught (exit status -SIGTERM)
    assert server.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output, output


def test_ferry_serve_refuses_a_missing_bundle_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ferry", "serve", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")
    assert not Path(tmp_path / "none").exists()


def test_a_decoder_only_language_model_generates_and_classifies_from_a_prompt(modern_bundle):
    model = load(modern_bundle("llama"))
    client = started(create_app(model, limits=ServeLimits(max_wait_ms=50)))
    try:
        assert client.get("/v1/models").json()["data"][0]["capabilities"] == [
            "generate", "classify"]
        prompts = ["Returns the sum of", "Load the checkpoint and"]
        body = client.post("/generate", json={"inputs": prompts,
                                              "parameters": {"max_new_tokens": 6}}).json()
        assert body["outputs"] == model.generate(prompts, max_new_tokens=6)
        generator = model.as_generator()
        ids = generator.generate_ids(*generator.codec.encode(prompts), max_new_tokens=6)
        assert body["finish_reasons"] == [
            "stop" if generator.special.eos in row else "length" for row in ids.tolist()]
        request = {"inputs": prompts, "prompt": "{text} It is {label}.", "labels": ["a", "b"]}
        results = client.post("/classify", json=request).json()["results"]
        assert results == json.loads(json.dumps(model.classify(
            prompts, prompt=request["prompt"], labels=request["labels"])))
    finally:
        client.__exit__(None, None, None)


def test_a_failed_warm_up_keeps_the_server_unready_and_says_why(tiny_bundle):
    broken = load(tiny_bundle)

    def fail(*args, **kwargs):
        raise RuntimeError("no kernel for this CPU")

    broken.generate_ids = fail
    with TestClient(create_app(broken)) as client:
        deadline = time.monotonic() + 30
        while "failed" not in (answer := client.get("/ready")).text:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.02)
        assert answer.status_code == 503
        assert "no kernel for this CPU" in answer.json()["error"]["message"]
        assert client.get("/health").status_code == 200
