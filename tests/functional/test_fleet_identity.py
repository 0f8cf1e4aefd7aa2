"""Fleet Workload Identity (issue #3): an audience of the form identitynamespace:POOL:PROVIDER
works unchanged with the kubernetes source. The projected token's audience is the identity
namespace; the Google stand-in maps it to the fleet pool and checks the IAM grant."""

from __future__ import annotations

import json

from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.world import CLUSTER_ISSUER, KSA, NAMESPACE, PROJECT_ID, SERVICE_ACCOUNT, World
from tests.helpers import SA_PATH, Mds, running_server

NAMESPACE_POOL = f"{PROJECT_ID}.svc.id.goog"
FLEET_AUDIENCE = (f"identitynamespace:{NAMESPACE_POOL}:https://gkehub.googleapis.com/projects/{PROJECT_ID}"
                  "/locations/global/memberships/demo-cluster")


async def test_fleet_audience_gets_tokens_through_the_kubernetes_source(world: World) -> None:
    world.google.add_provider(WorkloadIdentityProvider(audience=FLEET_AUDIENCE, issuer=CLUSTER_ISSUER,
                                                       jwks=world.issuer.jwks()))
    subject = f"system:serviceaccount:{NAMESPACE}:{KSA}"
    world.google.grant(SERVICE_ACCOUNT, world.google.principal_for(FLEET_AUDIENCE, subject))
    world.token_file.write_text(world.issuer.mint_kubernetes(namespace=NAMESPACE, service_account=KSA,
                                                             audience=NAMESPACE_POOL))
    workload_identity = {"audience": FLEET_AUDIENCE, "service_account": SERVICE_ACCOUNT,
                         "source": {"type": "kubernetes", "token_file": str(world.token_file)}}
    async with running_server(world, workload_identity=workload_identity) as server:
        mds = Mds(server.metadata_url)
        try:
            r = await mds.get(SA_PATH + "token")
            assert r.status == 200, r.text
            assert json.loads(r.body)["access_token"].startswith("ya29.sa-")
        finally:
            await mds.close()
    (sts,) = [req for req in world.google.requests if req.endpoint == "sts"]
    assert sts.form["audience"] == FLEET_AUDIENCE
