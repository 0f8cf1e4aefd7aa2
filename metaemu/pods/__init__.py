"""Node mode: who is calling, from the TCP peer address and a node-scoped pod watch (issue #4).

Modules, in dependency order:

    objects           typed Pod / ServiceAccount / token values, the candidate rule, IP normalisation
    stream            HttpStreamClient (line-streamed responses for watches) and the aiohttp adapter
    kube_client       KubeConnection (in-cluster / kubeconfig), KubeClient: list, watch, get SA, TokenRequest
    single_flight     one in-flight API call per key
    pod_metrics       metaemu_pod_lookup_total, metaemu_pod_watch_synced (to move into metaemu.metrics)
    watch             PodIndex and PodWatcher.pod_watcher (list + watch, relist on 410)
    service_accounts  ServiceAccountCache (TTL, stale during outages)
    identity          IdentityResolver.resolve(peer_ip) -> PodIdentity | Refusal; IdentityKey; peer_ip_of
    token_source      PodTokenSource: a SubjectTokenSource minting bound TokenRequest tokens

Security rules are in ``identity``'s docstring; the threats are security.md §1 lesson 2 and SEC-08..SEC-15.
"""

from metaemu.pods.identity import IdentityKey, IdentityResolver, PodIdentity, Refusal, peer_ip_of
from metaemu.pods.kube_client import KubeClient, KubeConnection
from metaemu.pods.pod_metrics import PodMetrics, create_pod_metrics
from metaemu.pods.service_accounts import ServiceAccountCache
from metaemu.pods.stream import HttpStreamClient, KubeHttp
from metaemu.pods.token_source import PodTokenSource
from metaemu.pods.watch import PodIndex, PodWatcher

__all__ = [
    "HttpStreamClient",
    "IdentityKey",
    "IdentityResolver",
    "KubeClient",
    "KubeConnection",
    "KubeHttp",
    "PodIdentity",
    "PodIndex",
    "PodMetrics",
    "PodTokenSource",
    "PodWatcher",
    "Refusal",
    "ServiceAccountCache",
    "create_pod_metrics",
    "peer_ip_of",
]
