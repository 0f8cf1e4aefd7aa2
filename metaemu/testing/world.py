"""A complete local stand-in for one workload's world: a Kubernetes-style issuer, Google STS and
IAM Credentials that trust it, a service account the workload may impersonate, and the projected
token file kubelet would write. Shared by ``metaemu demo`` and the functional tests so both run the
real code path against stand-ins that verify what Google verifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaemu.clock import Clock, SystemClock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.fake_issuer import FakeIssuer

PROJECT_ID = "demo-project"
PROJECT_NUMBER = "123456789012"
AUDIENCE = (f"//iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/"
            "demo-pool/providers/demo-provider")
SERVICE_ACCOUNT = f"demo-app@{PROJECT_ID}.iam.gserviceaccount.com"
NAMESPACE, KSA = "default", "demo-app"
CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(slots=True, kw_only=True)
class World:
    clock: Clock
    issuer: FakeIssuer
    google: FakeGoogle
    token_file: Path

    @property
    def principal(self) -> str:
        return self.google.principal_for(AUDIENCE, f"system:serviceaccount:{NAMESPACE}:{KSA}")

    def write_token(self, *, lifetime_s: float = 3600) -> str:
        """Mint a projected service-account token the way kubelet would, and write it in place."""
        token = self.issuer.mint_kubernetes(namespace=NAMESPACE, service_account=KSA, audience=AUDIENCE,
                                            lifetime_s=lifetime_s)
        self.token_file.write_text(token)
        return token

    def config(self, *, sts_url: str, iam_url: str, impersonate: bool = True, listen: str = "127.0.0.1:0",
               admin_listen: str = "127.0.0.1:0", profile: str = "gke", **extra: Any) -> dict[str, Any]:
        """A metaemu configuration (as parsed YAML) for this world."""
        wi: dict[str, Any] = {"audience": AUDIENCE,
                              "source": {"type": "kubernetes", "token_file": str(self.token_file)}}
        if impersonate:
            wi["service_account"] = SERVICE_ACCOUNT
        return {
            "listen": listen, "admin_listen": admin_listen, "profile": profile, "project_id": PROJECT_ID,
            "numeric_project_id": PROJECT_NUMBER,
            "instance": {"zone": "us-central1-a", "attributes": {"cluster-name": "demo",
                                                                "cluster-location": "us-central1"}},
            "workload_identity": wi,
            "endpoints": {"sts": sts_url, "iam_credentials": iam_url},
            **extra,
        }


def build_world(directory: Path, *, clock: Clock | None = None) -> World:
    clock = clock or SystemClock()
    issuer = FakeIssuer(issuer=CLUSTER_ISSUER, clock=clock)
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=CLUSTER_ISSUER, jwks=issuer.jwks()))
    google.add_service_account(SERVICE_ACCOUNT)
    world = World(clock=clock, issuer=issuer, google=google, token_file=directory / "token")
    google.grant(SERVICE_ACCOUNT, world.principal)
    world.write_token()
    return world
