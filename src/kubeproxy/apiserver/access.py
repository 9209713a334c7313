"""Access control between a parsed request and the verbs: authenticate, then authorize;
and the TokenRequest subresource that issues the tokens authentication accepts.

`check` runs before any handler when the server has an `AuthConfig`: auth.py decides who
is asking (a verified client certificate, else a bearer token whose ServiceAccount and
Pod are looked up in the store, else anonymous for the public paths only: 401
otherwise), rbac.py decides whether that user may do what the route and method say
(403 otherwise). `token_request` validates a TokenRequest, finds the ServiceAccount (and
the Pod it binds to) and signs the token. `self_subject_access_review` answers
`kubectl auth can-i` (SelfSubjectAccessReview) for the caller with the same authorizer.
All read the store through the Hub, under its lock; none does any other I/O.
"""

from __future__ import annotations

import logging
from typing import Any

from kubeproxy.apiserver import auth, codec, errors, rbac, routes
from kubeproxy.apiserver.hub import Hub
from kubeproxy.apiserver.messages import Request
from kubeproxy.apiserver.registry import timestamp
from kubeproxy.apiserver.resources import PODS, SERVICEACCOUNTS
from kubeproxy.apiserver.store import Store

Obj = dict[str, Any]
log = logging.getLogger("kubeproxy.apiserver")


def check(hub: Hub, config: auth.AuthConfig, now: float, route: routes.Route | None,
          req: Request) -> rbac.UserInfo:
    """Who is asking, when ``req`` may proceed; raise the 401 or 403 ApiError otherwise."""
    user = authenticate(hub, config, now, req)
    if isinstance(route, routes.Review):
        verb = "create" if req.method == "POST" else req.method.lower()
        attrs = rbac.Attributes(user, verb, True, route.group, route.plural)
    elif isinstance(route, routes.ResourceRoute):
        watching = route.watch_prefix or (route.name is None and _watch_param(req))
        attrs = rbac.request_attributes(user, req.method, req.path, route.resource,
                                        namespace=route.namespace, name=route.name,
                                        subresource=route.subresource, watch=watching)
    else:
        attrs = rbac.request_attributes(user, req.method, req.path, None)
    decision = hub.call(lambda s: rbac.authorize(attrs, s.policy()))
    if not decision.allowed:
        raise rbac.forbidden(attrs, decision.reason)
    return user


def _watch_param(req: Request) -> bool:
    values = req.query.get("watch") or []
    return bool(values) and values[-1].lower() in ("", "true", "1")


def authenticate(hub: Hub, config: auth.AuthConfig, now: float, req: Request
                 ) -> rbac.UserInfo:
    if req.client_cert is not None:
        return auth.certificate_user(req.client_cert)
    token = auth.bearer(req.headers)
    if token is None:
        if req.path in auth.PUBLIC_PATHS:
            return rbac.ANONYMOUS
        raise auth.unauthorized()
    try:
        claims = auth.verify(config, token, now)
        namespace, name, pod = auth.token_subjects(claims)

        def lookup(s: Store) -> tuple[Obj | None, Obj | None]:
            return (s.find(SERVICEACCOUNTS, namespace, name),
                    s.find(PODS, namespace, pod) if pod is not None else None)

        return auth.service_account_user(claims, *hub.call(lookup))
    except auth.InvalidToken as exc:
        log.info("refused a bearer token: %s", exc)
        raise auth.unauthorized() from exc


def token_request(hub: Hub, config: auth.AuthConfig, now: float,
                  route: routes.ResourceRoute, req: Request) -> Obj:
    """The TokenRequest answered (status.token, status.expirationTimestamp)."""
    body = codec.parse_body(req.body, req.headers.get("content-type"))
    if not isinstance(body, dict):
        raise errors.bad_request("the body of a TokenRequest must be a JSON object")
    spec = auth.token_request_spec(body, config)
    namespace, name = route.namespace or "default", route.name or ""
    ref = spec.get("boundObjectRef")

    def lookup(s: Store) -> tuple[Obj, Obj | None]:
        sa = s.get(SERVICEACCOUNTS, namespace, name)
        if ref is None:
            return sa, None
        pod = s.get(PODS, namespace, str(ref.get("name", "")))
        if ref.get("uid") and ref["uid"] != pod["metadata"]["uid"]:
            raise errors.conflict("pods", pod["metadata"]["name"], (
                f"the UID in the bound object reference ({ref['uid']}) does not match the "
                "UID in record. The object might have been deleted and then recreated"))
        return sa, pod

    sa, pod = hub.call(lookup)
    issued = auth.issue(config, sa, spec, pod, now)
    if pod is not None:
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1",
                                  "name": pod["metadata"]["name"],
                                  "uid": pod["metadata"]["uid"]}
    return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace,
                         "creationTimestamp": timestamp(now)},
            "spec": spec,
            "status": {"token": issued.token,
                       "expirationTimestamp": timestamp(issued.expires)}}


_SAR_ATTRIBUTES = {  # ResourceAttributes field -> rbac.Attributes field
    "namespace": "namespace", "verb": "verb", "group": "api_group",
    "resource": "resource", "subresource": "subresource", "name": "name",
}


def self_subject_access_review(hub: Hub, user: rbac.UserInfo | None, body: Any) -> Obj:
    """POST selfsubjectaccessreviews: may the caller do what the spec says? Answered by
    the same authorizer as every request (``user`` None: no authorization configured,
    every answer is yes, as kube-apiserver's AlwaysAllow)."""
    if not isinstance(body, dict):
        raise errors.bad_request("the body of a SelfSubjectAccessReview must be a JSON object")
    spec = body.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    resource, non_resource = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
    if (resource is None) == (non_resource is None) or not isinstance(
            resource if resource is not None else non_resource, dict):
        which = "nonResourceAttributes" if non_resource is not None else "resourceAttributes"
        raise errors.invalid("SelfSubjectAccessReview", "", [errors.Cause(
            f"spec.{which}", "Invalid value: exactly one of nonResourceAttributes or "
            "resourceAttributes must be specified")], "authorization.k8s.io")
    status: Obj = {"allowed": True}
    if user is not None:
        if resource is not None:
            kw = {ours: str(resource.get(theirs) or "") for theirs, ours in
                  _SAR_ATTRIBUTES.items()}
            attrs = rbac.Attributes(user, resource_request=True, **kw)
        else:
            assert isinstance(non_resource, dict)
            attrs = rbac.Attributes(user, str(non_resource.get("verb") or ""), False,
                                    path=str(non_resource.get("path") or ""))
        decision = hub.call(lambda s: rbac.authorize(attrs, s.policy()))
        status = {"allowed": decision.allowed}
        if decision.reason:
            status["reason"] = decision.reason
    return {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}
