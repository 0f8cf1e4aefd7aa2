"""The metadata tree: which keys exist for a profile, and every static rendering of them.

Built once from the ``Config`` and pre-rendered (listing, value, ``alt=json``, ``recursive=true``
JSON and text, ETags), so serving a static key is a dict lookup. ``token`` and ``identity`` are
dynamic leaves: the tree only marks where they are; ``handlers`` produces their bodies.

Rendering rules (gce-metadata.md): listings are one child per line, ``\\n``-terminated, directories
suffixed ``/``, lexicographic (Q-01); recursive JSON camelCases schema keys but not user keys such as
attribute names and account emails, and omits ``token``/``identity`` (Q-03, Q-04); ``alt=json`` quotes
strings, leaves numbers bare and turns line lists into arrays (Q-06); ``alt=text`` with ``recursive``
prints ``path value`` lines (Q-07); ETag is the last 16 hex digits of MD5 of the body (HD-10).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from metaemu.config import Config

DynamicKind = Literal["token", "identity"]
JsonScalar = str | int | list[str]


@dataclass(frozen=True, slots=True)
class Leaf:
    value: JsonScalar
    #: instance/tags answers JSON even without alt=json (Q-09).
    json_by_default: bool = False


@dataclass(frozen=True, slots=True)
class Dynamic:
    kind: DynamicKind


@dataclass(frozen=True, slots=True)
class Directory:
    children: Mapping[str, Node]
    #: Children are user-defined names (attributes, account emails): not camelCased in JSON (Q-03).
    user_keys: bool = False
    #: Set on a service-accounts/ACCT/ directory: the email it stands for.
    account: str | None = None


Node = Leaf | Dynamic | Directory


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes
    etag: str
    content_type: str

    @classmethod
    def text(cls, text: str, *, etag: str | None = None) -> Body:
        data = text.encode()
        return cls(data=data, etag=etag or _etag(data), content_type="application/text")

    @classmethod
    def json(cls, value: Any, *, etag: str | None = None) -> Body:
        data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        return cls(data=data, etag=etag or _etag(data), content_type="application/json")


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """Everything needed to answer one canonical path."""

    route: str  # bounded metrics label: the path with account and attribute names templated
    kind: Literal["directory", "leaf", "dynamic"]
    plain: Body | None = None  # listing (directory) or default rendering (leaf)
    as_json: Body | None = None  # alt=json (leaf) or recursive=true (directory)
    as_text: Body | None = None  # alt=text (leaf) or recursive=true&alt=text (directory)
    dynamic: DynamicKind | None = None
    account: str | None = field(default=None)  # the email behind a service-accounts/ACCT/ path


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()[-16:]


# ---------------------------------------------------------------- building


def build_tree(config: Config, *, email: str | None = None) -> Directory:
    """The ``/`` directory for ``config.profile``, serving ``email`` (default: ``config.email``) as
    the default service account."""
    gke = config.profile == "gke"
    project: dict[str, Node] = {
        "project-id": Leaf(config.project_id),
        "numeric-project-id": Leaf(int(config.numeric_project_id)),
    }
    if config.project_attributes or not gke:
        project["attributes"] = Directory({k: Leaf(v) for k, v in config.project_attributes.items()},
                                          user_keys=True)
    inst = config.instance
    instance: dict[str, Node] = {
        "id": Leaf(int(inst.id)),
        "hostname": Leaf(inst.hostname),
        "attributes": Directory({k: Leaf(v) for k, v in inst.attributes.items()}, user_keys=True),
        "service-accounts": _service_accounts(config, email or config.email),
    }
    if inst.zone:
        instance["zone"] = Leaf(f"projects/{config.numeric_project_id}/zones/{inst.zone}")
    if not gke:  # K-06, K-14: the GKE server hides everything else
        instance["name"] = Leaf(inst.name)
        instance["tags"] = Leaf(list(inst.tags), json_by_default=True)
    v1 = Directory({
        "instance": Directory(instance),
        "project": Directory(project),
        "universe": Directory({"universe-domain": Leaf("googleapis.com")}),  # K-10
    })
    return Directory({"computeMetadata": Directory({"v1": v1})})


def _service_accounts(config: Config, email: str) -> Directory:
    account = Directory({
        "aliases": Leaf(["default"]),
        "email": Leaf(email),
        "identity": Dynamic("identity"),
        "scopes": Leaf(list(config.scopes)),
        "token": Dynamic("token"),
    }, account=email)
    # SA-01, GKE-05: default/ and the account's own name address the same account.
    return Directory({"default": account, email: account}, user_keys=True)


# ---------------------------------------------------------------- rendering


def index_tree(root: Directory) -> dict[str, Entry]:
    """Canonical path (``/a/b`` for leaves, ``/a/b/`` for directories) -> pre-rendered ``Entry``."""
    out: dict[str, Entry] = {}
    for path, route, node, account in _walk(root, "/", "/", None):
        match node:
            case Directory():
                out[path] = Entry(route=route, kind="directory", plain=Body.text(_listing(node)),
                                  as_json=Body.json(_to_json(node)),
                                  as_text=Body.text("".join(_text_lines(node, ""))), account=account)
            case Leaf():
                # HD-10: one ETag per value, whichever rendering is asked for.
                text = Body.text(_leaf_text(node.value))
                plain = Body.json(node.value, etag=text.etag) if node.json_by_default else text
                out[path] = Entry(route=route, kind="leaf", plain=plain,
                                  as_json=Body.json(node.value, etag=text.etag), as_text=text, account=account)
            case Dynamic():
                out[path] = Entry(route=route, kind="dynamic", dynamic=node.kind, account=account)
    return out


def _walk(node: Node, path: str, route: str, account: str | None) -> Iterator[tuple[str, str, Node, str | None]]:
    yield path, route, node, account
    if not isinstance(node, Directory):
        return
    for name, child in node.children.items():
        is_dir = isinstance(child, Directory)
        child_account = child.account if is_dir and child.account else account  # type: ignore[union-attr]
        # Bounded metrics labels: account and user-defined names are templated.
        label = "{account}" if child_account != account else "{key}" if node.user_keys else name
        suffix = "/" if is_dir else ""
        yield from _walk(child, path + name + suffix, route + label + suffix, child_account)


def _listing(node: Directory) -> str:
    return "".join(f"{n}/\n" if isinstance(c, Directory) else f"{n}\n" for n, c in sorted(node.children.items()))


def _leaf_text(value: JsonScalar) -> str:
    if isinstance(value, list):  # SA-03, SA-04: one item per line, each terminated
        return "".join(f"{v}\n" for v in value)
    return str(value)  # SA-02, K-01, K-02: no trailing newline


def _camel(name: str) -> str:
    head, *rest = name.split("-")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _to_json(node: Directory) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, child in sorted(node.children.items()):
        if isinstance(child, Dynamic):
            continue  # token and identity are never part of a recursive answer
        key = name if node.user_keys else _camel(name)
        out[key] = _to_json(child) if isinstance(child, Directory) else child.value
    return out


def _text_lines(node: Directory, prefix: str) -> Iterator[str]:
    """Q-07: ``path/with/dashes value`` for every scalar; list items repeat the prefix."""
    for name, child in sorted(node.children.items()):
        path = prefix + name
        if isinstance(child, Directory):
            yield from _text_lines(child, path + "/")
        elif isinstance(child, Leaf):
            values = child.value if isinstance(child.value, list) else [child.value]
            for v in values:
                yield f"{path} {v}\n"
