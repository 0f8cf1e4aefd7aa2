"""Typed, frozen views of the few Kubernetes objects node mode reads, parsed from API JSON.

Owns ``PodRecord`` (only the fields identity depends on), ``ServiceAccountRecord``, ``KubeToken``,
the candidate rule of security.md recommendation 2 (SEC-12, SEC-13, SEC-14) and IP normalisation.
Parsers raise ``ValueError`` on a malformed object; no raw dict leaves this module.

Not owned here: fetching the objects (``kube_client``) and indexing them (``watch``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Pod phases after which a pod never runs again (SEC-12; kube2iam PR #32).
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
#: What the ServiceAccount admission plugin fills in when a pod names none.
DEFAULT_SERVICE_ACCOUNT = "default"


def normalize_ip(text: str) -> str | None:
    """The canonical text of an IP address; an IPv4-mapped IPv6 address becomes plain IPv4.

    Returns None when ``text`` is not an address (a zone-scoped or garbage peer name).
    """
    # SECURITY: a dual-stack listener reports IPv4 peers as ``::ffff:a.b.c.d``; comparing text as
    # given would miss the pod's ``podIPs`` entry, and "::FFFF:..." spellings must not differ.
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRecord:
    """The identity-relevant part of a Pod. ``pod_ips`` are normalised (``normalize_ip``)."""

    namespace: str
    name: str
    uid: str
    node_name: str
    service_account: str
    host_network: bool
    phase: str
    deleting: bool
    pod_ips: tuple[str, ...]
    resource_version: str = ""

    def is_candidate_on(self, node_name: str) -> bool:
        """Whether a request from one of ``pod_ips`` may be attributed to this pod (recommendation 2).

        On this node (SEC-13), not hostNetwork (its IPs are the node's, SEC-14), not terminal and
        not being deleted (SEC-12, SEC-10: a terminating pod's IP is about to be reused).
        """
        return self.awaits_or_has_address_on(node_name) and bool(self.pod_ips)

    def awaits_address_on(self, node_name: str) -> bool:
        """A pod that will be a candidate once kubelet posts its address: its containers may
        already be calling before the API shows the address (SEC-09)."""
        return self.awaits_or_has_address_on(node_name) and not self.pod_ips

    def awaits_or_has_address_on(self, node_name: str) -> bool:
        return (self.node_name == node_name and not self.host_network and self.phase not in TERMINAL_PHASES
                and not self.deleting)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccountRecord:
    """A ServiceAccount's identity: its UID (cache keys, SEC-26) and the Google service account
    named by the configured annotation (None when not annotated)."""

    namespace: str
    name: str
    uid: str
    gsa_email: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeToken:
    """A TokenRequest result; ``expiry`` is ``status.expirationTimestamp`` (authoritative, §6)."""

    value: str = field(repr=False)
    expiry: dt.datetime


def parse_pod(obj: Any) -> PodRecord:
    """A ``PodRecord`` from a Pod object; raises ``ValueError`` when required fields are missing."""
    meta, spec, status = _section(obj, "metadata"), _section(obj, "spec"), _section(obj, "status")
    ips = _pod_ips(status)
    return PodRecord(
        namespace=_text(meta, "namespace"), name=_text(meta, "name"), uid=_text(meta, "uid"),
        node_name=str(spec.get("nodeName") or ""),
        service_account=str(spec.get("serviceAccountName") or DEFAULT_SERVICE_ACCOUNT),
        host_network=spec.get("hostNetwork") is True,
        phase=str(status.get("phase") or "Pending"),
        deleting=bool(meta.get("deletionTimestamp")),
        pod_ips=ips,
        resource_version=str(meta.get("resourceVersion") or ""),
    )


def parse_service_account(obj: Any, *, annotation: str) -> ServiceAccountRecord:
    """A ``ServiceAccountRecord``; ``annotation`` names the key holding the Google account."""
    meta = _section(obj, "metadata")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise ValueError("metadata.annotations is not an object")
    raw = annotations.get(annotation)
    gsa = raw.strip() if isinstance(raw, str) else ""
    return ServiceAccountRecord(namespace=_text(meta, "namespace"), name=_text(meta, "name"),
                                uid=_text(meta, "uid"), gsa_email=gsa or None)


def parse_timestamp(text: Any) -> dt.datetime:
    """An RFC 3339 timestamp as aware UTC (Kubernetes writes ``2026-11-22T05:00:00Z``)."""
    if not isinstance(text, str) or not text:
        raise ValueError("missing timestamp")
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text!r}")
    return parsed.astimezone(dt.UTC)


def format_timestamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    """``status.podIPs`` (dual stack), falling back to ``status.podIP`` on objects without it."""
    entries = status.get("podIPs")
    raw: list[str] = []
    if isinstance(entries, list):
        raw = [e["ip"] for e in entries if isinstance(e, Mapping) and isinstance(e.get("ip"), str)]
    if not raw and isinstance(status.get("podIP"), str):
        raw = [status["podIP"]]
    return tuple(ip for ip in (normalize_ip(r) for r in raw) if ip is not None)


def _section(obj: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError("object is not a JSON object")
    value = obj.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} is not an object")
    return value


def _text(section: Mapping[str, Any], key: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"metadata.{key} is missing")
    return value
