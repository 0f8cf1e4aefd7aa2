"""FakeKubernetes as a Kubernetes API stand-in: field-selected lists, watches with resourceVersions,
bookmarks, compaction (410) and selector transitions; bearer auth and RBAC; TokenRequest with the API
server's checks; OIDC discovery trusted by FakeGoogle; helpers; faults; the aiohttp app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE, WorkloadIdentityProvider
from metaemu.testing.fake_issuer import DISCOVERY_PATH, JWKS_PATH, FakeIssuer
from metaemu.testing.fake_kubernetes import AGENT_TOKEN, AGENT_USER, FakeKubernetes
from metaemu.transport import HttpRequest, HttpResponse, TransportFailure

BASE = "https://kubernetes.test"
AUTH = {"Authorization": f"Bearer {AGENT_TOKEN}"}
ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "//iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/pool/providers/kube"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def issuer_key() -> Any:
    from metaemu.testing.fake_google_tokens import new_rsa_key
    return new_rsa_key()


@pytest.fixture
def fake(clock: FakeClock, issuer_key: Any) -> FakeKubernetes:
    return FakeKubernetes(clock=clock, issuer=FakeIssuer(issuer=ISSUER, clock=clock, private_key=issuer_key))


async def get(fake: FakeKubernetes, path: str, *, headers: dict[str, str] | None = None,
              **query: str) -> HttpResponse:
    url = f"{BASE}{path}" + (f"?{urlencode(query)}" if query else "")
    return await fake.handle(HttpRequest(method="GET", url=url, headers=AUTH if headers is None else headers))


async def token_request(fake: FakeKubernetes, sa: str = "app", *, namespace: str = "apps",
                        spec: dict[str, Any] | None = None, raw: bytes | None = None) -> HttpResponse:
    url = f"{BASE}/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token"
    if raw is not None:
        return await fake.handle(HttpRequest(method="POST", url=url, headers=AUTH, body=raw))
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec or {}}
    return await fake.handle(HttpRequest.json(url, body, headers=AUTH))


def names(response: HttpResponse) -> list[str]:
    return [item["metadata"]["name"] for item in response.decoded()["items"]]


def bound(pod: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}


# -- lists -------------------------------------------------------------------------------------------


async def test_lists_pods_by_node_and_by_pod_ip(fake: FakeKubernetes) -> None:
    fake.add_pod("apps", "a", node="n1", ips=["10.0.0.1"])
    fake.add_pod("apps", "b", node="n2", ips=["10.0.0.2"])
    fake.add_pod("jobs", "c", node="n1", ips=["10.0.0.2"])
    assert names(await get(fake, "/api/v1/pods", fieldSelector="spec.nodeName=n1")) == ["a", "c"]
    both = await get(fake, "/api/v1/pods", fieldSelector="status.podIP=10.0.0.2,spec.nodeName=n1")
    assert names(both) == ["c"]
    assert names(await get(fake, "/api/v1/namespaces/apps/pods")) == ["a", "b"]
    assert names(await get(fake, "/api/v1/pods", fieldSelector="spec.nodeName!=n1")) == ["b"]


async def test_an_unsupported_field_selector_is_a_400(fake: FakeKubernetes) -> None:
    response = await get(fake, "/api/v1/pods", fieldSelector="spec.containers=x")
    assert response.status == 400
    assert response.decoded()["reason"] == "BadRequest"


async def test_resource_versions_grow_and_lists_carry_the_current_one(fake: FakeKubernetes) -> None:
    a = fake.add_pod("apps", "a", node="n1", ips=["10.0.0.1"])
    fake.set_phase("apps", "a", "Succeeded")
    listed = (await get(fake, "/api/v1/pods")).decoded()
    assert int(listed["items"][0]["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert listed["metadata"]["resourceVersion"] == str(fake.store.resource_version)


async def test_gets_pods_and_service_accounts(fake: FakeKubernetes) -> None:
    fake.add_service_account("apps", "app", annotations={"k": "v"}, uid="sa-1")
    sa = (await get(fake, "/api/v1/namespaces/apps/serviceaccounts/app")).decoded()
    assert (sa["metadata"]["uid"], sa["metadata"]["annotations"]) == ("sa-1", {"k": "v"})
    missing = await get(fake, "/api/v1/namespaces/apps/serviceaccounts/nope")
    assert (missing.status, missing.decoded()["reason"]) == (404, "NotFound")
    assert (await get(fake, "/api/v1/namespaces/apps/pods/nope")).status == 404


# -- watches -----------------------------------------------------------------------------------------


async def open_watch(fake: FakeKubernetes, **query: str) -> Any:
    url = f"{BASE}/api/v1/pods?{urlencode({'watch': '1', **query})}"
    return fake.open(HttpRequest(method="GET", url=url, headers=AUTH))


async def events(lines: AsyncIterator[bytes], count: int) -> list[tuple[str, str | None]]:
    got: list[tuple[str, str | None]] = []
    async for line in lines:
        event = json.loads(line)
        got.append((event["type"], event["object"].get("metadata", {}).get("name", event["object"].get("reason"))))
        if len(got) == count:
            break
    return got


async def test_watch_replays_history_after_a_resource_version_then_streams(fake: FakeKubernetes) -> None:
    fake.add_pod("apps", "before", node="n1", ips=["10.0.0.1"])
    rv = str(fake.store.resource_version)
    fake.add_pod("apps", "after", node="n1", ips=["10.0.0.2"])
    async with await open_watch(fake, resourceVersion=rv, fieldSelector="spec.nodeName=n1") as stream:
        assert stream.status == 200
        assert await events(stream.lines, 1) == [("ADDED", "after")]
        fake.delete_pod("apps", "before")
        assert await events(stream.lines, 1) == [("DELETED", "before")]
    assert fake.store.watch_count == 0


async def test_watch_without_a_resource_version_starts_with_added_events(fake: FakeKubernetes) -> None:
    fake.add_pod("apps", "a", node="n1", ips=["10.0.0.1"])
    async with await open_watch(fake) as stream:
        assert await events(stream.lines, 1) == [("ADDED", "a")]


async def test_watch_from_before_compaction_gets_a_410_error_event(fake: FakeKubernetes) -> None:
    fake.add_pod("apps", "a", node="n1", ips=["10.0.0.1"])
    fake.compact()
    async with await open_watch(fake, resourceVersion="1") as stream:
        line = await anext(stream.lines)
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")


async def test_watch_follows_objects_into_and_out_of_its_selector(fake: FakeKubernetes) -> None:
    obj = fake.add_pod("apps", "a", node="", ips=[])  # not scheduled yet
    async with await open_watch(fake, resourceVersion=str(fake.store.resource_version),
                                fieldSelector="spec.nodeName=n1") as stream:
        scheduled = json.loads(json.dumps(obj))
        scheduled["spec"]["nodeName"] = "n1"
        fake.store.put_pod(scheduled)
        assert await events(stream.lines, 1) == [("ADDED", "a")]
        fake.set_pod_ips("apps", "a", ["10.0.0.1"])
        assert await events(stream.lines, 1) == [("MODIFIED", "a")]
    async with await open_watch(fake, resourceVersion=str(fake.store.resource_version),
                                fieldSelector="status.podIP=10.0.0.1") as stream:
        fake.set_pod_ips("apps", "a", ["10.0.0.9"])
        assert await events(stream.lines, 1) == [("DELETED", "a")]


async def test_watch_ends_after_timeout_seconds_with_a_bookmark(fake: FakeKubernetes, clock: FakeClock) -> None:
    async with await open_watch(fake, resourceVersion="1", timeoutSeconds="30", allowWatchBookmarks="true") as stream:
        reading = asyncio.ensure_future(events(stream.lines, 5))
        await settle()
        clock.advance(30)
        assert await reading == [("BOOKMARK", None)]
    async with await open_watch(fake, resourceVersion="1", timeoutSeconds="30") as stream:
        reading = asyncio.ensure_future(events(stream.lines, 5))
        await settle()
        clock.advance(30)
        assert await reading == []


async def test_bookmarks_go_only_to_watches_that_asked(fake: FakeKubernetes) -> None:
    async with await open_watch(fake, resourceVersion="1", allowWatchBookmarks="true") as stream:
        fake.bookmark()
        line = json.loads(await anext(stream.lines))
    assert line == {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                                    "metadata": {"resourceVersion": str(fake.store.resource_version)}}}


async def test_paused_watches_receive_held_events_in_order_on_resume(fake: FakeKubernetes) -> None:
    async with await open_watch(fake, resourceVersion="1") as stream:
        fake.pause_watches()
        fake.add_pod("apps", "a", node="n1", ips=["10.0.0.1"])
        fake.delete_pod("apps", "a")
        reading = asyncio.ensure_future(events(stream.lines, 2))
        await settle()
        assert not reading.done()
        fake.resume_watches()
        assert await reading == [("ADDED", "a"), ("DELETED", "a")]


async def test_handle_reads_a_watch_whole(fake: FakeKubernetes, clock: FakeClock) -> None:
    fake.add_pod("apps", "a", node="n1", ips=["10.0.0.1"])
    reply = asyncio.ensure_future(get(fake, "/api/v1/pods", watch="1", resourceVersion="1", timeoutSeconds="5"))
    await settle()
    fake.add_pod("apps", "b", node="n1", ips=["10.0.0.2"])
    clock.advance(5)
    body = (await reply).body.decode().splitlines()
    assert [json.loads(line)["object"]["metadata"]["name"] for line in body] == ["a", "b"]


# -- authentication and RBAC -------------------------------------------------------------------------


async def test_requests_without_a_valid_bearer_token_get_401(fake: FakeKubernetes) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {AGENT_TOKEN}"}):
        response = await get(fake, "/api/v1/pods", headers=headers)
        assert (response.status, response.decoded()["reason"]) == (401, "Unauthorized")


async def test_rbac_denials_get_403_forbidden(fake: FakeKubernetes) -> None:
    fake.revoke(AGENT_TOKEN, "list pods")
    response = await get(fake, "/api/v1/pods")
    assert response.status == 403
    assert response.decoded()["message"] == f'pods is forbidden: User "{AGENT_USER}" cannot list resource "pods"'
    fake.add_user("viewer", "viewer", permissions={"list pods"})
    fake.add_pod("apps", "web", node="n1", ips=["10.0.0.1"])
    assert (await get(fake, "/api/v1/pods", headers={"Authorization": "Bearer viewer"})).status == 200
    denied = await fake.handle(HttpRequest.json(f"{BASE}/api/v1/namespaces/apps/serviceaccounts/default/token",
                                                {"kind": "TokenRequest"}, headers={"Authorization": "Bearer viewer"}))
    assert denied.status == 403


async def test_discovery_and_jwks_need_no_credentials(fake: FakeKubernetes) -> None:
    discovery = (await get(fake, DISCOVERY_PATH, headers={})).decoded()
    assert discovery["issuer"] == ISSUER
    assert (await get(fake, JWKS_PATH, headers={})).decoded() == fake.issuer.jwks()


async def test_unknown_paths_get_404(fake: FakeKubernetes) -> None:
    assert (await get(fake, "/api/v1/secrets")).status == 404


# -- TokenRequest ------------------------------------------------------------------------------------


async def test_token_request_mints_a_pod_bound_token(fake: FakeKubernetes, clock: FakeClock) -> None:
    fake.add_service_account("apps", "app", uid="sa-uid")
    pod = fake.add_pod("apps", "web", node="n1", ips=["10.0.0.1"], service_account="app")
    response = await token_request(fake, spec={"audiences": [AUDIENCE], "expirationSeconds": 3600,
                                               "boundObjectRef": bound(pod)})
    assert response.status == 201
    status = response.decoded()["status"]
    assert status["expirationTimestamp"] == "2026-11-22T06:00:00Z"
    claims = jwt.decode(status["token"], options={"verify_signature": False})
    assert claims["aud"] == [AUDIENCE]
    assert claims["sub"] == "system:serviceaccount:apps:app"
    assert claims["exp"] - claims["iat"] == 3600
    private = claims["kubernetes.io"]
    assert private["serviceaccount"] == {"name": "app", "uid": "sa-uid"}
    assert private["pod"] == {"name": "web", "uid": pod["metadata"]["uid"]}
    assert private["node"]["name"] == "n1"
    [recorded] = fake.token_requests
    assert (recorded.user, recorded.audiences, recorded.bound_uid, recorded.status) == (
        AGENT_USER, (AUDIENCE,), pod["metadata"]["uid"], 201)


async def test_token_lifetime_is_capped_by_the_server_maximum(fake: FakeKubernetes) -> None:
    fake.add_service_account("apps", "app")
    fake.max_token_lifetime_s = 900
    response = await token_request(fake, spec={"audiences": [AUDIENCE], "expirationSeconds": 7200})
    assert response.decoded()["status"]["expirationTimestamp"] == "2026-11-22T05:15:00Z"


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"audiences": [AUDIENCE], "expirationSeconds": 599}, "less than 10 minutes"),
    ({"audiences": [AUDIENCE], "expirationSeconds": (1 << 32) + 1}, "larger than 2^32"),
    ({"audiences": [AUDIENCE], "expirationSeconds": "3600"}, "must be an integer"),
    ({"audiences": []}, "at least one audience"),
    ({}, "at least one audience"),
    ({"audiences": [""]}, "at least one audience"),
    ({"audiences": [AUDIENCE], "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": "s"}},
     "Unsupported value"),
])
async def test_invalid_token_requests_get_422_with_a_status_body(fake: FakeKubernetes, spec: dict[str, Any],
                                                                 fragment: str) -> None:
    fake.add_service_account("apps", "app")
    response = await token_request(fake, spec=spec)
    body = response.decoded()
    assert (response.status, body["kind"], body["reason"], body["code"]) == (422, "Status", "Invalid", 422)
    assert fragment in body["message"]
    assert fake.token_requests[-1].status == 422


async def test_bound_object_checks_follow_the_api_server(fake: FakeKubernetes) -> None:
    fake.add_service_account("apps", "app")
    pod = fake.add_pod("apps", "web", node="n1", ips=["10.0.0.1"], service_account="app")
    other = fake.add_pod("apps", "db", node="n1", ips=["10.0.0.2"], service_account="db")
    missing = await token_request(fake, spec={"audiences": [AUDIENCE],
                                              "boundObjectRef": {**bound(pod), "name": "gone"}})
    assert (missing.status, missing.decoded()["reason"]) == (404, "NotFound")
    stale = await token_request(fake, spec={"audiences": [AUDIENCE], "boundObjectRef": {**bound(pod), "uid": "x"}})
    assert (stale.status, stale.decoded()["reason"]) == (409, "Conflict")
    foreign = await token_request(fake, spec={"audiences": [AUDIENCE], "boundObjectRef": bound(other)})
    assert (foreign.status, foreign.decoded()["reason"]) == (400, "BadRequest")
    assert "different serviceaccount" in foreign.decoded()["message"]


async def test_token_request_for_an_unknown_service_account_is_a_404(fake: FakeKubernetes) -> None:
    response = await token_request(fake, "ghost", spec={"audiences": [AUDIENCE]})
    assert (response.status, response.decoded()["reason"]) == (404, "NotFound")


async def test_a_malformed_token_request_is_a_400(fake: FakeKubernetes) -> None:
    fake.add_service_account("apps", "app")
    assert (await token_request(fake, raw=b"{not json")).status == 400
    assert (await token_request(fake, raw=b'{"kind": "Pod"}')).status == 400


async def test_google_sts_trusts_the_clusters_tokens(fake: FakeKubernetes, clock: FakeClock) -> None:
    jwks = (await get(fake, JWKS_PATH, headers={})).decoded()
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=jwks))
    pod = fake.add_pod("apps", "web", node="n1", ips=["10.0.0.1"], service_account="app")
    minted = await token_request(fake, spec={"audiences": [AUDIENCE], "boundObjectRef": bound(pod)})
    wrong = await token_request(fake, spec={"audiences": ["https://kubernetes.default.svc"]})

    async def exchange(subject: str) -> HttpResponse:
        return await google.handle(HttpRequest.form("https://sts.googleapis.com/v1/token", {
            "grant_type": GRANT_TYPE, "audience": AUDIENCE, "scope": "https://www.googleapis.com/auth/cloud-platform",
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "subject_token": subject}))

    accepted = await exchange(minted.decoded()["status"]["token"])
    assert accepted.status == 200
    info = google.token_info(accepted.decoded()["access_token"])
    assert info is not None
    assert info.principal.endswith("/subject/system:serviceaccount:apps:app")
    rejected = await exchange(wrong.decoded()["status"]["token"])
    assert rejected.status == 400


# -- helpers -----------------------------------------------------------------------------------------


async def test_delete_with_a_grace_period_first_marks_the_pod_terminating(fake: FakeKubernetes) -> None:
    fake.add_pod("apps", "web", node="n1", ips=["10.0.0.1"])
    fake.delete_pod("apps", "web", grace_period_s=30)
    meta = fake.store.pods[("apps", "web")]["metadata"]
    assert meta["deletionTimestamp"] == "2026-11-22T05:00:30Z"
    assert meta["deletionGracePeriodSeconds"] == 30
    fake.delete_pod("apps", "web", grace_period_s=30)  # already terminating: the second delete removes it
    assert ("apps", "web") not in fake.store.pods


async def test_add_pod_creates_its_service_account(fake: FakeKubernetes) -> None:
    fake.add_pod("apps", "web", node="n1", ips=["10.0.0.1", "fd00::1"], service_account="runner")
    assert ("apps", "runner") in fake.store.service_accounts
    status = fake.store.pods[("apps", "web")]["status"]
    assert status["podIP"] == "10.0.0.1"
    assert status["podIPs"] == [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]


async def test_annotate_sa_sets_and_removes_annotations(fake: FakeKubernetes) -> None:
    fake.add_service_account("apps", "app")
    fake.annotate_sa("apps", "app", "iam.gke.io/gcp-service-account", "a@p.iam.gserviceaccount.com")
    assert fake.store.service_accounts[("apps", "app")]["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "a@p.iam.gserviceaccount.com"}
    fake.annotate_sa("apps", "app", "iam.gke.io/gcp-service-account", None)
    assert fake.store.service_accounts[("apps", "app")]["metadata"]["annotations"] == {}


# -- faults ------------------------------------------------------------------------------------------


async def test_injected_failures_answer_once_each(fake: FakeKubernetes) -> None:
    fake.fail("list", status_code=500, times=2)
    assert [(await get(fake, "/api/v1/pods")).status for _ in range(3)] == [500, 500, 200]


async def test_a_stall_holds_requests_until_released(fake: FakeKubernetes) -> None:
    gate = fake.stall("list")
    pending = asyncio.ensure_future(get(fake, "/api/v1/pods"))
    await settle()
    assert not pending.done()
    gate.set()
    assert (await pending).status == 200


async def test_an_outage_refuses_connections_and_breaks_open_watches(fake: FakeKubernetes) -> None:
    async with await open_watch(fake, resourceVersion="1") as stream:
        reading = asyncio.ensure_future(anext(stream.lines))
        await settle()
        fake.outage()
        with pytest.raises(TransportFailure):
            await reading
    with pytest.raises(TransportFailure):
        await get(fake, "/api/v1/pods")
    fake.outage("error")
    assert (await get(fake, "/api/v1/pods")).status == 503
    fake.restore()
    assert (await get(fake, "/api/v1/pods")).status == 200


# -- the aiohttp app ---------------------------------------------------------------------------------


async def test_the_app_streams_watch_events_over_a_socket(fake: FakeKubernetes) -> None:
    async with TestServer(fake.app()) as server, aiohttp.ClientSession(headers=AUTH) as session:
        url = server.make_url("/api/v1/pods").with_query(watch="1", resourceVersion="1",
                                                         fieldSelector="spec.nodeName=n1")
        async with session.get(url) as response:
            assert response.status == 200
            fake.add_pod("apps", "web", node="n1", ips=["10.0.0.1"])
            line = await asyncio.wait_for(response.content.readline(), timeout=5)
            assert json.loads(line)["object"]["metadata"]["name"] == "web"
        async with session.get(server.make_url("/api/v1/pods")) as response:
            assert [p["metadata"]["name"] for p in (await response.json())["items"]] == ["web"]
        async with session.get(server.make_url(JWKS_PATH)) as response:
            assert await response.json() == fake.issuer.jwks()
