"""The object store behind ``FakeKubernetes``: pods and service accounts with resourceVersions, field
selectors, a pod event history with compaction, and watch fan-out.

Reproduces what a client's list + watch depends on: one cluster-wide resourceVersion counter; a
list returns the counter at the time of the list; a watch from resourceVersion N replays every pod
event after N, then streams live ones; a watch from "" or "0" starts with synthetic ``ADDED``
events; a watch from before the compacted revision gets an ``ERROR`` event with a 410 ``Status``
(``Expired``); selector semantics per watcher (an object entering the selector is ``ADDED``, one
leaving it ``DELETED``); ``BOOKMARK`` events carrying only ``metadata.resourceVersion``.

Not owned here: HTTP, auth, TokenRequest and faults (``fake_kubernetes``).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Fields the fake can select pods on (a subset of the API server's pod field labels).
_POD_FIELDS: Mapping[str, Callable[[Mapping[str, Any]], str]] = {
    "metadata.name": lambda p: str(p["metadata"].get("name", "")),
    "metadata.namespace": lambda p: str(p["metadata"].get("namespace", "")),
    "spec.nodeName": lambda p: str(p["spec"].get("nodeName") or ""),
    "spec.serviceAccountName": lambda p: str(p["spec"].get("serviceAccountName") or ""),
    "spec.hostNetwork": lambda p: "true" if p["spec"].get("hostNetwork") else "false",
    "status.phase": lambda p: str(p["status"].get("phase") or ""),
    "status.podIP": lambda p: str(p["status"].get("podIP") or ""),
}

Obj = dict[str, Any]
Key = tuple[str, str]


class SelectorError(ValueError):
    """A field selector the fake (like the API server) does not support."""


@dataclass(frozen=True, slots=True)
class FieldSelector:
    """``a=b,c!=d`` over pod fields; the empty selector matches everything."""

    terms: tuple[tuple[str, bool, str], ...] = ()  # (field, equal?, value)

    @classmethod
    def parse(cls, text: str) -> FieldSelector:
        terms = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            negated = "!=" in part
            name, _, value = part.partition("!=" if negated else ("==" if "==" in part else "="))
            if name not in _POD_FIELDS:
                raise SelectorError(f'field label not supported: "{name}"')
            terms.append((name, not negated, value))
        return cls(tuple(terms))

    def matches(self, pod: Mapping[str, Any]) -> bool:
        return all((_POD_FIELDS[name](pod) == value) == equal for name, equal, value in self.terms)


@dataclass(frozen=True, slots=True)
class PodEvent:
    resource_version: int
    type: str  # ADDED, MODIFIED or DELETED, as stored
    obj: Obj
    old: Obj | None


@dataclass(eq=False, slots=True)
class Subscription:
    """One open watch. ``queue`` receives encoded event lines; None ends the stream cleanly and
    ``BROKEN`` ends it as a dropped connection."""

    selector: FieldSelector
    bookmarks: bool
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)


BROKEN = b"\x00broken"


def encode(event_type: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode()


def status(code: int, reason: str, message: str, **details: Any) -> Obj:
    """A ``meta/v1 Status`` failure object, as every API error body is."""
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                 "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


def pod_object(namespace: str, name: str, *, uid: str, node: str, ips: list[str], service_account: str,
               host_network: bool, phase: str, created: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "uid": uid, "creationTimestamp": created},
            "spec": {"nodeName": node, "serviceAccountName": service_account, "hostNetwork": host_network,
                     "containers": [{"name": "app", "image": "registry.test/app:1"}]},
            "status": pod_status(phase, ips)}


def pod_status(phase: str, ips: list[str]) -> Obj:
    body: Obj = {"phase": phase, "podIPs": [{"ip": ip} for ip in ips]}
    if ips:
        body["podIP"] = ips[0]
    return body


def service_account_object(namespace: str, name: str, *, uid: str, annotations: Mapping[str, str] | None) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"namespace": namespace, "name": name, "uid": uid, "annotations": dict(annotations or {})}}


class KubeStore:
    """Single event loop; every mutation is synchronous, so a watch opened between two awaits never
    misses or duplicates an event."""

    def __init__(self) -> None:
        self.resource_version = 1
        self.compacted = 0
        self.pods: dict[Key, Obj] = {}
        self.service_accounts: dict[Key, Obj] = {}
        self._history: list[PodEvent] = []
        self._subscriptions: set[Subscription] = set()
        self._paused: list[PodEvent] | None = None

    # -- mutation ------------------------------------------------------------------------------------

    def put_pod(self, obj: Obj) -> Obj:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        old = self.pods.get(key)
        stored = self._stamp(obj)
        self.pods[key] = stored
        self._record(PodEvent(self.resource_version, "MODIFIED" if old else "ADDED", stored, old))
        return stored

    def delete_pod(self, namespace: str, name: str) -> Obj | None:
        old = self.pods.pop((namespace, name), None)
        if old is not None:
            gone = self._stamp(old)
            self._record(PodEvent(self.resource_version, "DELETED", gone, old))
        return old

    def put_service_account(self, obj: Obj) -> Obj:
        stored = self._stamp(obj)
        self.service_accounts[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = stored
        return stored

    def compact(self) -> None:
        """Forget the pod event history up to now (etcd compaction): older watches get 410."""
        self.compacted = self.resource_version
        self._history.clear()

    def pause(self) -> None:
        """Hold live events from open watches (a lagging watch); ``resume`` delivers them in order."""
        if self._paused is None:
            self._paused = []

    def resume(self) -> None:
        held, self._paused = self._paused or [], None
        for event in held:
            self._fan_out(event)

    def _stamp(self, obj: Obj) -> Obj:
        self.resource_version += 1
        stamped = copy.deepcopy(obj)
        stamped["metadata"]["resourceVersion"] = str(self.resource_version)
        return stamped

    def _record(self, event: PodEvent) -> None:
        self._history.append(event)
        if self._paused is not None:
            self._paused.append(event)
        else:
            self._fan_out(event)

    def _fan_out(self, event: PodEvent) -> None:
        for sub in self._subscriptions:
            line = _line_for(sub.selector, event)
            if line is not None:
                sub.queue.put_nowait(line)

    # -- reads and watches -----------------------------------------------------------------------------

    def list_pods(self, selector: FieldSelector, namespace: str | None = None) -> tuple[list[Obj], str]:
        items = [copy.deepcopy(p) for (ns, _), p in sorted(self.pods.items())
                 if (namespace is None or ns == namespace) and selector.matches(p)]
        return items, str(self.resource_version)

    def subscribe(self, selector: FieldSelector, *, since: str, bookmarks: bool) -> Subscription:
        """Open a watch from ``since``; its queue already holds the replayed (or initial) events."""
        sub = Subscription(selector=selector, bookmarks=bookmarks)
        for line in self._replay(selector, since):
            sub.queue.put_nowait(line)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resourceVersion to every watch that asked for them."""
        for sub in self._subscriptions:
            if sub.bookmarks:
                sub.queue.put_nowait(self.bookmark_line())

    def bookmark_line(self) -> bytes:
        return encode("BOOKMARK", {"kind": "Pod", "apiVersion": "v1",
                                   "metadata": {"resourceVersion": str(self.resource_version)}})

    def end_watches(self, *, broken: bool) -> None:
        for sub in list(self._subscriptions):
            sub.queue.put_nowait(BROKEN if broken else None)
            self._subscriptions.discard(sub)

    @property
    def watch_count(self) -> int:
        return len(self._subscriptions)

    def _replay(self, selector: FieldSelector, since: str) -> list[bytes]:
        if since in ("", "0"):
            items, _ = self.list_pods(selector)
            return [encode("ADDED", item) for item in items]
        try:
            start = int(since)
        except ValueError:
            return [encode("ERROR", status(400, "BadRequest", f"invalid resource version: {since!r}"))]
        if start < self.compacted:
            message = f"too old resource version: {start} ({self.compacted})"
            return [encode("ERROR", status(410, "Expired", message))]
        held = {id(e) for e in self._paused or ()}  # delivered on resume, not twice
        lines = (_line_for(selector, e) for e in self._history if e.resource_version > start and id(e) not in held)
        return [line for line in lines if line is not None]


def _line_for(selector: FieldSelector, event: PodEvent) -> bytes | None:
    """The event as this watcher sees it through its selector (entering → ADDED, leaving → DELETED)."""
    was = event.old is not None and selector.matches(event.old)
    if event.type == "DELETED":
        return encode("DELETED", event.obj) if was else None
    now = selector.matches(event.obj)
    if now:
        return encode("MODIFIED" if was else "ADDED", event.obj)
    return encode("DELETED", event.obj) if was else None
