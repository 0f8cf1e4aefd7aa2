"""The parts of a Pod (as an AdmissionReview carries it) that injection reads, parsed into frozen
values. ``parse_pod`` raises ``ValueError`` on a document that is not a pod spec; no raw dict
leaves this module. Not owned here: the decision (``injection``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metaemu.pods.objects import DEFAULT_SERVICE_ACCOUNT


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvEntry:
    name: str
    #: None when the entry is ``valueFrom`` (a Secret, a field): never equal to a literal.
    value: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerShape:
    name: str
    has_env: bool
    env: tuple[EnvEntry, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HostAlias:
    ip: str
    hostnames: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PodShape:
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    has_annotations: bool
    service_account: str
    host_network: bool
    containers: tuple[ContainerShape, ...]
    init_containers: tuple[ContainerShape, ...]
    has_init_containers: bool
    volume_names: tuple[str, ...]
    has_volumes: bool
    has_security_context: bool
    sysctls: Mapping[str, str]
    has_sysctls: bool
    host_aliases: tuple[HostAlias, ...]
    has_host_aliases: bool


def parse_pod(obj: Any) -> PodShape:
    if not isinstance(obj, dict):
        raise ValueError("the object is not a Pod")
    meta, spec = _dict(obj.get("metadata"), "metadata"), _dict(obj.get("spec"), "spec")
    security = _dict(spec.get("securityContext"), "spec.securityContext")
    sysctls = _list(security.get("sysctls"), "spec.securityContext.sysctls")
    aliases = _list(spec.get("hostAliases"), "spec.hostAliases")
    return PodShape(
        name=str(meta.get("name") or meta.get("generateName") or ""),
        labels=_strings(meta.get("labels"), "metadata.labels"),
        annotations=_strings(meta.get("annotations"), "metadata.annotations"),
        has_annotations=isinstance(meta.get("annotations"), dict),
        service_account=str(spec.get("serviceAccountName") or DEFAULT_SERVICE_ACCOUNT),
        host_network=spec.get("hostNetwork") is True,
        containers=tuple(_container(c) for c in _list(spec.get("containers"), "spec.containers")),
        init_containers=tuple(_container(c) for c in _list(spec.get("initContainers"), "spec.initContainers")),
        has_init_containers=isinstance(spec.get("initContainers"), list),
        volume_names=tuple(str(_dict(v, "volume").get("name")) for v in _list(spec.get("volumes"), "spec.volumes")),
        has_volumes=isinstance(spec.get("volumes"), list),
        has_security_context=isinstance(spec.get("securityContext"), dict),
        sysctls={str(_dict(s, "sysctl").get("name")): str(_dict(s, "sysctl").get("value")) for s in sysctls},
        has_sysctls=isinstance(security.get("sysctls"), list),
        host_aliases=tuple(HostAlias(ip=str(_dict(a, "hostAlias").get("ip")),
                                     hostnames=tuple(str(h) for h in _list(_dict(a, "hostAlias").get("hostnames"),
                                                                            "hostnames")))
                           for a in aliases),
        has_host_aliases=isinstance(spec.get("hostAliases"), list),
    )


def _container(raw: Any) -> ContainerShape:
    container = _dict(raw, "container")
    env = []
    for item in _list(container.get("env"), "env"):
        entry = _dict(item, "env entry")
        value = entry.get("value")
        from_ref = entry.get("valueFrom") is not None
        env.append(EnvEntry(name=str(entry.get("name")), value=None if from_ref else str(value or "")))
    return ContainerShape(name=str(container.get("name") or ""), has_env=isinstance(container.get("env"), list),
                          env=tuple(env))


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{what} is not an array")
    return value


def _strings(value: Any, what: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in _dict(value, what).items()}
