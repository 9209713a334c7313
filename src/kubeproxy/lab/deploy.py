"""deploy/ on a lab: the manifests as a test gives them, and waiting until they serve.

Theory of operation
-------------------
A lab started with ``--no-proxy`` runs no proxy of its own; ``kubectl apply -f deploy/``
makes the lab's DaemonSet controller and kubelet run the DaemonSet's Pod on every node
(daemonsets.py, hostpods.py). This module has what a caller (the kernel tests, a user
at a Python prompt) needs around that, nothing that applies: the applying is kubectl's.

- **Documents.** ``manifests`` reads ``deploy/*.yaml`` as they are. The few edits a
  lab run makes are pure functions over the documents, each one a setting an operator
  would change the same way: ``with_api_server`` fills the one value deploy/ leaves
  to the operator, the ``server`` of the ConfigMap's ``kubeconfig.conf``, with the API
  server as a lab node reaches it (``LAB_SERVER``; kubeadm writes the control plane's
  address there), ``with_config`` sets fields of the ConfigMap's ``config.conf``
  (``mode``), ``kubeadm_configmap`` is kubeadm's own ConfigMap pointed at the same
  server, ``with_configmap`` swaps it in, ``with_args``
  appends flags to the DaemonSet's command (this project's own flags, e.g.
  ``--lb-algorithm``, which no KubeProxyConfiguration field carries).
- **Readiness.** ``wait_for_pods`` returns once every lab node has a Running, Ready
  Pod of the DaemonSet and every node's proxy answers ``/metrics`` in its namespace;
  ``wait_until_served`` then also waits for ``Lab.settle`` (every node's proxy synced
  after the last change the agent saw, converge.py): the readiness ``lab up`` waits
  for with the lab's own proxies. Both are bounded and fail naming the nodes still
  missing, with the Pods' log tails.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from kubeproxy.errors import LabError
from kubeproxy.lab import converge, objects
from kubeproxy.lab.hostpods import API_HOST, API_PORT
from kubeproxy.lab.processes import log_tail, time_scale
from kubeproxy.lab.runtime import Lab
from kubeproxy.util.jsontypes import JSON

NAMESPACE, NAME = "kube-system", "kube-proxy"  # kubeadm's names, which deploy/ keeps
CONFIG_KEY, KUBECONFIG_KEY = "config.conf", "kubeconfig.conf"
# deploy/'s kubeconfig.conf names this server until an operator sets theirs; the
# address a lab node's proxy reaches the lab's API server on (runtime.py).
PLACEHOLDER_SERVER = "https://kube-apiserver.invalid:6443"
LAB_SERVER = f"https://{API_HOST}:{API_PORT}"
SERVE_TIMEOUT = 60.0  # seconds: Pods started, proxies answering (the settle has its own)
POLL = 0.2


def manifests(directory: Path) -> list[JSON]:
    """Every document of ``directory``'s ``*.yaml`` files, in file order."""
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _find(docs: Sequence[JSON], kind: str) -> int:
    found = [i for i, d in enumerate(docs) if d.get("kind") == kind
             and (d.get("metadata") or {}).get("name") == NAME]  # fmt: skip
    if len(found) != 1:
        raise LabError(f"the manifests have {len(found)} {kind} {NAMESPACE}/{NAME}, not one")
    return found[0]


def with_config(docs: Sequence[JSON], **fields: object) -> list[JSON]:
    """The documents with top-level fields of the ConfigMap's config.conf set."""
    out = copy.deepcopy(list(docs))
    cm = out[_find(out, "ConfigMap")]
    config = yaml.safe_load(cm["data"][CONFIG_KEY])
    config.update(fields)
    cm["data"][CONFIG_KEY] = yaml.safe_dump(config, sort_keys=False)
    return out


def with_api_server(docs: Sequence[JSON], server: str = LAB_SERVER) -> list[JSON]:
    """The documents with the ConfigMap's kubeconfig.conf naming ``server``."""
    out = copy.deepcopy(list(docs))
    i = _find(out, "ConfigMap")
    out[i] = _pointed_at(out[i], server)
    return out


def _pointed_at(cm: JSON, server: str) -> JSON:
    kubeconfig = yaml.safe_load(cm["data"][KUBECONFIG_KEY])
    for cluster in kubeconfig["clusters"]:
        cluster["cluster"]["server"] = server
    cm["data"][KUBECONFIG_KEY] = yaml.safe_dump(kubeconfig, sort_keys=False)
    return cm


def kubeadm_configmap(path: Path, server: str = LAB_SERVER) -> JSON:
    """kubeadm's kube-proxy ConfigMap as kubeadm would write it for the lab: its
    kubeconfig.conf naming ``server`` (the API server inside a lab node's namespace)."""
    cm: JSON = yaml.safe_load(path.read_text())
    return _pointed_at(cm, server)


def with_configmap(docs: Sequence[JSON], cm: JSON) -> list[JSON]:
    out = copy.deepcopy(list(docs))
    out[_find(out, "ConfigMap")] = copy.deepcopy(cm)
    return out


def with_args(docs: Sequence[JSON], args: Sequence[str]) -> list[JSON]:
    """The DaemonSet's container command with ``args`` appended."""
    out = copy.deepcopy(list(docs))
    container = out[_find(out, "DaemonSet")]["spec"]["template"]["spec"]["containers"][0]
    container["command"] = [*container["command"], *args]
    return out


def dump(docs: Sequence[JSON]) -> str:
    """The documents as one YAML stream (for ``kubectl apply -f -``)."""
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def proxy_pods(lab: Lab) -> dict[str, JSON]:
    """Node -> the Running, Ready Pod of the kube-proxy DaemonSet there (the oldest)."""
    pods = lab.api().list("Pod", NAMESPACE)[0]
    out: dict[str, JSON] = {}
    for pod in sorted(pods, key=lambda p: str(p["metadata"].get("creationTimestamp") or "")):
        owners = pod["metadata"].get("ownerReferences") or []
        if not any(o.get("kind") == "DaemonSet" and o.get("name") == NAME for o in owners):
            continue
        running = (pod.get("status") or {}).get("phase") == "Running"
        if running and objects.is_ready(pod) and not objects.is_terminating(pod):
            out.setdefault(str(pod["spec"].get("nodeName")), pod)
    return out


def proxy_log(lab: Lab, node: str) -> Path:
    """The log of the proxy serving ``node``: the lab's own (``logs/proxy-<node>.log``),
    or, in a lab started without them, the kube-proxy DaemonSet Pod's there."""
    if lab.proxies():
        return lab.store.log_file(f"proxy-{node}")
    pod = proxy_pods(lab).get(node)
    if pod is None:
        raise LabError(f"lab {lab.name!r}: no Ready kube-proxy Pod on node {node}")
    return lab.store.log_file(f"{NAMESPACE}_{pod['metadata']['name']}")


def wait_for_pods(lab: Lab, timeout: float = SERVE_TIMEOUT) -> dict[str, JSON]:
    """Until every node runs a Ready kube-proxy Pod and its proxy answers /metrics in
    the node's namespace; returns node -> Pod. Raises LabError, naming what is missing."""
    timeout *= time_scale()
    deadline = time.monotonic() + timeout
    nodes = {n.name: n.ns for n in lab.state().nodes}
    while True:
        pods = proxy_pods(lab)
        answering = {n for n, ns in nodes.items() if converge.proxy_sample(ns) is not None}
        if set(pods) == set(nodes) == answering:
            return pods
        if time.monotonic() > deadline:
            raise LabError(_not_served(lab, nodes, pods, answering, timeout))
        time.sleep(POLL)


def wait_until_served(lab: Lab, timeout: float = SERVE_TIMEOUT) -> dict[str, JSON]:
    """``wait_for_pods``, then until every node's proxy has synced what the API holds
    (``Lab.settle``, as ``lab up`` waits for its own proxies)."""
    pods = wait_for_pods(lab, timeout)
    lab.store.settled_file.unlink(missing_ok=True)  # settled before these proxies answered
    lab.settle()
    return pods


def _not_served(lab: Lab, nodes: Mapping[str, str], pods: Mapping[str, JSON],
                answering: set[str], timeout: float) -> str:  # fmt: skip
    lines = [f"deploy/'s kube-proxy did not serve lab {lab.name!r} within {timeout:g} s: "
             f"Ready Pods on {sorted(pods)}, proxies answering on {sorted(answering)}, "
             f"nodes {sorted(nodes)}"]  # fmt: skip
    for log in sorted(lab.store.dir.glob(f"logs/{NAMESPACE}_*")):
        lines.append(f"{log.name} ends:\n{log_tail(log, 1500)}")
    daemonsets = lab.store.log_file("daemonsets")
    lines.append(f"the DaemonSet controller's log ends:\n{log_tail(daemonsets, 800)}")
    return "\n".join(lines)
