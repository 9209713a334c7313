"""Discovery: what kubectl and client-go read before anything else.

Two shapes are served, both built from the resources table:
- legacy discovery: `/api` (APIVersions), `/apis` (APIGroupList), `/apis/<group>`
  (APIGroup) and `/api/v1`, `/apis/<group>/<version>` (APIResourceList);
- aggregated discovery (`apidiscovery.k8s.io` v2 and v2beta1 APIGroupDiscoveryList),
  returned from `/api` and `/apis` only when the client's Accept header asks for it, with
  the matching Content-Type so client-go knows which shape it got (1.27-1.29 ask for
  v2beta1, 1.30+ for v2).
Plus `/version`, which kubectl uses for `kubectl version` and skew warnings.
"""

from __future__ import annotations

from typing import Any

from kubeproxy.apiserver.resources import (
    GROUP_VERSIONS,
    RESOURCES,
    SUBRESOURCE_KINDS,
    VERBS,
    Resource,
    subresource_verbs,
)

Obj = dict[str, Any]

SERVER_VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0-kubeproxy-lab",
                  "gitCommit": "0000000000000000000000000000000000000000",
                  "gitTreeState": "clean", "buildDate": "2024-08-13T00:00:00Z",
                  "goVersion": "go1.22.5", "compiler": "gc",
                  "platform": "linux/amd64"}

AGGREGATED_VERSIONS = ("v2", "v2beta1")


def _resources_of(group: str, version: str) -> list[Resource]:
    return [r for r in RESOURCES if (r.group, r.version) == (group, version)]


def api_versions(server_address: str) -> Obj:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                            "serverAddress": server_address}]}


def _group(group: str) -> Obj:
    versions = [{"groupVersion": f"{g}/{v}", "version": v} for g, v in GROUP_VERSIONS if g == group]
    return {"name": group, "versions": versions, "preferredVersion": versions[0]}


def api_group_list() -> Obj:
    groups = sorted({g for g, _ in GROUP_VERSIONS if g})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(g) for g in groups]}


def api_group(group: str) -> Obj | None:
    if group not in {g for g, _ in GROUP_VERSIONS if g}:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group)}


def api_resource_list(group: str, version: str) -> Obj | None:
    if (group, version) not in GROUP_VERSIONS:
        return None
    entries: list[Obj] = []
    for r in _resources_of(group, version):
        entry: Obj = {"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                      "kind": r.kind, "verbs": list(VERBS)}
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        entries.append(entry)
        for sub in r.subresources:
            sub_entry: Obj = {"name": f"{r.plural}/{sub}", "singularName": "",
                              "namespaced": r.namespaced, "kind": r.kind,
                              "verbs": list(subresource_verbs(sub))}
            other = SUBRESOURCE_KINDS.get(sub)
            if other is not None:
                sub_entry.update(group=other.group, version=other.version, kind=other.kind)
            entries.append(sub_entry)
    gv = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}


# ---- aggregated discovery -------------------------------------------------------------------


def aggregated_version(accept: str) -> str | None:
    """The apidiscovery version the Accept header asks for first, if any."""
    for media in accept.split(","):
        params = dict(p.strip().split("=", 1) for p in media.split(";")[1:] if "=" in p)
        if params.get("g") == "apidiscovery.k8s.io" and \
                params.get("as") == "APIGroupDiscoveryList" and \
                params.get("v") in AGGREGATED_VERSIONS:
            return params["v"]
    return None


def aggregated_content_type(version: str) -> str:
    return f"application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"


def _aggregated_resource(r: Resource) -> Obj:
    kind = {"group": r.group, "version": r.version, "kind": r.kind}
    entry: Obj = {
        "resource": r.plural,
        "responseKind": kind,
        "scope": "Namespaced" if r.namespaced else "Cluster",
        "singularResource": r.singular,
        "verbs": list(VERBS),
    }
    if r.short_names:
        entry["shortNames"] = list(r.short_names)
    if r.categories:
        entry["categories"] = list(r.categories)
    if r.subresources:
        entry["subresources"] = [{"subresource": s, "responseKind": _sub_kind(s, kind),
                                  "verbs": list(subresource_verbs(s))}
                                 for s in r.subresources]
    return entry


def _sub_kind(sub: str, own: Obj) -> Obj:
    other = SUBRESOURCE_KINDS.get(sub)
    if other is None:
        return own
    return {"group": other.group, "version": other.version, "kind": other.kind}


def aggregated(version: str, *, core: bool) -> Obj:
    """APIGroupDiscoveryList for /api (core=True) or /apis (core=False)."""
    groups = [""] if core else sorted({g for g, _ in GROUP_VERSIONS if g})
    items = []
    for group in groups:
        versions = [{"version": v, "freshness": "Current",
                     "resources": [_aggregated_resource(r) for r in _resources_of(group, v)]}
                    for g, v in GROUP_VERSIONS if g == group]
        items.append({"metadata": {"name": group, "creationTimestamp": None},
                      "versions": versions})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": f"apidiscovery.k8s.io/{version}",
            "metadata": {}, "items": items}
