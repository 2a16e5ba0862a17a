"""The server through a real client: uvicorn on a loopback port, driven by httpx.

JSON-RPC at /rpc (results, batches, every error code), the bearer token, the Host and Origin
checks, bounded bodies, and /healthz. Events, metrics and the CLI have their own files.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from click.testing import CliRunner
from helpers import open_runtime, sim_spec
from serving import AUTH, TOKEN, result, rpc, served, spec_json

from flowactors import JobStatus
from flowactors.cli import main
from flowactors.server import rpc as codes

pytestmark = pytest.mark.timeout(90)



def long_spec() -> dict:
    """A job that runs for about a minute: time enough to pause it."""
    return spec_json(sim_spec(n_iterations=1000, task_options={"rollout_seconds": 0.05}))


def head(rt) -> int:
    return rt.store.head()[0]


def cli_json(*args: str) -> object:
    out = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return out.stdout


def test_results_are_the_json_the_cli_prints(rt, tmp_path):
    """start_grpo, get_status, list_jobs, checkpoints and history answer exactly what
    `flowactors status|checkpoints|history --json` print for the same job."""
    db = str(tmp_path / "flow.db")
    with served(rt) as (_, client):
        started = result(client, "training.start_grpo", spec=spec_json(sim_spec()),
                         job_id="job-1")
        assert started["job_id"] == "job-1" and started["status"] in ("queued", "running")
        rt.wait("job-1", timeout=30)
        status = result(client, "training.get_status", job_id="job-1")
        assert status == json.loads(cli_json("status", "job-1", "--db", db))
        assert status["status"] == "completed" and status["progress"]["current_iteration"] == 5
        whole_log = json.loads(cli_json("status", "--db", db))
        assert result(client, "training.list_jobs") == whole_log["jobs"]
        assert whole_log["owner"]["pid"] == os.getpid()  # the served runtime owns the log
        assert result(client, "training.list_jobs", status="running") == []
        assert result(client, "training.checkpoints", job_id="job-1") == \
            json.loads(cli_json("checkpoints", "job-1", "--db", db))
        history = result(client, "training.history", job_id="job-1")
        lines = cli_json("history", "job-1", "--db", db).splitlines()
        assert history == [json.loads(line) for line in lines]
        later = result(client, "training.history", job_id="job-1",
                       from_position=history[3]["position"], limit=2)
        assert later == history[3:5]


def test_start_is_idempotent_and_another_spec_is_a_conflict(rt):
    """The same job_id and spec return the same job and write nothing; the same id with
    another spec is a conflict (its own code) and writes nothing."""
    spec = long_spec()
    with served(rt) as (_, client):
        result(client, "training.start_grpo", spec=spec, job_id="same")
        rt.pause("same")
        before = head(rt)
        again = result(client, "training.start_grpo", spec=spec, job_id="same")
        assert again["job_id"] == "same" and again["status"] == "paused"
        other = dict(spec, agent_id="someone-else")
        answer = rpc(client, "training.start_grpo", spec=other, job_id="same")
        assert answer["error"]["code"] == codes.CONFLICT, answer
        assert head(rt) == before


@pytest.mark.parametrize("change, path", [
    ({"config": {"batch_size": 0}}, "$.spec.config.batch_size"),
    ({"training_data": [{"query": ""}]}, "$.spec.training_data[0].query"),
    ({"agent_id": 7}, "$.spec.agent_id"),
    ({"task": "no-such-task"}, "$.spec.task"),
    ({"task_options": {"rollout_seconds": -1}}, "$.spec.task_options.rollout_seconds"),
    ({"colour": "red"}, "$.spec"),
])
def test_a_bad_spec_names_its_field_path_and_writes_nothing(rt, change, path):
    """-32602 with the path of the bad field in `error.data.path`; the log is unchanged."""
    spec = {**spec_json(sim_spec()), **change}
    with served(rt) as (_, client):
        answer = rpc(client, "training.start_grpo", spec=spec, request_id="a")
        assert answer["id"] == "a"
        assert answer["error"]["code"] == codes.INVALID_PARAMS, answer
        assert answer["error"]["data"]["path"] == path, answer
        assert head(rt) == 0 and rt.jobs() == []


def test_each_error_code(rt):
    """Parse error, invalid request, unknown method, invalid params, job not found and
    invalid transition each come back as their JSON-RPC error object, with the id."""
    with served(rt) as (_, client):
        result(client, "training.start_grpo", spec=spec_json(sim_spec()), job_id="done")
        rt.wait("done", timeout=30)
        before = head(rt)

        def post(body: bytes) -> dict:
            response = client.post("/rpc", content=body,
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == 200
            return response.json()

        assert post(b'{"jsonrpc": "2.0", "id": 1, "method": ')["error"]["code"] == \
            codes.PARSE_ERROR
        assert post(b"\xff\xfe")["error"]["code"] == codes.PARSE_ERROR
        for bad in (b'{"jsonrpc": "1.0", "id": 2, "method": "training.list_jobs"}',
                    b'{"id": 2, "method": "training.list_jobs"}',
                    b'{"jsonrpc": "2.0", "id": 2, "method": 5}',
                    b'{"jsonrpc": "2.0", "id": 2, "method": "x", "extra": 1}', b"42"):
            answer = post(bad)
            assert answer["error"]["code"] == codes.INVALID_REQUEST, (bad, answer)
            assert answer["id"] == (2 if b'"id": 2' in bad else None)
        answer = rpc(client, "training.nothing", request_id=3)
        assert (answer["id"], answer["error"]["code"]) == (3, codes.METHOD_NOT_FOUND)
        positional = post(b'{"jsonrpc": "2.0", "id": 4, "method": "training.get_status", '
                          b'"params": ["done"]}')
        assert positional["error"]["code"] == codes.INVALID_PARAMS
        for params, where in (({}, "job_id"), ({"job_id": "done", "x": 1}, "x"),
                              ({"job_id": "../etc"}, "$.job_id")):
            answer = rpc(client, "training.get_status", **params)
            assert answer["error"]["code"] == codes.INVALID_PARAMS, answer
            assert where in answer["error"]["message"]
        answer = rpc(client, "training.list_jobs", status="sleeping")
        assert answer["error"]["data"]["path"] == "$.status"
        answer = rpc(client, "training.get_status", job_id="missing")
        assert answer["error"]["code"] == codes.JOB_NOT_FOUND and "missing" in \
            answer["error"]["message"]
        for method in ("training.pause", "training.resume", "training.cancel"):
            answer = rpc(client, method, job_id="done")
            assert answer["error"]["code"] == codes.INVALID_TRANSITION, answer
            assert answer["error"]["data"]["type"] == "InvalidTransition"
        assert rpc(client, "training.pause", job_id="missing")["error"]["code"] == \
            codes.JOB_NOT_FOUND
        assert head(rt) == before  # none of it wrote anything


def test_a_closed_log_is_log_unavailable(tmp_path, quiet_logs):
    """Once the runtime has closed its log, control calls answer `log unavailable` and the
    health check says 503."""
    runtime = open_runtime(tmp_path / "flow.db")
    try:
        with served(runtime) as (_, client):
            result(client, "training.start_grpo", spec=long_spec(),
                   job_id="j")
            assert client.get("/healthz").json() == {"status": "ok"}
            runtime.close()
            for method in ("training.pause", "training.cancel"):
                answer = rpc(client, method, job_id="j")
                assert answer["error"]["code"] == codes.LOG_UNAVAILABLE, answer
            answer = rpc(client, "training.start_grpo", spec=spec_json(sim_spec()))
            assert answer["error"]["code"] == codes.LOG_UNAVAILABLE, answer
            assert client.get("/healthz").status_code == 503
    finally:
        runtime.close()


def test_batches(rt):
    """A batch answers each request with an id, in order, and none of its notifications
    (which still run); a batch of notifications gets 204; an empty or oversized batch is one
    invalid-request error."""
    with served(rt) as (_, client):
        result(client, "training.start_grpo", spec=long_spec(),
               job_id="b")
        batch = [
            {"jsonrpc": "2.0", "id": "s", "method": "training.get_status",
             "params": {"job_id": "b"}},
            {"jsonrpc": "2.0", "method": "training.pause", "params": {"job_id": "b"}},
            {"jsonrpc": "2.0", "id": 7, "method": "training.get_status",
             "params": {"job_id": "nope"}},
            {"jsonrpc": "2.0", "id": 8},
            5,
        ]
        answers = client.post("/rpc", json=batch).json()
        assert [a["id"] for a in answers] == ["s", 7, 8, None]
        assert answers[0]["result"]["job_id"] == "b"
        assert [a["error"]["code"] for a in answers[1:]] == \
            [codes.JOB_NOT_FOUND, codes.INVALID_REQUEST, codes.INVALID_REQUEST]
        assert rt.status("b").status is JobStatus.PAUSED  # the notification ran
        only_notes = client.post("/rpc", json=[
            {"jsonrpc": "2.0", "method": "training.resume", "params": {"job_id": "b"}}])
        assert only_notes.status_code == 204 and only_notes.content == b""
        assert rt.status("b").status in (JobStatus.QUEUED, JobStatus.RUNNING)
        empty = client.post("/rpc", json=[]).json()
        assert empty["error"]["code"] == codes.INVALID_REQUEST
        huge = client.post("/rpc", json=[{"jsonrpc": "2.0", "id": i,
                                          "method": "training.list_jobs"}
                                         for i in range(codes.MAX_BATCH + 1)]).json()
        assert huge["error"]["code"] == codes.INVALID_REQUEST and "limit" in \
            huge["error"]["message"]


def test_every_request_needs_the_token(rt):
    """Without the token, with another one, or with it only in the URL, every data endpoint
    answers 401 and nothing is written; the dashboard's static shell needs none."""
    spec = {"jsonrpc": "2.0", "id": 1, "method": "training.start_grpo",
            "params": {"spec": spec_json(sim_spec())}}
    with served(rt) as (server, _):
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
                answer = client.post(f"/rpc?token={TOKEN}", json=spec)
                assert answer.status_code == 401, headers
                assert answer.json()["error"]["code"] == codes.INVALID_REQUEST
                assert answer.headers["www-authenticate"] == "Bearer"
                for path in ("/events", "/metrics", "/healthz", f"/events?token={TOKEN}"):
                    assert client.get(path).status_code == 401, (headers, path)
                assert client.get("/").status_code == 200
                assert client.get("/static/app.js").status_code == 200
        assert head(rt) == 0


def test_host_and_origin_are_checked(rt):
    """A Host that is not a loopback name (DNS rebinding) is refused with 400; a request from
    another origin with 403 and it changes nothing; the server's own origin is served."""
    with served(rt) as (server, client):
        result(client, "training.start_grpo", spec=long_spec(),
               job_id="o")
        pause = {"jsonrpc": "2.0", "id": 1, "method": "training.pause",
                 "params": {"job_id": "o"}}
        for host in ("evil.example", "evil.example:8600", "127.0.0.1.evil.example"):
            assert client.post("/rpc", json=pause, headers={"Host": host}).status_code == 400
            assert client.get("/", headers={"Host": host}).status_code == 400
        for origin in ("http://evil.example", f"http://evil.example:{server.port}", "null",
                       f"http://localhost:{server.port + 1}"):
            answer = client.post("/rpc", json=pause, headers={"Origin": origin})
            assert answer.status_code == 403, origin
            assert "cross-origin" in answer.json()["error"]["message"]
        assert rt.status("o").status is not JobStatus.PAUSED
        wrong_type = client.post("/rpc", content=json.dumps(pause),
                                 headers={"Content-Type": "text/plain"})
        assert wrong_type.status_code == 415
        assert rt.status("o").status is not JobStatus.PAUSED
        same = client.post("/rpc", json=pause, headers={"Origin": server.url})
        assert same.json()["result"]["status"] == "paused"
        for host in ("localhost", f"localhost:{server.port}", f"[::1]:{server.port}"):
            assert client.get("/healthz", headers={"Host": host}).status_code == 200


def test_oversized_bodies_are_refused_unread(rt):
    """A body over the limit gets 413 whether it declares its length or streams in chunks;
    nothing is written."""
    big_spec = spec_json(sim_spec())
    big_spec["training_data"] = [{"query": f"{i:02} " + "q" * 1000} for i in range(80)]  # ~90 kB
    request = {"jsonrpc": "2.0", "id": 1, "method": "training.start_grpo",
               "params": {"spec": big_spec}}
    body = json.dumps(request).encode()
    with served(rt, max_body_bytes=64 * 1024) as (_, client):
        declared = client.post("/rpc", content=body,
                               headers={"Content-Type": "application/json"})
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == codes.INVALID_REQUEST

        def chunks():
            for start in range(0, len(body), 8192):
                yield body[start:start + 8192]

        streamed = client.post("/rpc", content=chunks(),
                               headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert head(rt) == 0
        request["params"]["spec"]["training_data"] = big_spec["training_data"][:20]
        assert client.post("/rpc", json=request).json()["result"]["status"] == "queued"


def test_healthz_is_trivial(rt):
    """`/healthz` answers 200 {"status": "ok"} while the runtime is open."""
    with served(rt) as (_, client):
        answer = client.get("/healthz")
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}


def test_export_trajectories_and_lineage_are_the_cli_json(rt, tmp_path):
    """training.export_trajectories takes Runtime.trajectories' filters and answers what
    `flowactors trajectories --json` prints; get_status shows a fork's lineage."""
    db = str(tmp_path / "flow.db")
    with served(rt) as (_, client):
        result(client, "training.start_grpo", job_id="job-1",
               spec=spec_json(sim_spec(n_iterations=4, task_options={"failure_rate": 0.3})))
        rt.wait("job-1", timeout=30)
        failed = result(client, "training.export_trajectories", job_id="job-1", success=False)
        assert failed == json.loads(cli_json("trajectories", "job-1", "--failed", "--db", db))
        assert failed and all(not t["success"] for t in failed)
        second = result(client, "training.export_trajectories", job_id="job-1", iteration=2,
                        min_reward=0.0, limit=3)
        assert len(second) <= 3 and {t["iteration"] for t in second} == {2}
        assert all(t["reward"] >= 0.0 for t in second)
        bad = rpc(client, "training.export_trajectories", job_id="job-1", iteration=0)
        assert bad["error"]["code"] == codes.INVALID_PARAMS
        child = rt.fork("job-1", at_iteration=2, job_id="job-2")
        rt.wait(child, timeout=30)
        status = result(client, "training.get_status", job_id="job-2")
        assert status["forked_from"]["parent_id"] == "job-1"
        assert result(client, "training.get_status", job_id="job-1")["forks"] == [
            {"child_id": "job-2", "at_iteration": 2}]
