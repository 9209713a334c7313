"""deploy/: the facts a cluster relies on, checked on the files (no image is built here).

The manifests are parsed as YAML and held to kubeadm's kube-proxy addon (what an
operator migrating from it expects); the DaemonSet's command line is run through our own
flag parser with the ConfigMap's config.conf, so a flag or field we do not know fails
here rather than in a cluster; the Dockerfile is read for the packages and the path the
command names.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeproxy.config import flags
from kubeproxy.config import v1alpha1 as kpconfig
from kubeproxy.lab import deploy as lab_deploy
from kubeproxy.lab.hostpods import expand

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def documents() -> dict[str, dict[str, Any]]:
    """kind -> the document (one of each), from every YAML file kubectl would apply."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']}s in deploy/"
                out[doc["kind"]] = doc
    return out


DOCS = documents()
DS = DOCS["DaemonSet"]
POD = DS["spec"]["template"]["spec"]
CONTAINER = POD["containers"][0]


def volume(name: str) -> dict[str, Any]:
    return next(v for v in POD["volumes"] if v["name"] == name)


def mount(path: str) -> dict[str, Any]:
    return next(m for m in CONTAINER["volumeMounts"] if m["mountPath"] == path)


def test_the_objects_kubeadm_creates() -> None:
    assert sorted(DOCS) == ["ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
    for kind in ("ServiceAccount", "ConfigMap", "DaemonSet"):
        meta = DOCS[kind]["metadata"]
        assert (meta["namespace"], meta["name"]) == ("kube-system", "kube-proxy"), kind
    crb = DOCS["ClusterRoleBinding"]
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": "system:node-proxier"}  # fmt: skip
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "kube-proxy",
                                "namespace": "kube-system"}]  # fmt: skip
    assert POD["serviceAccountName"] == "kube-proxy"


# (id, what the DaemonSet's pod spec must say, as kubeadm's addon says it)
POD_FACTS = [
    ("host-network", lambda: POD["hostNetwork"], True),
    ("privileged", lambda: CONTAINER["securityContext"]["privileged"], True),
    ("node-critical", lambda: POD["priorityClassName"], "system-node-critical"),
    ("every-taint-tolerated", lambda: POD["tolerations"], [{"operator": "Exists"}]),
    ("linux-nodes", lambda: POD["nodeSelector"], {"kubernetes.io/os": "linux"}),
    ("node-name-env", lambda: CONTAINER["env"],
     [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]),
    ("config-volume", lambda: (mount("/var/lib/kube-proxy")["name"],
                               volume(mount("/var/lib/kube-proxy")["name"])["configMap"]),
     ("kube-proxy", {"name": "kube-proxy"})),
    ("xtables-lock", lambda: (volume(mount("/run/xtables.lock")["name"])["hostPath"],
                              mount("/run/xtables.lock").get("readOnly", False)),
     ({"path": "/run/xtables.lock", "type": "FileOrCreate"}, False)),
    ("lib-modules", lambda: (volume(mount("/lib/modules")["name"])["hostPath"]["path"],
                             mount("/lib/modules")["readOnly"]), ("/lib/modules", True)),
    ("selector-matches-template", lambda: DS["spec"]["selector"]["matchLabels"].items()
     <= DS["spec"]["template"]["metadata"]["labels"].items(), True),
]  # fmt: skip


@pytest.mark.parametrize(("get", "want"), [f[1:] for f in POD_FACTS],
                         ids=[f[0] for f in POD_FACTS])  # fmt: skip
def test_daemonset_is_kubeadms_addon(get: Any, want: Any) -> None:
    assert get() == want


def test_command_is_our_console_script_at_kubeadms_path() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    program = CONTAINER["command"][0]
    assert program == "/usr/local/bin/kube-proxy"
    assert Path(program).name in scripts
    assert scripts["kube-proxy"] == "kubeproxy.app.cli:kube_proxy_main"


def config_conf() -> str:
    text: str = DOCS["ConfigMap"]["data"]["config.conf"]
    return text


def test_config_conf_loads_without_warnings() -> None:
    decoded = kpconfig.decode(yaml.safe_load(config_conf()), "config.conf")
    assert decoded.warnings == ()
    settings = kpconfig.proxy_settings(kpconfig.resolve(decoded.fields, {}))
    # kubeadm's: the API server by its own address, never the `kubernetes` Service
    assert settings["kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    assert (settings["mode"], settings["detect_local_mode"].value) == ("iptables", "NodeCIDR")


def test_command_line_parses_with_our_flags(tmp_path: Path) -> None:
    """The DaemonSet's argv, $(NODE_NAME) expanded as kubelet does, the config file at
    the path the ConfigMap volume puts it: our flags accept it, with nothing ignored."""
    config_dir = tmp_path / "var-lib-kube-proxy"
    config_dir.mkdir()
    (config_dir / "config.conf").write_text(config_conf())
    argv = [expand(a, {"NODE_NAME": "node-1"}) for a in CONTAINER["command"][1:]]
    assert argv == ["--config=/var/lib/kube-proxy/config.conf", "--hostname-override=node-1"]
    argv[0] = argv[0].replace("/var/lib/kube-proxy", str(config_dir))
    parser = argparse.ArgumentParser()
    flags.add_flags(parser)
    eff = flags.effective(parser.parse_args(argv))
    assert eff.notes == ()
    assert eff.fields["hostnameOverride"] == "node-1"
    assert eff.fields["clientConnection.kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"


def test_kubeconfig_conf_names_the_api_server_and_the_pod_credentials() -> None:
    """kubeadm's kubeconfig.conf: the one value an operator sets is the server, shipped
    as an address that never resolves (so a forgotten edit fails at once, naming it);
    the token and CA are the service-account files kubelet mounts in every Pod."""
    cm = DOCS["ConfigMap"]["data"]
    kubeconfig = yaml.safe_load(cm["kubeconfig.conf"])
    (cluster,) = kubeconfig["clusters"]
    (user,) = kubeconfig["users"]
    assert cluster["cluster"] == {
        "certificate-authority": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "server": lab_deploy.PLACEHOLDER_SERVER}
    assert user["user"] == {"tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}
    assert lab_deploy.PLACEHOLDER_SERVER.split("/")[2].split(":")[0].endswith(".invalid")
    assert lab_deploy.PLACEHOLDER_SERVER in (DEPLOY / "kube-proxy.yaml").read_text()
    # the documented one-command fill replaces exactly that string
    filled = lab_deploy.with_api_server(list(DOCS.values()), "https://10.0.0.10:6443")
    cm_doc = next(d for d in filled if d["kind"] == "ConfigMap")
    assert "https://10.0.0.10:6443" in cm_doc["data"]["kubeconfig.conf"]
    assert "kube-apiserver.invalid" not in cm_doc["data"]["kubeconfig.conf"]


def test_dockerfile() -> None:
    """The image's facts are tests/unit/test_image.py's; here, the path the command names."""
    assert CONTAINER["command"][0] == "/usr/local/bin/kube-proxy"
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ln -s /opt/kubeproxy/bin/kube-proxy /usr/local/bin/kube-proxy" in text
