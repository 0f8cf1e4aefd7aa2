"""Whether and how a pod is injected: pure functions of the pod, its namespace, its service account
and the settings (issue #14). No I/O, so every rule is unit-tested and the server only fetches.

Opt-in (pod label wins over namespace label; ``"false"`` opts out):
``metaemu.dev/inject: "true" | "false"``. The variant (how the app reaches the sidecar), pod
annotation wins over namespace annotation: ``metaemu.dev/variant: loopback | environment``;
without either, ``environment`` where Pod Security enforces ``restricted`` or ``baseline`` (both
forbid the NET_ADMIN the loopback alias needs), else ``sidecar.default_variant``.

Correctness as an admission webhook:

- idempotent under reinvocation (``reinvocationPolicy: IfNeeded``): a pod that already carries the
  injected sidecar and the ``metaemu.dev/injected`` annotation only gets the environment variables
  added to containers another webhook added since; the sidecar is never injected twice, and a pod
  with a metaemu sidecar of its own (manifests/sidecar by hand) is left untouched;
- every operation is computed against the pod as received, in an order whose array indices stay
  valid while the patch applies (variables first, then the containers inserted at the front);
  an array or object that does not exist is added whole (RFC 6902 §4.1);
- a pod that already sets the variables differently, a hostNetwork pod, a name clash, an invalid
  Google account annotation or a variant Pod Security will refuse is refused with a message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from metaemu.webhook import sidecar
from metaemu.webhook.jsonpatch import Operation, pointer
from metaemu.webhook.pod_shape import ContainerShape, PodShape
from metaemu.webhook.settings import VARIANTS, SidecarSettings, Variant

INJECT_LABEL = "metaemu.dev/inject"
VARIANT_ANNOTATION = "metaemu.dev/variant"
#: Set on every injected pod (its value: the variant), so a reinvocation knows the sidecar is ours.
INJECTED_ANNOTATION = "metaemu.dev/injected"
POD_SECURITY_ENFORCE = "pod-security.kubernetes.io/enforce"
#: Pod Security levels that forbid NET_ADMIN (the loopback alias): "baseline" allows only the default
#: capability set, "restricted" only NET_BIND_SERVICE (Pod Security Standards).
NO_NET_ADMIN_LEVELS = frozenset({"baseline", "restricted"})
#: Namespaces never injected whatever their labels (the MutatingWebhookConfiguration excludes them
#: too): the control plane's own, and node mode's agent (manifests/node); the webhook's own is
#: ``own_namespace`` (its pods must start while it is down).
ALWAYS_EXCLUDED = frozenset({"kube-system", "kube-node-lease", "kube-public", "metaemu-system"})
_GOOGLE_ACCOUNT = re.compile(r"^[^@/\s]+@[^@/\s]+\.[a-z]{2,}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceView:
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Untouched:
    """Allowed, no patch."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """``allowed: false`` with ``message``."""

    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Injected:
    """Allowed with ``operations`` (empty on a reinvocation with nothing left to do)."""

    variant: Variant
    operations: tuple[Operation, ...]


Decision = Untouched | Refused | Injected


def opt_in(pod: PodShape, namespace: NamespaceView, *, own_namespace: str) -> bool | Refused:
    """Whether ``pod`` asks to be injected (True/False), or a refusal for a value that is neither."""
    if namespace.name in ALWAYS_EXCLUDED or namespace.name == own_namespace:
        return False
    for where, labels in (("pod", pod.labels), (f"namespace {namespace.name}", namespace.labels)):
        value = labels.get(INJECT_LABEL)
        if value is None:
            continue
        if value not in ("true", "false"):
            return Refused(message=f"metaemu: the {where} label {INJECT_LABEL}={value!r} must be \"true\" or "
                           "\"false\"")
        return value == "true"
    return False


def pod_opted_out(pod: PodShape) -> bool:
    """Decidable without the namespace: no API call for a pod labelled ``"false"``."""
    return pod.labels.get(INJECT_LABEL) == "false"


def choose_variant(pod: PodShape, namespace: NamespaceView, settings: SidecarSettings) -> Variant | Refused:
    restricted = namespace.labels.get(POD_SECURITY_ENFORCE) in NO_NET_ADMIN_LEVELS
    for where, notes in (("pod", pod.annotations), (f"namespace {namespace.name}", namespace.annotations)):
        value = notes.get(VARIANT_ANNOTATION)
        if value is None:
            continue
        if value not in VARIANTS:
            return Refused(message=f"metaemu: the {where} annotation {VARIANT_ANNOTATION}={value!r} must be one "
                           f"of {', '.join(VARIANTS)}")
        if value == "loopback" and restricted:
            level = namespace.labels[POD_SECURITY_ENFORCE]
            return Refused(message=f"metaemu: the loopback variant needs NET_ADMIN in an init container, which Pod "
                           f"Security {level!r} (namespace {namespace.name}) forbids; use {VARIANT_ANNOTATION}: "
                           "environment")
        return value
    return "environment" if restricted else settings.default_variant


def decide(pod: PodShape, namespace: NamespaceView, *, google_account: str | None,
           settings: SidecarSettings, own_namespace: str) -> Decision:
    """The decision for ``pod`` (its service account's annotation is ``google_account``)."""
    wanted = opt_in(pod, namespace, own_namespace=own_namespace)
    if isinstance(wanted, Refused):
        return wanted
    if not wanted:
        return Untouched(reason="not opted in")
    ours = any(c.name == sidecar.SIDECAR_NAME for c in pod.init_containers)
    previous = pod.annotations.get(INJECTED_ANNOTATION)
    if ours and previous in VARIANTS:
        variant: Variant = previous
        refusal = _variables_conflict(pod, settings) if variant == "environment" else None
        return refusal or Injected(variant=variant, operations=tuple(
            _environment_operations(pod, settings) if variant == "environment" else ()))
    if ours or any(c.name == sidecar.SIDECAR_NAME for c in pod.containers):
        return Untouched(reason="the pod has a metaemu container of its own")
    if pod.host_network:
        return Refused(message="metaemu: a hostNetwork pod shares the node's network namespace, so its sidecar "
                       "would serve every host process (SEC-14, SEC-16); inject only pods with their own network")
    chosen = choose_variant(pod, namespace, settings)
    if isinstance(chosen, Refused):
        return chosen
    if google_account is not None and not _GOOGLE_ACCOUNT.match(google_account):
        return Refused(message=f"metaemu: service account {namespace.name}/{pod.service_account}'s annotation "
                       f"{settings.service_account_annotation}={google_account!r} is not a service-account email")
    refusal = _clashes(pod, chosen, settings)
    if refusal is not None:
        return refusal
    return Injected(variant=chosen, operations=tuple(_fresh_operations(pod, chosen, google_account, settings)))


def _clashes(pod: PodShape, variant: Variant, settings: SidecarSettings) -> Refused | None:
    taken = {c.name for c in (*pod.containers, *pod.init_containers)}
    names = [sidecar.SIDECAR_NAME] + ([sidecar.ADDRESS_NAME] if variant == "loopback" else [])
    clash = sorted(taken & set(names)) or sorted({sidecar.TOKEN_VOLUME} & set(pod.volume_names))
    if clash:
        return Refused(message=f"metaemu: the pod already has a container or volume named {clash[0]!r}, which the "
                       "injected sidecar needs; rename it or opt the pod out (metaemu.dev/inject: \"false\")")
    if variant == "environment":
        return _variables_conflict(pod, settings)
    port_start = pod.sysctls.get(sidecar.UNPRIVILEGED_PORT_SYSCTL)
    if port_start is not None and not (port_start.isdigit() and int(port_start) <= sidecar.METADATA_PORT):
        return Refused(message=f"metaemu: the pod sets {sidecar.UNPRIVILEGED_PORT_SYSCTL}={port_start}, so the "
                       f"sidecar cannot bind {sidecar.METADATA_IP}:{sidecar.METADATA_PORT}; use "
                       f"{VARIANT_ANNOTATION}: environment")
    for alias in pod.host_aliases:
        if alias.ip != sidecar.METADATA_IP and set(alias.hostnames) & set(sidecar.METADATA_NAMES):
            return Refused(message=f"metaemu: the pod's hostAliases map the metadata server's name to {alias.ip}; "
                           f"remove that entry (the sidecar answers at {sidecar.METADATA_IP})")
    return None


def _variables_conflict(pod: PodShape, settings: SidecarSettings) -> Refused | None:
    wanted = {e["name"]: e["value"] for e in sidecar.environment(settings)}
    for kind, containers in (("container", pod.containers), ("init container", pod.init_containers)):
        for container in containers:
            if container.name in (sidecar.SIDECAR_NAME, sidecar.ADDRESS_NAME):
                continue
            for entry in container.env:
                if entry.name in wanted and entry.value != wanted[entry.name]:
                    shown = "valueFrom" if entry.value is None else repr(entry.value)
                    return Refused(message=f"metaemu: {kind} {container.name!r} sets {entry.name} to {shown}, but "
                                   f"the injected sidecar answers at {wanted[entry.name]}; remove the variable, or "
                                   "opt the pod out (metaemu.dev/inject: \"false\")")
    return None


def _environment_operations(pod: PodShape, settings: SidecarSettings) -> list[Operation]:
    """The variables each container (and init container but ours) lacks, against current indices."""
    ops: list[Operation] = []
    for field, containers in (("initContainers", pod.init_containers), ("containers", pod.containers)):
        for index, container in enumerate(containers):
            if container.name in (sidecar.SIDECAR_NAME, sidecar.ADDRESS_NAME):
                continue
            ops += _container_environment(field, index, container, settings)
    return ops


def _container_environment(field: str, index: int, container: ContainerShape,
                           settings: SidecarSettings) -> list[Operation]:
    present = {e.name for e in container.env}
    missing = [e for e in sidecar.environment(settings) if e["name"] not in present]
    if not missing:
        return []
    if not container.has_env:
        return [Operation(op="add", path=pointer("spec", field, index, "env"), value=missing)]
    return [Operation(op="add", path=pointer("spec", field, index, "env", "-"), value=e) for e in missing]


def _fresh_operations(pod: PodShape, variant: Variant, google_account: str | None,
                      settings: SidecarSettings) -> list[Operation]:
    ops = [_add_to_object(pod.has_annotations, ("metadata", "annotations"), INJECTED_ANNOTATION, variant)]
    if variant == "environment":
        ops += _environment_operations(pod, settings)  # before the inserts below shift initContainers
    ops.append(_append(pod.has_volumes, ("spec", "volumes"), sidecar.token_volume(settings)))
    front = ([sidecar.address_container(settings)] if variant == "loopback" else [])
    front.append(sidecar.sidecar_container(settings, variant, google_account))
    if not pod.has_init_containers:
        ops.append(Operation(op="add", path=pointer("spec", "initContainers"), value=front))
    else:  # first, so the app's own init containers already reach the metadata server
        ops += [Operation(op="add", path=pointer("spec", "initContainers", i), value=c) for i, c in enumerate(front)]
    if variant == "loopback":
        if sidecar.UNPRIVILEGED_PORT_SYSCTL not in pod.sysctls:
            if not pod.has_security_context:
                ops.append(Operation(op="add", path=pointer("spec", "securityContext"),
                                     value={"sysctls": [sidecar.port_sysctl()]}))
            else:
                ops.append(_append(pod.has_sysctls, ("spec", "securityContext", "sysctls"), sidecar.port_sysctl()))
        if not any(a.ip == sidecar.METADATA_IP and set(sidecar.METADATA_NAMES) <= set(a.hostnames)
                   for a in pod.host_aliases):
            ops.append(_append(pod.has_host_aliases, ("spec", "hostAliases"), sidecar.host_alias()))
    return ops


def _append(exists: bool, path: tuple[str, ...], value: object) -> Operation:
    if exists:
        return Operation(op="add", path=pointer(*path, "-"), value=value)
    return Operation(op="add", path=pointer(*path), value=[value])


def _add_to_object(exists: bool, path: tuple[str, ...], key: str, value: str) -> Operation:
    if exists:  # "add" of an existing member replaces it (RFC 6902 §4.1)
        return Operation(op="add", path=pointer(*path, key), value=value)
    return Operation(op="add", path=pointer(*path), value={key: value})
