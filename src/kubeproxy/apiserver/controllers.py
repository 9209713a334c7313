"""The controllers whose work clients expect to see, done at once inside the write.

Theory of operation. In a cluster, kube-controller-manager watches the API and writes
back a moment later; kubectl users and tests would see the gap. Here the registry calls
`Controllers.react` after every commit (registry.py), so the follow-up writes happen
under the same lock, with the next resourceVersions, before the request is answered:

- every namespace gets a `default` ServiceAccount when it is created (and gets it back
  when it is deleted, unless the namespace itself is going), as kube-controller-manager's
  ServiceAccount controller does;
- every ClusterRole with an `aggregationRule` is rewritten (MODIFIED) to hold the rules
  of the ClusterRoles its selectors match whenever a ClusterRole changes (the clusterrole
  aggregation controller; escalation.py computes the rules).

`bootstrap_rbac` creates upstream's bootstrap RBAC policy (rbac.py) where it is missing,
as kube-apiserver's post-start hook does, and `reconcile` runs all three over a store
just restored from a snapshot, which may be older than any of them.
"""

from __future__ import annotations

import copy

from kubeproxy.apiserver import escalation, rbac, resources
from kubeproxy.apiserver.registry import Registry
from kubeproxy.apiserver.resources import Resource
from kubeproxy.apiserver.storage import Key

DEFAULT_SERVICE_ACCOUNT = "default"  # made in every namespace (the SA controller's)


class Controllers:
    def __init__(self) -> None:
        self._aggregating = False  # aggregate is writing: no nested aggregation

    def react(self, registry: Registry, res: Resource, kind: str, key: Key) -> None:
        """What the controllers do about one change just committed."""
        if res is resources.CLUSTERROLES:
            self.aggregate(registry)
        elif res is resources.NAMESPACES and kind == "ADDED":
            self.default_service_account(registry, key[1])
        elif (res is resources.SERVICEACCOUNTS and kind == "DELETED"
              and key[1] == DEFAULT_SERVICE_ACCOUNT):
            self.default_service_account(registry, key[0])  # the controller puts it back

    def reconcile(self, registry: Registry) -> None:
        """Bring a restored store up to what the controllers would have made of it."""
        # A snapshot older than RBAC lacks the bootstrap policy (upstream: reconciled).
        self.bootstrap_rbac(registry)
        for _, name in list(registry.storage.objects(resources.NAMESPACES)):
            self.default_service_account(registry, name)  # as the SA controller would
        self.aggregate(registry)

    @staticmethod
    def bootstrap_rbac(registry: Registry) -> None:
        """Create the bootstrap roles and bindings that are missing (not those changed)."""
        for key, body in rbac.bootstrap_objects():
            res = resources.BY_KEY[key]
            if ("", body["metadata"]["name"]) not in registry.storage.objects(res):
                registry.create(res, None, body)

    @staticmethod
    def default_service_account(registry: Registry, namespace: str) -> None:
        """The ServiceAccount controller's job: every namespace has a `default` one."""
        storage = registry.storage
        if ("", namespace) in storage.objects(resources.NAMESPACES) and \
                not registry.emptying(namespace) and \
                (namespace, DEFAULT_SERVICE_ACCOUNT) not in storage.objects(
                    resources.SERVICEACCOUNTS):
            registry.create(resources.SERVICEACCOUNTS, namespace,
                            {"metadata": {"name": DEFAULT_SERVICE_ACCOUNT}})

    def aggregate(self, registry: Registry) -> None:
        """The ClusterRole aggregation controller's job, done at once: every ClusterRole
        with an aggregationRule holds the rules of the ClusterRoles it selects
        (escalation.aggregated_rules); repeated until nothing changes, since an
        aggregated role may itself be selected by another."""
        if self._aggregating:
            return
        self._aggregating = True
        try:
            roles = registry.storage.objects(resources.CLUSTERROLES)
            for _ in range(len(roles) + 1):
                by_name = {name: obj for (_, name), obj in roles.items()}
                stale = [(obj, rules) for obj in by_name.values()
                         if (rules := escalation.aggregated_rules(obj, by_name)) is not None
                         and rules != (obj.get("rules") or [])]
                if not stale:
                    return
                for obj, rules in stale:
                    new = copy.deepcopy(obj)
                    new["rules"] = copy.deepcopy(rules)
                    registry.commit(resources.CLUSTERROLES, "MODIFIED", new, obj)
        finally:
            self._aggregating = False
