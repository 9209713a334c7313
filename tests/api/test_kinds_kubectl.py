"""Real kubectl (two versions) over TLS with the admin kubeconfig: the kinds a kube-proxy
DaemonSet deployment needs (DaemonSet, ServiceAccount, ClusterRoleBinding, ConfigMap),
applied, listed, changed, refused where upstream refuses, deleted; `kubectl create token`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from kubeproxy.apiserver import auth
from kubeproxy.apiserver.server import KubeconfigUser, kubeconfig_text
from tests.api.conftest import Kubectl, Running, unique
from tests.api.test_kubectl import table

MANIFEST = """\
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {name}
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {name}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:node-proxier
subjects:
- kind: ServiceAccount
  name: {name}
  namespace: kube-system
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}
  namespace: kube-system
data:
  config.conf: |
    apiVersion: kubeproxy.config.k8s.io/v1alpha1
    kind: KubeProxyConfiguration
    mode: {mode}
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {name}
  namespace: kube-system
  labels: {{k8s-app: {name}}}
spec:
  selector:
    matchLabels: {{k8s-app: {name}}}
  template:
    metadata:
      labels: {{k8s-app: {name}}}
    spec:
      serviceAccountName: {name}
      hostNetwork: true
      nodeSelector: {{kubernetes.io/os: linux}}
      containers:
      - name: kube-proxy
        image: registry.k8s.io/kube-proxy:v1.31.0
        command: [/usr/local/bin/kube-proxy, --config=/var/lib/kube-proxy/config.conf]
        volumeMounts:
        - {{name: kube-proxy, mountPath: /var/lib/kube-proxy}}
      volumes:
      - name: kube-proxy
        configMap: {{name: {name}}}
"""


def test_daemonset_deployment_round_trip(secure_kubectl: Kubectl, tmp_path: Path) -> None:
    k = secure_kubectl
    name = unique("kube-proxy")
    manifest = tmp_path / "kube-proxy.yaml"
    manifest.write_text(MANIFEST.format(name=name, mode="iptables"))
    created = k("apply", "-f", str(manifest)).stdout.split("\n")
    assert [line for line in created if line] == [
        f"serviceaccount/{name} created",
        f"clusterrolebinding.rbac.authorization.k8s.io/{name} created",
        f"configmap/{name} created", f"daemonset.apps/{name} created"]
    assert "unchanged" in k("apply", "-f", str(manifest)).stdout
    manifest.write_text(MANIFEST.format(name=name, mode="nftables"))
    assert f"configmap/{name} configured" in k("apply", "-f", str(manifest)).stdout

    got = k("get", "ds,cm,sa,clusterrolebinding", "-A").stdout
    assert f"daemonset.apps/{name}" in got and f"configmap/{name}" in got
    assert f"serviceaccount/{name}" in got
    assert f"clusterrolebinding.rbac.authorization.k8s.io/{name}" in got
    assert "clusterrolebinding.rbac.authorization.k8s.io/system:node-proxier" in got
    ds_rows = {r["NAME"]: r for r in table(k("get", "ds", "-n", "kube-system", "-o",
                                             "wide").stdout)}
    row = ds_rows[name]
    assert (row["DESIRED"], row["NODE SELECTOR"], row["CONTAINERS"], row["SELECTOR"]) == \
        ("0", "kubernetes.io/os=linux", "kube-proxy", f"k8s-app={name}")
    crb = {r["NAME"]: r for r in table(k("get", "clusterrolebinding", "-o", "wide").stdout)}
    assert crb[name]["ROLE"] == "ClusterRole/system:node-proxier"
    assert crb[name]["SERVICEACCOUNTS"] == f"kube-system/{name}"
    cm = {r["NAME"]: r for r in table(k("get", "cm", "-n", "kube-system").stdout)}
    assert cm[name]["DATA"] == "1"

    ds = json.loads(k("get", "ds", name, "-n", "kube-system", "-o", "json").stdout)
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert ds["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    assert ds["status"]["desiredNumberScheduled"] == 0 and ds["metadata"]["generation"] == 1
    k("patch", "ds", name, "-n", "kube-system", "--subresource=status", "--type=merge",
      "-p", '{"status":{"desiredNumberScheduled":2,"numberReady":1}}')
    status = json.loads(k("get", "ds", name, "-n", "kube-system", "-o", "json").stdout)
    assert status["status"]["desiredNumberScheduled"] == 2
    assert status["metadata"]["generation"] == 1  # status is not the spec

    deleted = k("delete", "-f", str(manifest)).stdout
    assert f'daemonset.apps "{name}" deleted' in deleted
    assert f'clusterrolebinding.rbac.authorization.k8s.io "{name}" deleted' in deleted
    left = k("get", "ds,cm,sa", "-n", "kube-system", "-o", "name").stdout
    assert name not in left


def test_upstream_validation(secure_kubectl: Kubectl, tmp_path: Path) -> None:
    k = secure_kubectl
    name = unique("kp")
    bad = tmp_path / "bad.yaml"
    text = MANIFEST.format(name=name, mode="iptables")
    ds = text[text.index("apiVersion: apps/v1"):]
    bad.write_text(ds.replace("    metadata:\n      labels: {k8s-app: " + name + "}",
                              "    metadata:\n      labels: {k8s-app: other}"))
    refused = k("apply", "-f", str(bad), check=False)
    assert refused.returncode != 0
    assert "spec.template.metadata.labels: Invalid value" in refused.stderr
    assert "`selector` does not match template `labels`" in refused.stderr

    crb = text[text.index("apiVersion: rbac"):text.index("---\napiVersion: v1\nkind: ConfigMap")]
    good = tmp_path / "crb.yaml"
    good.write_text(crb)
    k("apply", "-f", str(good))
    good.write_text(crb.replace("system:node-proxier", "cluster-admin"))
    changed = k("apply", "-f", str(good), check=False)
    assert changed.returncode != 0 and "roleRef: Invalid value" in changed.stderr
    assert "cannot change roleRef" in changed.stderr
    k("delete", "-f", str(good))
    bad.write_text(crb.replace("kind: ServiceAccount", "kind: Robot"))
    robot = k("apply", "-f", str(bad), check=False)
    assert 'subjects[0].kind: Unsupported value: "Robot"' in robot.stderr


def test_kubectl_create_token(secure_kubectl: Kubectl, secure_api: Running,
                              tmp_path: Path) -> None:
    k = secure_kubectl
    key = (secure_api.kubeconfig.parent / "pki" / "sa.key").read_bytes().strip()
    name = unique("sa")
    k("create", "serviceaccount", name, "-n", "kube-system")
    try:
        token = k("create", "token", name, "-n", "kube-system", "--duration=20m").stdout.strip()
        claims = auth.decode_jwt(key, token)  # signed with the server's key
        assert claims["sub"] == f"system:serviceaccount:kube-system:{name}"
        assert claims["exp"] - claims["iat"] == 1200
        # Not `--token`: kubectl would still present the admin certificate, which wins (as
        # in kube-apiserver, x509 comes before tokens). A kubeconfig of the token alone:
        ca = (secure_api.kubeconfig.parent / "pki" / "ca.crt").read_text()
        sa_config = tmp_path / "sa.kubeconfig"
        sa_config.write_text(kubeconfig_text(secure_api.url, ca_pem=ca,
                                             user=KubeconfigUser(token=token)))
        as_sa = subprocess.run([str(k.binary), f"--kubeconfig={sa_config}",  # type: ignore[attr-defined]
                                "get", "pods", "-n", "kube-system"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert as_sa.returncode != 0
        assert (f'User "system:serviceaccount:kube-system:{name}" cannot list resource "pods" '
                'in API group "" in the namespace "kube-system"') in as_sa.stderr
    finally:
        k("delete", "serviceaccount", name, "-n", "kube-system")

