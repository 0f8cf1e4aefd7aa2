"""Node mode's own links: the interception rules present and first in their chains
(``metaemu.interception.drift``, what ``node-setup --check`` reports), and the pod as the agent would
find it through the API (on this node, with an address, its service account and annotation), then
the pod's chain with a TokenRequest bound to it, as the agent makes it (SEC-25).
"""

from __future__ import annotations

from dataclasses import dataclass

from metaemu.clock import Clock
from metaemu.config import Config, NodeConfig
from metaemu.credentials.pipeline import Identity
from metaemu.credentials.tokens import JWT_TOKEN_TYPE, SubjectToken
from metaemu.doctor.chain import Chain, upstream_clients
from metaemu.doctor.diagnosis import ChainFacts, diagnose
from metaemu.doctor.report import Check, Report
from metaemu.errors import ConfigError, UpstreamError
from metaemu.interception import InterceptionRule, drift
from metaemu.netfilter import InterceptionError, Netfilter
from metaemu.pods.kube_client import KubeClient
from metaemu.pods.objects import PodRecord
from metaemu.transport import HttpClient


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundPod:
    pod: PodRecord
    gsa_email: str | None


def interception_rule(config: Config, *, pod_interfaces: tuple[str, ...], node_interface: str | None
                      ) -> InterceptionRule | None:
    """The rule node-setup installs for this agent: flags first, else ``node.intercept_*``."""
    node = config.node
    assert node is not None
    if not pod_interfaces and node_interface is None:
        pod_interfaces, node_interface = node.intercept_pod_interfaces, node.intercept_node_interface
    if not pod_interfaces and node_interface is None:
        return None
    return InterceptionRule(target_address=config.listen.host, target_port=config.listen.port,
                            pod_interfaces=pod_interfaces, node_interface=node_interface)


def check_interception(report: Report, rule: InterceptionRule | None, *, netfilter: Netfilter) -> bool:
    """Blocking (runs iptables): call it through ``asyncio.to_thread``."""
    name = "interception rules"
    if rule is None:
        report.add(Check(name=name, status="warn", summary="not checked: no pod interfaces known (pass "
                         "--pod-interface as node-setup was given METAEMU_POD_INTERFACES, or set "
                         "node.intercept_pod_interfaces)"))
        return True
    selectors = [f"--pod-interface {p}" for p in rule.pod_interfaces] + (
        [f"--node-interface {rule.node_interface}"] if rule.node_interface else [])
    setup = " ".join(["metaemu node-setup --to", rule.target, *selectors])
    try:
        problems = drift(rule, netfilter=netfilter)
    except (InterceptionError, ConfigError) as exc:
        # The serving container has no NET_ADMIN by design (security.md recommendation 5): say where
        # the check can run instead of calling the chain broken.
        report.add(Check(name=name, status="warn", summary="cannot read the rules here (needs the host network "
                         "and NET_ADMIN)", cause=str(exc), diagnosis="interception.unreadable",
                         fix="kubectl -n metaemu-system exec ds/metaemu -c node-setup -- metaemu node-setup --check"))
        return True
    if problems:
        report.add(Check(name=name, status="fail", summary="missing, modified or not first in their chains",
                         details={f"problem {i + 1}": p for i, p in enumerate(problems)},
                         diagnosis="interception.drift", fix=f"{setup}\n(or delete the agent pod: its "
                         "init container reinstalls them; with node.intercept_* the agent repairs them itself)"))
        return False
    report.add(Check(name=name, status="ok", summary=f"in place and first: pods' 169.254.169.254:80 goes to "
                     f"{rule.target}"))
    return True


async def check_pod(report: Report, kube: KubeClient, node: NodeConfig, *, namespace: str, name: str,
                    facts: ChainFacts) -> FoundPod | None:
    try:
        pods = (await kube.list_pods(field_selector=f"metadata.namespace={namespace},metadata.name={name}")).pods
        pod = pods[0] if pods else None
        account = None if pod is None else await kube.get_service_account(
            namespace, pod.service_account, annotation=node.service_account_annotation)
    except UpstreamError as exc:
        found = diagnose(exc, facts)
        report.add(Check(name="pod", status="fail", summary="the Kubernetes API refused the lookup",
                         upstream=exc.reason, diagnosis=found.code, cause=found.cause, fix=found.fix))
        return None
    problem = _pod_problem(pod, node, namespace=namespace, name=name)
    if problem is not None or pod is None or account is None:
        report.add(Check(name="pod", status="fail", summary=problem or "not found", diagnosis="pod.not_served",
                         fix="run the doctor on the pod's node, once kubelet reports it Running with an address"))
        return None
    report.add(Check(name="pod", status="ok", summary=f"{namespace}/{name} on {node.name}", details={
        "ip": ", ".join(pod.pod_ips), "service account": pod.service_account,
        node.service_account_annotation: account.gsa_email or "(none: the federated principal is served)"}))
    return FoundPod(pod=pod, gsa_email=account.gsa_email)


def _pod_problem(pod: PodRecord | None, node: NodeConfig, *, namespace: str, name: str) -> str | None:
    if pod is None:
        return f"no pod {namespace}/{name}"
    if pod.node_name != node.name:
        return f"the pod runs on node {pod.node_name or '(unscheduled)'}, this agent serves {node.name}"
    if pod.host_network:
        return "the pod uses hostNetwork: it shares the node's address and is refused (SEC-14)"
    if pod.deleting or not pod.awaits_or_has_address_on(node.name):
        return f"the pod is {pod.phase}{' and being deleted' if pod.deleting else ''}"
    if not pod.pod_ips:
        return "the pod has no address yet (kubelet has not reported one)"
    return None


def pod_chain(config: Config, kube: KubeClient, found: FoundPod, *, http: HttpClient, clock: Clock) -> Chain:
    node = config.node
    assert node is not None
    sts, iam = upstream_clients(config, http=http, clock=clock)
    identity = Identity(audience=node.audience, service_account=found.gsa_email, default_scopes=node.scopes,
                        lifetime_s=node.token_lifetime_seconds)
    facts = ChainFacts(audience=node.audience, source_kind="tokenrequest", service_account=found.gsa_email,
                       project_id=config.project_id, configured_project_number=config.numeric_project_id)
    source = _PodBoundToken(kube, found.pod, audience=node.audience, expiration_s=node.token_expiration_seconds)
    return Chain(identity=identity, source=source, sts=sts, iam=iam, facts=facts)


class _PodBoundToken:
    """The agent's TokenRequest for one pod: exactly the provider audience, bound to the pod."""

    kind = "tokenrequest"

    def __init__(self, kube: KubeClient, pod: PodRecord, *, audience: str, expiration_s: int) -> None:
        self._kube, self._pod, self._audience, self._expiration_s = kube, pod, audience, expiration_s

    async def fetch(self) -> SubjectToken:
        token = await self._kube.create_token(namespace=self._pod.namespace, service_account=self._pod.service_account,
                                              audience=self._audience, pod_name=self._pod.name, pod_uid=self._pod.uid,
                                              expiration_s=self._expiration_s)
        return SubjectToken(value=token.value, token_type=JWT_TOKEN_TYPE, expiry=token.expiry)
