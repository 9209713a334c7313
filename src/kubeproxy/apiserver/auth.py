"""Authentication: who is asking. Client certificates and service-account tokens.

Theory of operation. The HTTP edge (http.py) has already verified any client certificate
against the client CA during the TLS handshake and passes on its subject; this module
decides the user, with no I/O and the clock passed in, as kube-apiserver's union
authenticator does:

1. a verified client certificate: user = CN, groups = the O entries (kubeadm's admin is
   O=system:masters; the lab's proxies are CN=system:kube-proxy);
2. else `Authorization: Bearer <jwt>`: a service-account token this server signed
   (HS256 with the key made at `lab up`: a lab needs no public verification keys), not
   expired, for one of the server's audiences, whose ServiceAccount (and Pod, when the
   token is bound to one) still exists with the UID in the token: user
   `system:serviceaccount:NS:NAME`, groups `system:serviceaccounts`,
   `system:serviceaccounts:NS`; a token that fails any check is 401, never anonymous;
3. else anonymous, only for the public-info paths (/healthz, /livez, /readyz, /version),
   as kube-apiserver with anonymous access limited to those endpoints; anything else
   is 401.
Every authenticated user is also in `system:authenticated`. Authorization (rbac.py)
comes after.

Tokens are issued by `issue` for the `serviceaccounts/NAME/token` subresource
(TokenRequest): the claims are upstream's bound-token claims (iss, sub, aud, exp, iat,
nbf, jti and `kubernetes.io` {namespace, serviceaccount{name,uid}, pod{name,uid}}).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubeproxy.apiserver import errors
from kubeproxy.apiserver.errors import ApiError, Cause
from kubeproxy.apiserver.rbac import AUTHENTICATED, SA_PREFIX, UserInfo
from kubeproxy.errors import KubeProxyError

Obj = dict[str, Any]
DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
PUBLIC_PATHS = ("/healthz", "/livez", "/readyz", "/version", "/version/")
MIN_EXPIRATION = 600  # upstream: "may not specify a duration less than 10 minutes"
MAX_EXPIRATION = 1 << 32
DEFAULT_EXPIRATION = 3600
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"


@dataclass(frozen=True)
class AuthConfig:
    """Turns authentication and RBAC on (None in ApiConfig: the old open server)."""

    signing_key: bytes  # HS256 key of service-account tokens
    issuer: str = DEFAULT_ISSUER
    audiences: tuple[str, ...] = (DEFAULT_ISSUER,)

    def __post_init__(self) -> None:
        if len(self.signing_key) < 32:
            raise ValueError("the service-account signing key must have at least 32 bytes")
        if not self.audiences:
            raise ValueError("the API server needs at least one audience")


@dataclass(frozen=True)
class CertIdentity:
    """The subject of a client certificate the TLS layer verified."""

    common_name: str
    organizations: tuple[str, ...] = ()


class InvalidToken(KubeProxyError):
    """Why a bearer token is refused (logged, never sent: the client gets 401)."""


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


# ---- JWT (RFC 7519, HS256) -----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(key: bytes, claims: Mapping[str, Any]) -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def decode_jwt(key: bytes, token: str) -> Obj:
    """The claims of a token signed with ``key``; InvalidToken otherwise."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("not a JWT")
    try:
        header = json.loads(_unb64(parts[0]))
        sig = _unb64(parts[2])
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidToken(f"malformed JWT: {exc}") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise InvalidToken("unsupported signing algorithm")
    wanted = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(sig, wanted):
        raise InvalidToken("bad signature")
    if not isinstance(claims, dict):
        raise InvalidToken("claims are not an object")
    return claims


# ---- issuing (serviceaccounts/NAME/token) ----------------------------------------------


@dataclass(frozen=True)
class Issued:
    token: str
    expires: int  # epoch seconds
    claims: Obj


def token_request_spec(body: Obj, config: AuthConfig) -> Obj:
    """The TokenRequest's spec with upstream's defaults, or 422 naming the field."""
    spec = dict(body.get("spec") or {})
    spec["audiences"] = list(spec.get("audiences") or config.audiences)
    seconds = spec.get("expirationSeconds")
    spec["expirationSeconds"] = DEFAULT_EXPIRATION if seconds is None else seconds
    causes: list[Cause] = []
    seconds = spec["expirationSeconds"]
    if not isinstance(seconds, int) or seconds < MIN_EXPIRATION:
        causes.append(Cause("spec.expirationSeconds", f"Invalid value: {seconds}: may not "
                            "specify a duration less than 10 minutes"))
    elif seconds > MAX_EXPIRATION:
        causes.append(Cause("spec.expirationSeconds", f"Invalid value: {seconds}: may not "
                            "specify a duration larger than 2^32 seconds"))
    ref = spec.get("boundObjectRef")
    if ref is not None and (not isinstance(ref, dict) or ref.get("kind") != "Pod"):
        kind = ref.get("kind") if isinstance(ref, dict) else ref
        causes.append(Cause("spec.boundObjectRef.kind", f'Unsupported value: "{kind}": '
                            'supported values: "Pod"', "FieldValueNotSupported"))
    if causes:
        raise errors.invalid("TokenRequest", str((body.get("metadata") or {}).get("name", "")),
                             causes, "authentication.k8s.io")
    return spec


def issue(config: AuthConfig, sa: Obj, spec: Obj, pod: Obj | None, now: float) -> Issued:
    """A token for ServiceAccount ``sa``, bound to ``pod`` when given."""
    meta = sa["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    issued_at = int(now)
    expires = issued_at + int(spec["expirationSeconds"])
    private: Obj = {"namespace": namespace,
                    "serviceaccount": {"name": name, "uid": meta["uid"]}}
    if pod is not None:
        private["pod"] = {"name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
    claims: Obj = {"iss": config.issuer, "sub": f"{SA_PREFIX}{namespace}:{name}",
                   "aud": list(spec["audiences"]), "exp": expires, "iat": issued_at,
                   "nbf": issued_at, "jti": str(uuid.uuid4()), "kubernetes.io": private}
    return Issued(encode_jwt(config.signing_key, claims), expires, claims)


# ---- authenticating ----------------------------------------------------------------------


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def verify(config: AuthConfig, token: str, now: float) -> Obj:
    """Signature, issuer, audience, time window; the claims, or InvalidToken."""
    claims = decode_jwt(config.signing_key, token)
    if claims.get("iss") != config.issuer:
        raise InvalidToken("wrong issuer")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if not set(audiences) & set(config.audiences):
        raise InvalidToken("token audiences do not include the API server's")
    exp, nbf = claims.get("exp"), claims.get("nbf", 0)
    if not isinstance(exp, int) or now >= exp:
        raise InvalidToken("token has expired")
    if not isinstance(nbf, int) or now < nbf:
        raise InvalidToken("token is not valid yet")
    private = claims.get("kubernetes.io")
    if not isinstance(private, dict) or not isinstance(private.get("serviceaccount"), dict):
        raise InvalidToken("not a service-account token")
    return claims


def token_subjects(claims: Obj) -> tuple[str, str, str | None]:
    """(namespace, service account name, bound pod name or None) named by the claims."""
    private = claims["kubernetes.io"]
    pod = private.get("pod")
    return (str(private.get("namespace", "")), str(private["serviceaccount"].get("name", "")),
            str(pod.get("name", "")) if isinstance(pod, dict) else None)


def service_account_user(claims: Obj, sa: Obj | None, pod: Obj | None) -> UserInfo:
    """The user a verified token stands for, given what the store holds now."""
    private = claims["kubernetes.io"]
    namespace = str(private.get("namespace", ""))
    want_sa = private["serviceaccount"]
    if sa is None or sa["metadata"].get("uid") != want_sa.get("uid"):
        raise InvalidToken("the service account no longer exists")
    extra: list[tuple[str, str]] = []
    bound = private.get("pod")
    if isinstance(bound, dict):
        if pod is None or pod["metadata"].get("uid") != bound.get("uid"):
            raise InvalidToken("the pod the token is bound to no longer exists")
        extra = [(POD_NAME_EXTRA, str(bound.get("name"))), (POD_UID_EXTRA, str(bound.get("uid")))]
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED)
    return UserInfo(f"{SA_PREFIX}{namespace}:{want_sa.get('name')}", str(want_sa.get("uid")),
                    groups, tuple(extra))


def certificate_user(cert: CertIdentity) -> UserInfo:
    groups = tuple(g for g in cert.organizations if g != AUTHENTICATED)
    return UserInfo(cert.common_name, groups=(*groups, AUTHENTICATED))
