"""Real kubectl (two versions) against the server: the round trips a lab user does.

create / apply (validation on: twice is `unchanged`, a changed file is `configured` via a
strategic merge patch) / get (-o json and the default table) / get -w / patch (merge,
strategic, json) / edit (KUBE_EDITOR) / delete, on Services, Pods, EndpointSlices and
Nodes. Each test works in a namespace of its own on the shared server.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.api.conftest import Kubectl, Running, kubectl_argv, unique


def table(text: str) -> list[dict[str, str]]:
    """Parse kubectl's column output into rows keyed by the header."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    names = [header[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
    rows = []
    for line in lines[1:]:
        cells = [line[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def headers(text: str) -> list[str]:
    return re.split(r"\s{2,}", text.splitlines()[0].strip())


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def editor(tmp_path: Path, old: str, new: str) -> dict[str, str]:
    script = tmp_path / "editor.sh"
    script.write_text(f"#!/bin/sh\nsed -i 's/{old}/{new}/' \"$1\"\n")
    script.chmod(0o755)
    return {"KUBE_EDITOR": str(script), "EDITOR": str(script)}


SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  labels: {app: web}
spec:
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 8080
"""


def test_services_round_trip(kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    def k(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return kubectl(*args, namespace=namespace, **kw)

    manifest = tmp_path / "svc.yaml"
    manifest.write_text(SERVICE)
    assert k("apply", "-f", str(manifest)).stdout.strip() == "service/web created"
    assert k("apply", "-f", str(manifest)).stdout.strip() == "service/web unchanged"
    manifest.write_text(SERVICE.replace("port: 80", "port: 81").replace("{app: web}\n  ports",
                                                                         "{app: web2}\n  ports"))
    assert k("apply", "-f", str(manifest)).stdout.strip() == "service/web configured"
    obj = as_json(k("get", "service", "web", "-o", "json"))
    assert [p["port"] for p in obj["spec"]["ports"]] == [81]
    assert obj["spec"]["selector"] == {"app": "web2"}
    assert obj["spec"]["clusterIP"].startswith("10.96.")
    assert "kubectl.kubernetes.io/last-applied-configuration" in obj["metadata"]["annotations"]

    out = k("get", "services").stdout
    assert headers(out) == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    row = table(out)[0]
    assert (row["NAME"], row["TYPE"], row["PORT(S)"]) == ("web", "ClusterIP", "81/TCP")
    assert headers(k("get", "svc", "-o", "wide").stdout)[-1] == "SELECTOR"

    k("patch", "svc", "web", "--type", "merge", "-p", '{"metadata":{"labels":{"tier":"fe"}}}')
    k("patch", "svc", "web", "-p", '{"spec":{"ports":[{"name":"metrics","port":9090}]}}')
    k("patch", "svc", "web", "--type", "json",
      "-p", '[{"op":"replace","path":"/spec/type","value":"NodePort"}]')
    obj = as_json(k("get", "svc", "web", "-o", "json"))
    assert obj["metadata"]["labels"] == {"app": "web", "tier": "fe"}
    assert [(p["name"], p["port"]) for p in obj["spec"]["ports"]] == [("http", 81),
                                                                     ("metrics", 9090)]
    assert obj["spec"]["type"] == "NodePort"
    assert all(30000 <= p["nodePort"] <= 32767 for p in obj["spec"]["ports"])

    k("edit", "svc", "web", env=editor(tmp_path, "tier: fe", "tier: be"))
    assert as_json(k("get", "svc", "web", "-o", "json"))["metadata"]["labels"]["tier"] == "be"

    assert k("delete", "svc", "web").stdout.strip() == 'service "web" deleted'
    gone = k("get", "svc", "web", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  labels: {app: web}
spec:
  nodeName: node-a
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: registry.example/web:1
    ports: [{containerPort: 8080, name: http}]
"""


def test_pods_round_trip(kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    def k(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return kubectl(*args, namespace=namespace, **kw)

    manifest = tmp_path / "pod.yaml"
    manifest.write_text(POD)
    assert k("create", "-f", str(manifest)).stdout.strip() == "pod/web-1 created"
    manifest.write_text(POD.replace("web:1", "web:2"))
    assert k("apply", "-f", str(manifest)).stdout.strip() == "pod/web-1 configured"
    k("patch", "pod", "web-1", "--subresource", "status", "--type", "merge",
      "-p", '{"status":{"phase":"Running","podIP":"10.244.1.5"}}')
    out = k("get", "pods", "-o", "wide").stdout
    assert headers(out) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE",
                            "NOMINATED NODE", "READINESS GATES"]
    row = table(out)[0]
    assert (row["NAME"], row["READY"], row["STATUS"], row["IP"], row["NODE"]) == (
        "web-1", "0/1", "Running", "10.244.1.5", "node-a")
    k("patch", "pod", "web-1", "-p", '{"spec":{"containers":[{"name":"web","image":"x:3"}]}}')
    k("edit", "pod", "web-1", env=editor(tmp_path, "x:3", "x:4"))
    obj = as_json(k("get", "pod", "web-1", "-o", "json"))
    assert obj["spec"]["containers"][0]["image"] == "x:4"
    assert obj["spec"]["containers"][0]["ports"] == [
        {"containerPort": 8080, "name": "http", "protocol": "TCP"}]
    moved = k("patch", "pod", "web-1", "--type", "merge", "-p", '{"spec":{"nodeName":"b"}}',
              check=False)
    assert moved.returncode != 0 and "pod updates may not change fields" in moved.stderr
    started = time.monotonic()
    assert k("delete", "pod", "web-1").stdout.strip() == 'pod "web-1" deleted'
    assert time.monotonic() - started >= 0.5  # waited out the 1 s grace period


ENDPOINT_SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
  nodeName: node-a
"""


def test_endpointslices_round_trip(kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    def k(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return kubectl(*args, namespace=namespace, **kw)

    manifest = tmp_path / "es.yaml"
    manifest.write_text(ENDPOINT_SLICE)
    assert "created" in k("apply", "-f", str(manifest)).stdout
    assert "unchanged" in k("apply", "-f", str(manifest)).stdout
    manifest.write_text(ENDPOINT_SLICE.replace("[10.244.1.5]", "[10.244.1.6, 10.244.2.7]"))
    assert "configured" in k("apply", "-f", str(manifest)).stdout
    out = k("get", "endpointslices").stdout
    assert headers(out) == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    assert table(out)[0]["ENDPOINTS"] == "10.244.1.6,10.244.2.7"
    k("patch", "endpointslice", "web-abc", "--type", "json",
      "-p", '[{"op":"add","path":"/endpoints/0/conditions/terminating","value":true}]')
    k("edit", "endpointslice", "web-abc", env=editor(tmp_path, "port: 8080", "port: 8081"))
    obj = as_json(k("get", "endpointslice", "web-abc", "-o", "json"))
    assert obj["endpoints"][0]["conditions"] == {"ready": True, "terminating": True}
    assert obj["ports"][0]["port"] == 8081
    listed = as_json(k("get", "endpointslices", "-l", "kubernetes.io/service-name=web",
                       "-o", "json"))
    assert [i["metadata"]["name"] for i in listed["items"]] == ["web-abc"]
    assert "deleted" in k("delete", "-f", str(manifest)).stdout


NODE = """\
apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels: {{topology.kubernetes.io/zone: z1, node-role.kubernetes.io/worker: ""}}
spec:
  podCIDR: 10.244.1.0/24
status:
  addresses: [{{type: InternalIP, address: 192.168.0.2}}]
  conditions: [{{type: Ready, status: "True"}}]
  nodeInfo: {{kubeletVersion: v1.31.0, osImage: Lab, kernelVersion: "6.1",
    containerRuntimeVersion: "lab://1", machineID: "", systemUUID: "", bootID: "",
    kubeProxyVersion: "", operatingSystem: linux, architecture: amd64}}
"""


def test_nodes_round_trip(kubectl: Kubectl, tmp_path: Path) -> None:
    name = unique("node")
    manifest = tmp_path / "node.yaml"
    manifest.write_text(NODE.format(name=name))
    assert kubectl("create", "-f", str(manifest)).stdout.strip() == f"node/{name} created"
    out = kubectl("get", "node", name, "-o", "wide").stdout
    assert headers(out) == ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP",
                            "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"]
    row = table(out)[0]
    assert (row["STATUS"], row["ROLES"], row["VERSION"], row["INTERNAL-IP"]) == (
        "Ready", "worker", "v1.31.0", "192.168.0.2")
    kubectl("patch", "node", name, "--type", "merge", "-p", '{"spec":{"unschedulable":true}}')
    assert table(kubectl("get", "node", name).stdout)[0]["STATUS"] == "Ready,SchedulingDisabled"
    kubectl("edit", "node", name, env=editor(tmp_path, "zone: z1", "zone: z2"))
    obj = as_json(kubectl("get", "node", name, "-o", "json"))
    assert obj["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z2"
    assert obj["status"]["nodeInfo"]["kubeletVersion"] == "v1.31.0"  # status kept on create
    assert kubectl("delete", "node", name).stdout.strip() == f'node "{name}" deleted'


def test_get_watch_sees_an_added_object(kubectl: Kubectl, api: Running, namespace: str) -> None:
    argv = kubectl_argv(kubectl, api, "get", "services", "--watch", "--output-watch-events",
                        namespace=namespace)
    watcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # let it list and start watching
        kubectl("create", "service", "clusterip", "watched", "--tcp=80:8080",
                namespace=namespace)
        deadline = time.monotonic() + 15
        seen = ""
        assert watcher.stdout is not None
        while time.monotonic() < deadline and "watched" not in seen:
            seen += watcher.stdout.readline()
        assert "ADDED" in seen and "watched" in seen and "ClusterIP" in seen
    finally:
        watcher.kill()  # by PID: it is our child
        watcher.wait(timeout=5)


def test_validation_rejects_unknown_fields_and_bad_values(kubectl: Kubectl, namespace: str,
                                                          tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text(SERVICE.replace("  selector:", "  bogus: 1\n  selector:"))
    result = kubectl("apply", "-f", str(bogus), namespace=namespace, check=False)
    assert result.returncode != 0 and 'unknown field "spec.bogus"' in result.stderr
    lenient = kubectl("apply", "--validate=false", "-f", str(bogus), namespace=namespace)
    assert "created" in lenient.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(SERVICE.replace("name: web", "name: bad").replace("port: 80", "port: 70000"))
    result = kubectl("create", "-f", str(bad), namespace=namespace, check=False)
    assert result.returncode != 0
    assert "spec.ports[0].port: Invalid value: 70000" in result.stderr


def test_discovery_explain_and_api_resources(kubectl: Kubectl) -> None:
    listing = kubectl("api-resources").stdout
    for word in ("pods", "services", "nodes", "namespaces", "endpointslices"):
        assert word in listing
    explained = kubectl("explain", "service.spec.ports").stdout
    assert "targetPort" in explained and "nodePort" in explained
    assert "v1.31" in kubectl("version", "-o", "json", check=False).stdout


def test_typed_commands_and_server_side_apply(kubectl: Kubectl, namespace: str,
                                              tmp_path: Path) -> None:
    """`create namespace`, `run`, `expose` use kubectl's typed client (protobuf bodies from
    1.32 on); `apply --server-side` sends an apply patch."""
    other = unique("ns")
    assert kubectl("create", "namespace", other).stdout.strip() == f"namespace/{other} created"
    assert kubectl("delete", "namespace", other).stdout.strip() == f'namespace "{other}" deleted'

    def k(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return kubectl(*args, namespace=namespace, **kw)

    k("run", "web", "--image=registry.example/web:1", "--labels=app=web", "--port=8080",
      "--env=MODE=lab")
    k("expose", "pod", "web", "--port=80", "--target-port=8080", "--name=web")
    svc = as_json(k("get", "svc", "web", "-o", "json"))
    assert svc["spec"]["selector"] == {"app": "web"}
    assert svc["spec"]["ports"][0]["targetPort"] == 8080
    pod = as_json(k("get", "pod", "web", "-o", "json"))
    assert pod["spec"]["containers"][0]["env"] == [{"name": "MODE", "value": "lab"}]

    manifest = tmp_path / "ssa.yaml"
    manifest.write_text(SERVICE.replace("name: web", "name: ssa"))
    assert "serverside-applied" in k("apply", "--server-side", "-f", str(manifest)).stdout
    manifest.write_text(SERVICE.replace("name: web", "name: ssa").replace("port: 80",
                                                                         "port: 8080"))
    assert "serverside-applied" in k("apply", "--server-side", "-f", str(manifest)).stdout
    ports = as_json(k("get", "svc", "ssa", "-o", "json"))["spec"]["ports"]
    assert [(p["name"], p["port"]) for p in ports] == [("http", 8080)]
