"""The metadata HTTP API against a running metaemu, checklist by checklist (gce-metadata.md IDs in
test names; security.md SEC-xx where they apply)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import aiohttp
import jwt
import pytest

from metaemu.server.runner import MetaemuServer
from metaemu.testing.world import CLUSTER_ISSUER, PROJECT_ID, SERVICE_ACCOUNT, World
from tests.helpers import SA_PATH, Mds, assert_no_jwt_from, running_server, sample

V1 = "/computeMetadata/v1/"


@pytest.fixture(params=["gke", "gce"])
def profile(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def api(world: World, profile: str) -> AsyncIterator[tuple[MetaemuServer, Mds]]:
    async with running_server(world, profile=profile) as server:
        mds = Mds(server.metadata_url)
        try:
            yield server, mds
        finally:
            await mds.close()


@pytest.fixture
async def gke(world: World) -> AsyncIterator[tuple[MetaemuServer, Mds]]:
    async with running_server(world, profile="gke") as server:
        mds = Mds(server.metadata_url)
        yield server, mds
        await mds.close()


@pytest.fixture
async def gce(world: World) -> AsyncIterator[tuple[MetaemuServer, Mds]]:
    async with running_server(world, profile="gce", instance={"name": "vm-1", "zone": "us-central1-a",
                                                              "tags": ["a", "b"]}) as server:
        mds = Mds(server.metadata_url)
        yield server, mds
        await mds.close()


# ---------------------------------------------------------------- root, discovery, redirects


async def test_root01_root_answers_200_without_the_header(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    r = await mds.get("/", flavor=False)
    assert (r.status, r.text) == (200, "computeMetadata/\n")
    assert r.headers["Content-Type"] == "application/text"
    assert r.headers["Metadata-Flavor"] == "Google"


async def test_root07_root08_discovery_listings(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    assert (await mds.get("/computeMetadata/")).text == "v1/\n"
    assert (await mds.get(V1)).text == "instance/\nproject/\nuniverse/\n"
    r = await mds.get("/computeMetadata")
    assert (r.status, r.headers["Location"]) == (301, "/computeMetadata/")


async def test_r08_r09_directory_without_slash_redirects_keeping_the_query(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    r = await mds.get(V1 + "instance")
    assert (r.status, r.headers["Location"]) == (301, V1 + "instance/")
    assert r.headers["Metadata-Flavor"] == "Google"
    r = await mds.get(V1 + "instance/service-accounts/default?recursive=true")
    assert r.headers["Location"] == SA_PATH + "?recursive=true"


async def test_r10_leaf_with_trailing_slash_is_404_and_slashed_dirs_never_redirect(
        api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    assert (await mds.get(SA_PATH + "token/")).status == 404
    assert (await mds.get(V1 + "project/project-id/")).status == 404
    assert (await mds.get(V1 + "instance/service-accounts/")).status == 200  # gcloud follows a 301 into '//'


async def test_r11_empty_segments_are_ignored(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    r = await mds.get("/computeMetadata/v1/project//project-id")
    assert (r.status, r.text) == (200, PROJECT_ID)


# ---------------------------------------------------------------- request rules


async def test_r02_gce_missing_flavor_is_google_403_page(gce: tuple[MetaemuServer, Mds]) -> None:
    server, mds = gce
    path = "/computeMetadata/v1/instance/name"
    r = await mds.get(path, flavor=False)
    assert r.status == 403
    assert r.headers["Content-Type"] == "text/html; charset=UTF-8"
    assert len(r.body) == 1616 + len(path) == 1649  # the real Content-Length (S4)
    assert b"Missing Metadata-Flavor:Google header." in r.body
    assert r.headers["Metadata-Flavor"] == "Google"
    assert r.headers["Server"] == "Metadata Server for VM"
    assert sample(server.metrics, "metaemu_blocked_requests_total", reason="metadata_flavor") == 1


async def test_r03_sec17_gke_missing_flavor_body_is_exact_and_holds_no_metadata(gke: tuple[MetaemuServer, Mds]) -> None:
    _, mds = gke
    r = await mds.get(SA_PATH + "token", flavor=False)
    assert r.status == 403
    assert r.body == b'GKE Metadata Server encountered an error: Missing required header "Metadata-Flavor": "Google"\n'
    assert len(r.body) == 94
    assert b"access_token" not in r.body  # SEC-17: no metadata in the body


async def test_r04_wrong_flavor_value_is_403(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    r = await mds.get(V1 + "project/project-id", headers={"Metadata-Flavor": "google"})
    assert r.status == 403


async def test_r05_legacy_header_accepted_on_gce_only(gce: tuple[MetaemuServer, Mds], world: World) -> None:
    _, mds = gce
    r = await mds.get(V1 + "project/project-id", flavor=False, headers={"X-Google-Metadata-Request": "True"})
    assert r.status == 200
    async with running_server(world, profile="gke") as server:
        gke_mds = Mds(server.metadata_url)
        r = await gke_mds.get(V1 + "project/project-id", flavor=False, headers={"X-Google-Metadata-Request": "True"})
        await gke_mds.close()
    assert r.status == 403


@pytest.mark.parametrize("header", ["X-Forwarded-For", "x-forwarded-for", "X-FORWARDED-FOR"])
@pytest.mark.parametrize("value", ["", "10.0.0.1", "1.2.3.4, 5.6.7.8"])
async def test_r06_sec18_any_x_forwarded_for_is_refused(gke: tuple[MetaemuServer, Mds], header: str,
                                                        value: str) -> None:
    server, mds = gke
    r = await mds.get(SA_PATH + "token", headers={header: value})
    assert r.status == 403
    assert b"X-Forwarded-For" in r.body
    assert b"access_token" not in r.body
    assert sample(server.metrics, "metaemu_blocked_requests_total", reason="xff") == 1


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"])
async def test_r12_sec23_non_get_methods_are_405(gke: tuple[MetaemuServer, Mds], method: str) -> None:
    server, mds = gke
    r = await mds.get(SA_PATH + "token", method=method)
    assert r.status == 405
    assert r.headers["Allow"] == "GET"
    assert sample(server.metrics, "metaemu_blocked_requests_total", reason="method") == 1


async def test_sec22_foreign_host_header_is_refused(gke: tuple[MetaemuServer, Mds]) -> None:
    server, mds = gke
    r = await mds.get(SA_PATH + "token", headers={"Host": "attacker.example:8080"})
    assert r.status == 403
    assert b"access_token" not in r.body
    assert (await mds.get(SA_PATH + "email", headers={"Host": "metadata.google.internal"})).status == 200
    assert (await mds.get(SA_PATH + "email", headers={"Host": "169.254.169.254"})).status == 200
    assert sample(server.metrics, "metaemu_blocked_requests_total", reason="host") == 1


@pytest.mark.parametrize("path", [
    "/computeMetadata/v1/instance/attributes/kube-env",
    "/computeMetadata/v1/instance/attributes/%6bube-env",
    "/computeMetadata/v1/./instance/../instance/attributes/kube-env",
    "/computeMetadata/v1beta1/instance/service-accounts/default/token",
    "/0.1/meta-data/service-accounts/default/acquire",
    "/COMPUTEMETADATA/V1/instance/service-accounts/default/token",
    "/computeMetadata/v1/instance/service-accounts/default/token;x=1",
    "/metrics", "/healthz", "/readyz", "/debug/pprof/", "/computeMetadata/v1/../../metrics",
])
async def test_sec19_sec20_sec32_other_spellings_and_admin_paths_are_local_404s(
        gke: tuple[MetaemuServer, Mds], path: str) -> None:
    _, mds = gke
    r = await mds.get(path)
    assert r.status == 404
    assert r.body == b"Not Found\n"


@pytest.mark.parametrize("path", [
    "/computeMetadata/v1/instance/service-accounts/default/%74oken",
    "/computeMetadata/v1/instance%2Fservice-accounts%2Fdefault%2Ftoken",
    "/computeMetadata/v1/instance/service-accounts\\default\\token",
    "/computeMetadata/v1/project/../instance/service-accounts/default/token",
])
async def test_sec19_encoded_spellings_reach_only_what_the_canonical_path_reaches(
        gke: tuple[MetaemuServer, Mds], path: str) -> None:
    _, mds = gke
    canonical = await mds.get(SA_PATH + "token")
    r = await mds.get(path)
    assert r.status == canonical.status == 200
    assert json.loads(r.body)["access_token"] == json.loads(canonical.body)["access_token"]


async def test_sec19_encoded_spellings_still_need_the_flavor_header(gke: tuple[MetaemuServer, Mds]) -> None:
    _, mds = gke
    for path in ("/%63omputeMetadata/v1/instance/service-accounts/default/token",
                 "//computeMetadata/v1/instance/service-accounts/default/token"):
        assert (await mds.get(path, flavor=False)).status == 403


# ---------------------------------------------------------------- headers and errors


async def test_hd01_hd03_hd04_headers_on_every_response(api: tuple[MetaemuServer, Mds], profile: str) -> None:
    _, mds = api
    server_name = {"gce": "Metadata Server for VM", "gke": "GKE Metadata Server"}[profile]
    for path, flavor in ((V1 + "project/project-id", True), (V1 + "nope", True), (V1 + "instance", True),
                         (SA_PATH + "token", False), (SA_PATH + "identity", True), (SA_PATH + "token", True)):
        r = await mds.get(path, flavor=flavor)
        assert r.headers["Metadata-Flavor"] == "Google", path
        assert r.headers["Server"] == server_name, path
        assert ("X-XSS-Protection" in r.headers) == (profile == "gce")
        assert ("X-Frame-Options" in r.headers) == (profile == "gce")


async def test_err01_gce_404_is_google_page_of_exact_length(gce: tuple[MetaemuServer, Mds]) -> None:
    _, mds = gce
    path = "/computeMetadata/v1/universe/universe_domain"  # K-11: real GCE answers 404 here
    r = await mds.get(path)
    assert r.status == 404
    assert r.headers["Content-Type"] == "text/html; charset=UTF-8"
    assert len(r.body) == 1604  # the real server's Content-Length (I5)
    assert r.text.startswith("<!DOCTYPE html>\n<html lang=en>\n")


async def test_err02_gke_404_body(gke: tuple[MetaemuServer, Mds]) -> None:
    _, mds = gke
    r = await mds.get(V1 + "instance/name")  # K-06: not on GKE
    assert (r.status, r.body) == (404, b"Not Found\n")


# ---------------------------------------------------------------- keys and renderings


async def test_k01_k02_k03_k04_k10_project_instance_universe(api: tuple[MetaemuServer, Mds]) -> None:
    server, mds = api
    assert (await mds.get(V1 + "project/project-id")).text == PROJECT_ID
    numeric = await mds.get(V1 + "project/numeric-project-id")
    assert numeric.text == "123456789012" and numeric.text.isdigit()
    assert (await mds.get(V1 + "instance/id")).text == server.config.instance.id
    assert (await mds.get(V1 + "instance/zone")).text == "projects/123456789012/zones/us-central1-a"
    assert (await mds.get(V1 + "instance/hostname")).text == server.config.instance.hostname
    universe = await mds.get(V1 + "universe/universe-domain")
    assert (universe.status, universe.text) == (200, "googleapis.com")


async def test_k14_gke_instance_surface_is_exact(gke: tuple[MetaemuServer, Mds]) -> None:
    _, mds = gke
    assert (await mds.get(V1 + "instance/")).text == "attributes/\nhostname\nid\nservice-accounts/\nzone\n"
    assert (await mds.get(V1 + "instance/attributes/")).text == "cluster-location\ncluster-name\n"
    assert (await mds.get(V1 + "instance/attributes/cluster-name")).text == "demo"
    assert (await mds.get(V1 + "project/")).text == "numeric-project-id\nproject-id\n"
    for hidden in ("instance/name", "instance/tags", "instance/network-interfaces/", "project/attributes/",
                   "instance/attributes/kube-env"):
        assert (await mds.get(V1 + hidden)).status == 404, hidden


async def test_k06_q09_gce_name_and_tags(gce: tuple[MetaemuServer, Mds]) -> None:
    _, mds = gce
    assert (await mds.get(V1 + "instance/name")).text == "vm-1"
    tags = await mds.get(V1 + "instance/tags")
    assert (tags.headers["Content-Type"], tags.text) == ("application/json", '["a","b"]')


async def test_sa01_sa02_sa03_sa04_account_keys(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    assert (await mds.get(V1 + "instance/service-accounts/")).text == f"default/\n{SERVICE_ACCOUNT}/\n"
    assert (await mds.get(SA_PATH)).text == "aliases\nemail\nidentity\nscopes\ntoken\n"
    email = await mds.get(SA_PATH + "email")
    assert (email.text, email.headers["Content-Type"]) == (SERVICE_ACCOUNT, "application/text")
    assert (await mds.get(SA_PATH + "aliases")).text == "default\n"
    scopes = "https://www.googleapis.com/auth/cloud-platform"
    assert (await mds.get(SA_PATH + "scopes")).text == scopes + "\n"
    as_json = await mds.get(SA_PATH + "scopes?alt=json")
    assert as_json.headers["Content-Type"] == "application/json"
    assert as_json.text == f'["{scopes}"]'


async def test_sa05_q04_recursive_account_json(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    one = await mds.get(SA_PATH + "?recursive=true")
    assert one.headers["Content-Type"] == "application/json"
    account = {"aliases": ["default"], "email": SERVICE_ACCOUNT,
               "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
    assert json.loads(one.body) == account
    every = await mds.get(V1 + "instance/service-accounts/?recursive=true")
    assert json.loads(every.body) == {SERVICE_ACCOUNT: account, "default": account}


async def test_q03_recursive_camel_cases_schema_keys_not_user_keys(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    r = await mds.get(V1 + "instance/?recursive=true")
    doc = json.loads(r.body)
    assert set(doc["serviceAccounts"]) == {"default", SERVICE_ACCOUNT}
    assert doc["attributes"] == {"cluster-location": "us-central1", "cluster-name": "demo"}
    assert "token" not in doc["serviceAccounts"]["default"] and "identity" not in doc["serviceAccounts"]["default"]
    project = json.loads((await mds.get(V1 + "project/?recursive=true")).body)
    assert project["numericProjectId"] == 123456789012  # numbers bare


async def test_q05_q06_q07_leaf_renderings_and_etags(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    plain = await mds.get(V1 + "project/numeric-project-id")
    as_json = await mds.get(V1 + "project/numeric-project-id?alt=json")
    recursive = await mds.get(V1 + "project/numeric-project-id?recursive=true")
    assert (as_json.text, as_json.headers["Content-Type"]) == ("123456789012", "application/json")
    assert (await mds.get(V1 + "project/project-id?alt=json")).text == f'"{PROJECT_ID}"'
    assert recursive.body == plain.body
    assert re.fullmatch(r"[0-9a-f]{16}", plain.headers["ETag"])  # HD-10
    assert plain.headers["ETag"] == as_json.headers["ETag"] == recursive.headers["ETag"]
    text = await mds.get(V1 + "instance/service-accounts/default/?recursive=true&alt=text")
    assert text.text == (f"aliases default\nemail {SERVICE_ACCOUNT}\n"
                         "scopes https://www.googleapis.com/auth/cloud-platform\n")


async def test_q08_q10_alt_or_wait_on_directory_needs_recursive(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    for query in ("alt=json", "alt=text", "wait_for_change=true"):
        assert (await mds.get(V1 + f"instance/?{query}")).status == 400, query
    assert (await mds.get(V1 + "project/project-id?alt=xml")).status == 400


async def test_q11_stale_last_etag_answers_at_once(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    r = await mds.get(V1 + "project/project-id?wait_for_change=true&last_etag=0")  # the docs sample's start
    assert (r.status, r.text) == (200, PROJECT_ID)
    r = await mds.get(V1 + "project/project-id?wait_for_change=true&timeout_sec=0")
    assert r.status == 200
    assert (await mds.get(V1 + "project/project-id?wait_for_change=true&timeout_sec=x")).status == 400


async def test_r13_r14_sec21_booleans_any_case_unknown_params_ignored(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    r = await mds.get(SA_PATH + "?recursive=True&foo=blah&bindCertificateFingerprint=x")
    assert json.loads(r.body)["email"] == SERVICE_ACCOUNT


# ---------------------------------------------------------------- token and identity


async def test_sa06_sa07_sa08_t01_token_body_shape(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    r = await mds.get(SA_PATH + "token")
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/json"  # HD-06: no charset
    assert re.fullmatch(rb'\{"access_token":"ya29\.[^"]+","expires_in":\d+,"token_type":"Bearer"\}', r.body)
    body = json.loads(r.body)
    assert isinstance(body["expires_in"], int)
    assert 3500 <= body["expires_in"] <= 3600


async def test_sa09_sa10_any_scopes_and_both_account_names(api: tuple[MetaemuServer, Mds], world: World) -> None:
    _, mds = api
    default = json.loads((await mds.get(SA_PATH + "token")).body)
    by_email = json.loads((await mds.get(f"{V1}instance/service-accounts/{SERVICE_ACCOUNT}/token")).body)
    assert by_email["access_token"] == default["access_token"]
    storage = "https://www.googleapis.com/auth/devstorage.read_only,https://www.googleapis.com/auth/userinfo.email"
    scoped = await mds.get(SA_PATH + "token?scopes=" + storage.replace(":", "%3A").replace("/", "%2F"))
    assert scoped.status == 200
    info = world.google.token_info(json.loads(scoped.body)["access_token"])
    assert info is not None and set(info.scopes) == set(storage.split(","))
    assert (await mds.get(SA_PATH + "token?scopes=")).status == 200


async def test_sa11_unknown_account_is_404(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    assert (await mds.get(V1 + "instance/service-accounts/other@x.iam.gserviceaccount.com/token")).status == 404


async def test_sa12_sa13_r15_identity_is_a_bare_jwt_for_the_raw_audience(api: tuple[MetaemuServer, Mds],
                                                                          world: World) -> None:
    _, mds = api
    for query, include_email in (("format=full&audience=https://example.test/aud", True),
                                 ("audience=https%3A%2F%2Fexample.test%2Faud&format=standard&licenses=FALSE", False),
                                 ("audience=https://example.test/aud&format=full&licenses=TRUE", True)):
        r = await mds.get(SA_PATH + "identity?" + query)
        assert r.status == 200, r.text
        assert r.headers["Content-Type"] == "application/text"
        key = jwt.PyJWKSet.from_dict(world.google.google_jwks()).keys[0]
        claims = jwt.decode(r.text, key, algorithms=["RS256"], audience="https://example.test/aud")
        assert ("email" in claims) == include_email
        assert claims["iss"] == "https://accounts.google.com"


async def test_sa14_identity_without_audience_is_400(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    for query in ("", "?audience=", "?format=full"):
        r = await mds.get(SA_PATH + "identity" + query)
        assert (r.status, r.body) == (400, b"non-empty audience parameter required\n")
    assert (await mds.get(SA_PATH + "identity?audience=a&format=weird")).status == 400


async def test_sec25_no_response_carries_the_kubernetes_token(api: tuple[MetaemuServer, Mds]) -> None:
    _, mds = api
    for path in ("token", "identity?audience=x", "?recursive=true", "email"):
        assert_no_jwt_from(CLUSTER_ISSUER, (await mds.get(SA_PATH + path)).text)


async def test_gke05_gke06_without_service_account(world: World) -> None:
    async with running_server(world, impersonate=False) as server:
        mds = Mds(server.metadata_url)
        try:
            pool = f"{PROJECT_ID}.svc.id.goog"
            assert (await mds.get(SA_PATH + "email")).text == pool
            assert (await mds.get(V1 + "instance/service-accounts/")).text == f"default/\n{pool}/\n"
            token = json.loads((await mds.get(SA_PATH + "token")).body)["access_token"]
            assert token.startswith("ya29.fed-")  # the federated STS token itself
            r = await mds.get(SA_PATH + "identity?audience=https://example.test/aud")
            assert r.status == 404
            assert b"workload_identity.service_account" in r.body
        finally:
            await mds.close()


async def test_sec16_listener_answers_only_on_its_own_address(gke: tuple[MetaemuServer, Mds]) -> None:
    server, _ = gke
    other = Mds(f"http://127.0.0.2:{server.metadata_address.port}")  # another address of this host
    try:
        with pytest.raises(aiohttp.ClientConnectionError):
            await other.get(SA_PATH + "token")
    finally:
        await other.close()
    assert server.metadata_address.host == "127.0.0.1"


async def test_flavor_rule_applies_to_the_computemetadata_segment_only(gke: tuple[MetaemuServer, Mds]) -> None:
    _, mds = gke
    assert (await mds.get("/computeMetadataX/v1/", flavor=False)).status == 404
    assert (await mds.get("/computeMetadata", flavor=False)).status == 403


async def test_sec24_oversized_headers_are_refused_and_the_server_carries_on(gke: tuple[MetaemuServer, Mds]) -> None:
    _, mds = gke
    r = await mds.get(SA_PATH + "email", headers={"X-Padding": "x" * 20_000})
    assert r.status == 431
    assert (await mds.get(SA_PATH + "email")).status == 200
