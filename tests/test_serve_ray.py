"""`ferry serve --ray`: the service's replicas on a local Ray Serve cluster answer like the
runtime, requests spread over the replicas, and losing a replica mid-load loses no request."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is the 'ferry[ray]' extra")

from ray import serve  # noqa: E402
from ray.exceptions import RayActorError  # noqa: E402

from ferry.runtime import load  # noqa: E402
from ferry.runtime.serve import ServeLimits  # noqa: E402
from ferry.runtime.serve.ray_app import Resender, ray_application  # noqa: E402

DATES = [f"{month} {day}, {1990 + day}" for month in ("March", "July") for day in range(1, 13)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ferry_serve_ray_serves_until_interrupted(tiny_bundle):
    """The command: a local Ray cluster, one replica behind Ray's proxy, gone on SIGINT.
    (First in this file: it runs before the module's own cluster starts.)"""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ferry", "serve", str(tiny_bundle),
                               "--ray", "--replicas", "1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              # Ctrl-C reaches it as in a terminal, even when this test run was
                              # started in the background (which ignores SIGINT in children)
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "ferry serve --ray never became ready"
                time.sleep(0.5)
        status, text, _, _ = generate(f"http://127.0.0.1:{port}", DATES[0])
        assert (status, text) == (200, load(tiny_bundle).generate(DATES[:1])[0])
    finally:
        server.send_signal(signal.SIGINT)
        stderr = server.communicate(timeout=60)[1]
    assert server.returncode == 0, stderr[-3000:]


def test_replicas_and_autoscale_need_ray(tiny_bundle):
    result = subprocess.run([sys.executable, "-m", "ferry", "serve", str(tiny_bundle),
                             "--replicas", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "need --ray" in result.stderr


@pytest.fixture(scope="module")
def cluster(tiny_bundle):
    """Two replicas of the tiny bundle's service behind Ray's proxy; yields its base URL."""
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_application(tiny_bundle, num_replicas=2,
                                  limits=ServeLimits(max_wait_ms=20),
                                  ray_actor_options={"num_cpus": 0.5}), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def generate(base: str, text: str, **parameters) -> tuple[int, str, str]:
    """(status, the first output or the error body, the answering instance, how often the
    router sent it again)."""
    request = urllib.request.Request(f"{base}/generate", data=json.dumps({
        "inputs": text, "parameters": parameters}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return (response.status, json.loads(response.read())["outputs"][0],
                    response.headers["x-ferry-instance"],
                    int(response.headers.get("x-ferry-resent", 0)))
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), "", 0


def test_requests_spread_over_the_replicas_and_answer_like_the_runtime(cluster, tiny_bundle):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda text: generate(cluster, text), DATES))
    assert [status for status, *_ in answers] == [200] * len(DATES)
    assert [text for _, text, *_ in answers] == load(tiny_bundle).generate(DATES)
    assert len({instance for _, _, instance, _ in answers}) == 2, answers


def test_a_replica_killed_mid_load_loses_no_request(cluster, tiny_bundle):
    """Every request is answered, correctly, though a replica dies under load: the router (or
    Ray's own routing, for requests not yet accepted) sends the dying replica's requests to
    the other one; every request sent after the loss is answered too. (`Resender`'s tests
    below pin down the resending itself, which the timing here may or may not exercise.)"""
    replicas = [actor for actor in ray.util.list_named_actors(all_namespaces=True)
                if actor["name"].startswith("SERVE_REPLICA") and "#ferry-model#" in actor["name"]]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    texts, forced = DATES * 3, {"max_new_tokens": 48, "min_new_tokens": 48}
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(generate, cluster, text, **forced) for text in texts]
        while sum(future.done() for future in pending) < 8:
            time.sleep(0.01)
        ray.kill(victim)  # Ray Serve starts another in its place
        answers = [future.result() for future in pending]
    assert [(status, text) for status, text, *_ in answers] == [
        (200, text) for text in load(tiny_bundle).generate(texts, **forced)]
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda text: generate(cluster, text), DATES))
    assert [(status, text) for status, text, *_ in after] == [
        (200, text) for text in load(tiny_bundle).generate(DATES)]


def replicas_that(*scripts):
    """A `Resender.send` whose n-th call answers by the n-th script: its items in turn, an
    exception raised where one stands (the replica died there)."""
    calls = iter(scripts)

    def send(message):
        script = next(calls)

        async def answer():
            for item in script:
                if isinstance(item, BaseException):
                    raise item
                yield item

        return answer()

    return send


def relayed(resender: Resender) -> tuple[int, bytes]:
    """(how often the request was sent again before its start, the body the client gets)."""
    message = {"method": "POST", "path": "/generate/stream"}

    async def run():
        responses, _, attempt = await resender.start(message)
        return attempt, b"".join([chunk async for chunk in resender.body(
            message, responses, attempt)])

    return asyncio.run(run())


START = {"status": 200, "headers": []}


def test_the_router_resends_a_request_whose_replica_died():
    died = RayActorError()
    # before answering, twice: the third replica answers
    assert relayed(Resender(replicas_that([died], [died], [START, b"done"]), delay_s=0)) == (
        2, b"done")
    # part-way through a stream: the rest from the next replica, past what was sent
    pieces = [b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"]
    assert relayed(Resender(replicas_that([START, pieces[0], died], [START, *pieces]),
                            delay_s=0)) == (0, b"".join(pieces))
    # a resent answer that differs (sampling) ends the body where they part
    assert relayed(Resender(replicas_that([START, pieces[0], died],
                                          [START, b"data: x\n\n", pieces[1]]),
                            delay_s=0)) == (0, pieces[0])
    # the retries spent: the error
    with pytest.raises(RayActorError):
        relayed(Resender(replicas_that([died], [died]), retries=1, delay_s=0))


def test_ray_data_maps_a_dataset_through_the_bundle(cluster, tiny_bundle, task_bundles):
    """Offline on the cluster: one loaded model per actor, two actors, results in order."""
    from ferry.runtime.serve.ray_data import infer_dataset

    dataset = ray.data.from_items([{"text": text} for text in DATES])
    rows = infer_dataset(dataset, tiny_bundle, "generate", batch_size=5, concurrency=2,
                         num_cpus=0.25, max_new_tokens=12).take_all()
    assert {row["text"]: row["output"] for row in rows} == dict(zip(
        DATES, load(tiny_bundle).generate(DATES, max_new_tokens=12)))
    texts = ["Load the bundle and run it.", "Returns the sum."]
    rows = infer_dataset(ray.data.from_items([{"text": t} for t in texts]),
                         task_bundles["classify"], "classify", num_cpus=0.25).take_all()
    expected = load(task_bundles["classify"]).classify(texts)
    assert {row["text"]: row["label"] for row in rows} == {
        text: result["label"] for text, result in zip(texts, expected)}
