"""A Kubernetes API server for the lab, that real kubectl and real clients can use.

Theory of operation. State lives in memory in one `Store` (store.py): objects per
resource, one global resourceVersion and a bounded history of changes for watches
(storage.py), the write verbs (registry.py) and the controllers they trigger
(controllers.py). Everything between the socket and the store is pure and
table-driven: routes.py maps URLs to resources (resources.py), codec.py negotiates
media types and decodes bodies against the schema (schema.py, generated from the
official client's models), strategy.py and services.py apply each kind's defaults and
validation, patch.py implements the three patch formats, selectors.py the label and
field selectors, table.py `kubectl get` columns, discovery.py and openapi.py the
documents kubectl reads before it does anything. handlers.py turns a request
(messages.py) into a response or a watch stream; http.py is the only code that touches
sockets, and server.py wires listeners (including sockets inside lab network
namespaces, netns.py) to it. Run it with `python -m kubeproxy.apiserver`.

Served: core/v1 Namespaces, Nodes, Pods, Services, ConfigMaps, ServiceAccounts (and their
`token` subresource), apps/v1 DaemonSets, discovery.k8s.io/v1 EndpointSlices and
rbac.authorization.k8s.io/v1 (Cluster)Roles and (Cluster)RoleBindings (kinds.py holds the
strategies of the newer kinds); JSON (and YAML) out. Open plain HTTP by default; with
`ServerConfig.tls` and `.auth` (the lab's setting) TLS only, client certificates and
service-account tokens (auth.py), RBAC (rbac.py).
"""

from kubeproxy.apiserver.server import ApiServer, NetnsListener, ServerConfig, kubeconfig_text

__all__ = ["ApiServer", "NetnsListener", "ServerConfig", "kubeconfig_text"]
