"""Compute Engine API v1 over REST: global SSL policies and target HTTPS proxies.

google-cloud-compute ships only a REST transport, so this module serves JSON over
HTTP/1.1 on its own loopback port instead of gRPC. The paths, the camelCase field
names and the error body follow the Compute REST reference, and request bodies are
parsed with the client library's own message classes, so an unknown field is rejected
as Compute rejects it. Resources are kept in the store as the JSON documents that the
API returns.

Mutations are applied before the response is sent, so every operation comes back with
status DONE and `ExtendedOperation.result()` returns without polling.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from google.cloud import compute_v1
from google.protobuf import json_format

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

POLICY_KIND = "compute.sslPolicies"
PROXY_KIND = "compute.targetHttpsProxies"
OPERATION_KIND = "compute.globalOperations"

# Self links use the host that Compute itself returns, so callers compare them with
# what they would read from GCP.
SELF_LINK_BASE = "https://www.googleapis.com/compute/v1"
API_PREFIX = "/compute/v1"

PROFILES = ("COMPATIBLE", "MODERN", "RESTRICTED", "CUSTOM", "FIPS_202205")
MIN_TLS_VERSIONS = ("TLS_1_0", "TLS_1_1", "TLS_1_2", "TLS_1_3")
POST_QUANTUM_KEY_EXCHANGES = ("DEFAULT", "ENABLED", "DEFERRED")
QUIC_OVERRIDES = ("NONE", "ENABLE", "DISABLE")
# Compute's list methods accept maxResults from 0 to 500 and default to 500.
MAX_RESULTS = 500
STOP_TIMEOUT_SECONDS = 5.0
SHUTDOWN_POLL_SECONDS = 0.05

# RFC 1035 labels, as Compute requires for every resource name.
_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_NAME_PATTERN = "[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
# A reference may be a full URL on either API host, a path from projects/, or a path
# from global/ inside the request's project.
_POLICY_REFERENCE = re.compile(
    r"^(?:https://(?:www|compute)\.googleapis\.com/compute/v1/)?"
    r"(?:projects/(?P<project>[^/]+)/)?global/sslPolicies/(?P<name>[^/]+)$"
)


class ComputeError(Exception):
    """An error returned to the client as Compute's JSON error body."""

    def __init__(self, status: HTTPStatus, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": int(self.status),
                "message": self.message,
                "errors": [
                    {"message": self.message, "domain": "global", "reason": self.reason}
                ],
            }
        }


def _invalid(field: str, value: object, rule: str) -> NoReturn:
    raise ComputeError(
        HTTPStatus.BAD_REQUEST,
        "invalid",
        f"Invalid value for field '{field}': '{value}'. {rule}",
    )


def _not_found(resource: str) -> NoReturn:
    raise ComputeError(
        HTTPStatus.NOT_FOUND, "notFound", f"The resource '{resource}' was not found"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _new_id() -> str:
    # Compute ids are unsigned 64-bit numbers, sent as decimal strings in JSON.
    return str(secrets.randbits(63))


def _new_fingerprint() -> str:
    # NOTE: GCP derives the fingerprint from the stored contents. Here every write gets
    # a random one, so it changes even on a patch that changes nothing.
    return base64.b64encode(secrets.token_bytes(8)).decode()


def _policy_path(project: str, name: str) -> str:
    return f"projects/{project}/global/sslPolicies/{name}"


def _proxy_path(project: str, name: str) -> str:
    return f"projects/{project}/global/targetHttpsProxies/{name}"


def _operation_path(project: str, name: str) -> str:
    return f"projects/{project}/global/operations/{name}"


def _full_link(project: str, reference: str) -> str:
    if reference.startswith("https://"):
        return reference
    if reference.startswith("projects/"):
        return f"{SELF_LINK_BASE}/{reference}"
    return f"{SELF_LINK_BASE}/projects/{project}/{reference}"


def _parse_body(message_type: Any, body: dict[str, Any], field: str) -> dict[str, Any]:
    """Validate `body` against the client's message type and return it as camelCase.

    Unknown fields and values of the wrong JSON type are rejected as Compute rejects
    them: 400 with the field named.
    """
    message = message_type.pb(message_type())
    try:
        json_format.ParseDict(body, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise ComputeError(
            HTTPStatus.BAD_REQUEST,
            "invalid",
            f"Invalid JSON payload received at '{field}': {exc}",
        ) from exc
    parsed: dict[str, Any] = json_format.MessageToDict(message)
    return parsed


def _check_name(name: str, field: str) -> None:
    if not _NAME.match(name):
        _invalid(
            field,
            name,
            f"Must be a match of regex '{_NAME_PATTERN}': 1 to 63 characters, a "
            "lowercase letter first, then lowercase letters, digits or hyphens, not "
            "ending with a hyphen.",
        )


def _check_enum(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _invalid(field, value, f"Must be one of {', '.join(allowed)}.")


def validate_policy(policy: dict[str, Any]) -> None:
    """Apply Compute's rules to a complete SSL policy document (defaults filled in)."""
    profile = policy["profile"]
    version = policy["minTlsVersion"]
    _check_enum("resource.profile", profile, PROFILES)
    _check_enum("resource.minTlsVersion", version, MIN_TLS_VERSIONS)

    features = policy.get("customFeatures", [])
    if profile == "CUSTOM" and not features:
        _invalid(
            "resource.customFeatures",
            "[]",
            "A CUSTOM profile needs at least one feature in customFeatures.",
        )
    if profile != "CUSTOM" and features:
        _invalid(
            "resource.customFeatures",
            ", ".join(features),
            f"customFeatures must be empty unless the profile is CUSTOM (it is "
            f"{profile}).",
        )

    # google-cloud-compute 1.57 documents both rules on SslPolicy.
    if version == "TLS_1_3" and profile != "RESTRICTED":
        _invalid(
            "resource.minTlsVersion",
            version,
            f"TLS_1_3 needs profile RESTRICTED (it is {profile}).",
        )
    if profile == "FIPS_202205" and version != "TLS_1_2":
        _invalid(
            "resource.minTlsVersion",
            version,
            "The FIPS_202205 profile needs minTlsVersion TLS_1_2.",
        )

    exchange = policy.get("postQuantumKeyExchange")
    if exchange is not None:
        _check_enum(
            "resource.postQuantumKeyExchange", exchange, POST_QUANTUM_KEY_EXCHANGES
        )


class Compute:
    """The resources and their rules, independent of HTTP."""

    def __init__(self, cloud: LocalCloud) -> None:
        self._store = cloud.store
        # Held across a read-modify-write, and by a mutation and its operation record.
        self.lock = cloud.store.lock

    # SSL policies

    def insert_policy(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        policy = _parse_body(compute_v1.SslPolicy, body, "resource")
        name = policy.get("name", "")
        _check_name(name, "resource.name")
        policy.setdefault("profile", "COMPATIBLE")
        policy.setdefault("minTlsVersion", "TLS_1_0")
        validate_policy(policy)

        path = _policy_path(project, name)
        for output_only in ("id", "selfLink", "creationTimestamp", "kind", "region"):
            policy.pop(output_only, None)
        policy.update(
            kind="compute#sslPolicy",
            id=_new_id(),
            selfLink=f"{SELF_LINK_BASE}/{path}",
            creationTimestamp=_now(),
            fingerprint=_new_fingerprint(),
            enabledFeatures=list(policy.get("customFeatures", [])),
        )
        with self._store.lock:
            if self._store.get(POLICY_KIND, path) is not None:
                raise ComputeError(
                    HTTPStatus.CONFLICT,
                    "alreadyExists",
                    f"The resource '{path}' already exists",
                )
            self._store.put(POLICY_KIND, path, policy)
        logger.info(
            "created SSL policy %s (profile %s, min TLS %s)",
            path,
            policy["profile"],
            policy["minTlsVersion"],
        )
        return policy

    def get_policy(self, project: str, name: str) -> dict[str, Any]:
        policy = self._store.get(POLICY_KIND, _policy_path(project, name))
        if policy is None:
            _not_found(_policy_path(project, name))
        return policy

    def patch_policy(
        self, project: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        changes = _parse_body(compute_v1.SslPolicy, body, "resource")
        path = _policy_path(project, name)
        if changes.get("name", name) != name:
            _invalid(
                "resource.name",
                changes["name"],
                f"The name in the body must match the policy in the URL ({name}).",
            )
        with self._store.lock:
            current = self.get_policy(project, name)
            sent = changes.get("fingerprint", "")
            # NOTE: a patch without a fingerprint is rejected like a stale one, because
            # the Compute reference requires an up-to-date fingerprint on every patch.
            if sent != current["fingerprint"]:
                raise ComputeError(
                    HTTPStatus.PRECONDITION_FAILED,
                    "conditionNotMet",
                    f"Invalid fingerprint {sent!r} for '{path}': the policy changed "
                    "since it was read (current fingerprint "
                    f"{current['fingerprint']!r}). Get the policy again and retry "
                    "with its fingerprint.",
                )
            updated = dict(current)
            for field in (
                "profile",
                "minTlsVersion",
                "customFeatures",
                "description",
                "postQuantumKeyExchange",
            ):
                if field in changes:
                    updated[field] = changes[field]
            if updated["profile"] != "CUSTOM" and "customFeatures" not in changes:
                # NOTE: JSON cannot send an empty list, so leaving CUSTOM clears the
                # features; GCP's handling of this case is unconfirmed.
                updated.pop("customFeatures", None)
            validate_policy(updated)
            updated["enabledFeatures"] = list(updated.get("customFeatures", []))
            updated["fingerprint"] = _new_fingerprint()
            self._store.put(POLICY_KIND, path, updated)
        logger.info(
            "patched SSL policy %s (profile %s, min TLS %s)",
            path,
            updated["profile"],
            updated["minTlsVersion"],
        )
        return updated

    def delete_policy(self, project: str, name: str) -> dict[str, Any]:
        path = _policy_path(project, name)
        with self._store.lock:
            policy = self.get_policy(project, name)
            users = [
                proxy_path
                for proxy_path, proxy in self._store.list(PROXY_KIND)
                if proxy.get("sslPolicy") == policy["selfLink"]
            ]
            if users:
                raise ComputeError(
                    HTTPStatus.BAD_REQUEST,
                    "resourceInUseByAnotherResource",
                    f"The ssl_policy resource '{path}' is already being used by "
                    f"'{users[0]}'. Attach another policy to that proxy first.",
                )
            self._store.delete(POLICY_KIND, path)
        logger.info("deleted SSL policy %s", path)
        return policy

    def list_policies(self, project: str) -> list[dict[str, Any]]:
        return [
            policy
            for _, policy in self._store.list(POLICY_KIND, f"projects/{project}/")
        ]

    # Target HTTPS proxies

    def insert_proxy(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        proxy = _parse_body(compute_v1.TargetHttpsProxy, body, "resource")
        name = proxy.get("name", "")
        _check_name(name, "resource.name")
        if not proxy.get("urlMap"):
            _invalid(
                "resource.urlMap",
                "",
                "A target HTTPS proxy needs the URL map of its load balancer.",
            )
        if not proxy.get("sslCertificates") and not proxy.get("certificateMap"):
            _invalid(
                "resource.sslCertificates",
                "[]",
                "A target HTTPS proxy needs at least one SSL certificate or a "
                "certificate map.",
            )

        # Compute stores references as full URLs, whatever form the request used.
        proxy["urlMap"] = _full_link(project, proxy["urlMap"])
        if proxy.get("sslCertificates"):
            proxy["sslCertificates"] = [
                _full_link(project, link) for link in proxy["sslCertificates"]
            ]
        proxy.setdefault("quicOverride", "NONE")
        _check_enum("resource.quicOverride", proxy["quicOverride"], QUIC_OVERRIDES)

        path = _proxy_path(project, name)
        for output_only in ("id", "selfLink", "creationTimestamp", "kind", "region"):
            proxy.pop(output_only, None)
        with self._store.lock:
            if proxy.get("sslPolicy"):
                proxy["sslPolicy"] = self._resolve_policy(
                    project, proxy["sslPolicy"], "resource.sslPolicy"
                )
            if self._store.get(PROXY_KIND, path) is not None:
                raise ComputeError(
                    HTTPStatus.CONFLICT,
                    "alreadyExists",
                    f"The resource '{path}' already exists",
                )
            proxy.update(
                kind="compute#targetHttpsProxy",
                id=_new_id(),
                selfLink=f"{SELF_LINK_BASE}/{path}",
                creationTimestamp=_now(),
                fingerprint=_new_fingerprint(),
            )
            self._store.put(PROXY_KIND, path, proxy)
        logger.info(
            "created target HTTPS proxy %s (SSL policy %s)",
            path,
            proxy.get("sslPolicy", "none"),
        )
        return proxy

    def get_proxy(self, project: str, name: str) -> dict[str, Any]:
        proxy = self._store.get(PROXY_KIND, _proxy_path(project, name))
        if proxy is None:
            _not_found(_proxy_path(project, name))
        return proxy

    def set_ssl_policy(
        self, project: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        reference = _parse_body(compute_v1.SslPolicyReference, body, "resource")
        path = _proxy_path(project, name)
        with self._store.lock:
            proxy = self.get_proxy(project, name)
            if reference.get("sslPolicy"):
                proxy["sslPolicy"] = self._resolve_policy(
                    project, reference["sslPolicy"], "resource.sslPolicy"
                )
            else:
                # An empty reference detaches the policy; the proxy then uses
                # Compute's default, which allows TLS 1.0.
                proxy.pop("sslPolicy", None)
            proxy["fingerprint"] = _new_fingerprint()
            self._store.put(PROXY_KIND, path, proxy)
        logger.info("set SSL policy of %s to %s", path, proxy.get("sslPolicy", "none"))
        return proxy

    def delete_proxy(self, project: str, name: str) -> dict[str, Any]:
        path = _proxy_path(project, name)
        with self._store.lock:
            proxy = self.get_proxy(project, name)
            self._store.delete(PROXY_KIND, path)
        logger.info("deleted target HTTPS proxy %s", path)
        return proxy

    def list_proxies(self, project: str) -> list[dict[str, Any]]:
        return [
            proxy for _, proxy in self._store.list(PROXY_KIND, f"projects/{project}/")
        ]

    def _resolve_policy(self, project: str, reference: str, field: str) -> str:
        """Return the self link of the policy that `reference` names, or raise."""
        match = _POLICY_REFERENCE.match(reference)
        if not match:
            _invalid(
                field,
                reference,
                "Use the policy's URL, projects/PROJECT/global/sslPolicies/NAME or "
                "global/sslPolicies/NAME.",
            )
        policy = self.get_policy(match["project"] or project, match["name"])
        self_link: str = policy["selfLink"]
        return self_link

    # Global operations

    def record_operation(
        self,
        project: str,
        operation_type: str,
        target: dict[str, Any],
        request_id: str,
    ) -> dict[str, Any]:
        name = f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:13]}"
        path = _operation_path(project, name)
        stamp = _now()
        operation = {
            "kind": "compute#operation",
            "id": _new_id(),
            "name": name,
            "operationType": operation_type,
            "targetLink": target["selfLink"],
            "targetId": target["id"],
            "status": "DONE",
            "user": "localcloud",
            "progress": 100,
            "insertTime": stamp,
            "startTime": stamp,
            "endTime": stamp,
            "selfLink": f"{SELF_LINK_BASE}/{path}",
        }
        if request_id:
            operation["clientOperationId"] = request_id
        self._store.put(OPERATION_KIND, path, operation)
        return operation

    def find_request(self, project: str, request_id: str) -> dict[str, Any] | None:
        """Return the operation of an earlier request with this requestId, if any."""
        if not request_id:
            return None
        for _, operation in self._store.list(OPERATION_KIND, f"projects/{project}/"):
            if operation.get("clientOperationId") == request_id:
                return operation
        return None

    def get_operation(self, project: str, name: str) -> dict[str, Any]:
        operation = self._store.get(OPERATION_KIND, _operation_path(project, name))
        if operation is None:
            _not_found(_operation_path(project, name))
        return operation


def _page(
    items: list[dict[str, Any]], query: dict[str, str]
) -> tuple[list[dict[str, Any]], str]:
    if query.get("filter"):
        # NOTE: list filters are not emulated; a filter is rejected, not ignored.
        _invalid(
            "filter",
            query["filter"],
            "localcloud does not evaluate Compute list filters; list without one.",
        )
    try:
        size = int(query.get("maxResults", MAX_RESULTS))
    except ValueError:
        _invalid("maxResults", query["maxResults"], "Must be a number from 0 to 500.")
    if not 0 <= size <= MAX_RESULTS:
        _invalid("maxResults", size, "Must be a number from 0 to 500.")
    size = size or MAX_RESULTS
    start = 0
    token = query.get("pageToken", "")
    if token:
        try:
            start = int(base64.urlsafe_b64decode(token.encode()).decode())
        except (binascii.Error, UnicodeDecodeError, ValueError):
            start = -1
        if start < 0:
            _invalid("pageToken", token, "Pass the nextPageToken of the previous page.")
    end = start + size
    next_token = (
        base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    )
    return items[start:end], next_token


def _list_response(
    kind: str, collection: str, items: list[dict[str, Any]], query: dict[str, str]
) -> dict[str, Any]:
    page, next_token = _page(items, query)
    response: dict[str, Any] = {
        "kind": kind,
        "id": collection,
        "items": page,
        "selfLink": f"{SELF_LINK_BASE}/{collection}",
    }
    if next_token:
        response["nextPageToken"] = next_token
    return response


Handler = Callable[[str, str, dict[str, Any], dict[str, str]], dict[str, Any]]


class ComputeRoutes:
    """Map (method, path) to a Compute method; every handler returns a JSON document."""

    def __init__(self, compute: Compute) -> None:
        self.compute = compute
        prefix = rf"^{API_PREFIX}/projects/(?P<project>[^/]+)/global/"
        name = r"(?P<name>[^/]+)"
        self.routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = [
            (
                re.compile(prefix + r"sslPolicies$"),
                {"GET": self._list_policies, "POST": self._insert_policy},
            ),
            (
                re.compile(prefix + rf"sslPolicies/{name}$"),
                {
                    "GET": lambda p, n, b, q: compute.get_policy(p, n),
                    "PATCH": self._patch_policy,
                    "DELETE": self._delete_policy,
                },
            ),
            (
                re.compile(prefix + r"targetHttpsProxies$"),
                {"GET": self._list_proxies, "POST": self._insert_proxy},
            ),
            (
                re.compile(prefix + rf"targetHttpsProxies/{name}$"),
                {
                    "GET": lambda p, n, b, q: compute.get_proxy(p, n),
                    "DELETE": self._delete_proxy,
                },
            ),
            (
                re.compile(prefix + rf"targetHttpsProxies/{name}/setSslPolicy$"),
                {"POST": self._set_ssl_policy},
            ),
            (
                re.compile(prefix + rf"operations/{name}$"),
                {"GET": lambda p, n, b, q: compute.get_operation(p, n)},
            ),
            (
                # Operations are done when created, so wait returns at once.
                re.compile(prefix + rf"operations/{name}/wait$"),
                {"POST": lambda p, n, b, q: compute.get_operation(p, n)},
            ),
        ]

    def dispatch(
        self, method: str, path: str, body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        for pattern, methods in self.routes:
            match = pattern.match(path)
            if not match:
                continue
            project = match["project"]
            if not _PROJECT.match(project):
                # NOTE: localcloud has no project registry, so every well-formed
                # project id exists and any other id is not found.
                _not_found(f"projects/{project}")
            handler = methods.get(method)
            if handler is None:
                raise ComputeError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    "methodNotAllowed",
                    f"{method} {path} is not served by localcloud; served methods: "
                    f"{', '.join(sorted(methods))}.",
                )
            return handler(project, match.groupdict().get("name") or "", body, query)
        _not_found(path.removeprefix(API_PREFIX + "/"))

    def _mutation(
        self,
        project: str,
        query: dict[str, str],
        operation_type: str,
        apply: Callable[[], dict[str, Any]],
    ) -> dict[str, Any]:
        request_id = query.get("requestId", "")
        with self.compute.lock:
            earlier = self.compute.find_request(project, request_id)
            if earlier is not None:
                # Compute ignores a retried request with the same requestId and
                # returns the first request's operation.
                return earlier
            target = apply()
            return self.compute.record_operation(
                project, operation_type, target, request_id
            )

    def _insert_policy(
        self, project: str, _name: str, body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return self._mutation(
            project, query, "insert", lambda: self.compute.insert_policy(project, body)
        )

    def _patch_policy(
        self, project: str, name: str, body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return self._mutation(
            project,
            query,
            "patch",
            lambda: self.compute.patch_policy(project, name, body),
        )

    def _delete_policy(
        self, project: str, name: str, _body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return self._mutation(
            project, query, "delete", lambda: self.compute.delete_policy(project, name)
        )

    def _list_policies(
        self, project: str, _name: str, _body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return _list_response(
            "compute#sslPoliciesList",
            f"projects/{project}/global/sslPolicies",
            self.compute.list_policies(project),
            query,
        )

    def _insert_proxy(
        self, project: str, _name: str, body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return self._mutation(
            project, query, "insert", lambda: self.compute.insert_proxy(project, body)
        )

    def _set_ssl_policy(
        self, project: str, name: str, body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return self._mutation(
            project,
            query,
            "setSslPolicy",
            lambda: self.compute.set_ssl_policy(project, name, body),
        )

    def _delete_proxy(
        self, project: str, name: str, _body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return self._mutation(
            project, query, "delete", lambda: self.compute.delete_proxy(project, name)
        )

    def _list_proxies(
        self, project: str, _name: str, _body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return _list_response(
            "compute#targetHttpsProxyList",
            f"projects/{project}/global/targetHttpsProxies",
            self.compute.list_proxies(project),
            query,
        )


def _request_handler(routes: ComputeRoutes) -> type[BaseHTTPRequestHandler]:
    class ComputeRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "localcloud-compute"

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_PATCH(self) -> None:
            self._serve()

        def do_DELETE(self) -> None:
            self._serve()

        def _serve(self) -> None:
            url = urlsplit(self.path)
            query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            try:
                body = self._read_body()
                status, document = (
                    HTTPStatus.OK,
                    routes.dispatch(self.command, url.path, body, query),
                )
            except ComputeError as exc:
                status, document = exc.status, exc.body()
                logger.info(
                    "%s %s rejected with %d %s: %s",
                    self.command,
                    url.path,
                    exc.status,
                    exc.reason,
                    exc.message,
                )
            except Exception:
                logger.exception("%s %s failed", self.command, url.path)
                error = ComputeError(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    "backendError",
                    f"{self.command} {url.path} failed in localcloud; see its log.",
                )
                status, document = error.status, error.body()
            payload = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _read_body(self) -> dict[str, Any]:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                raise ComputeError(
                    HTTPStatus.BAD_REQUEST,
                    "parseError",
                    "Invalid Content-Length header: send the body's size in bytes.",
                )
            if not length:
                return {}
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise ComputeError(
                    HTTPStatus.BAD_REQUEST,
                    "parseError",
                    "Invalid JSON payload received: the body must be a JSON object.",
                )
            return body

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("compute %s: " + format, self.client_address[0], *args)

    return ComputeRequestHandler


class ComputeServer:
    """The threaded HTTP server of the Compute API, bound to an ephemeral port."""

    def __init__(self, cloud: LocalCloud, host: str) -> None:
        handler = _request_handler(ComputeRoutes(Compute(cloud)))
        self._server = ThreadingHTTPServer((host, 0), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        address, port = self._server.server_address[:2]
        self.url = f"http://{address!s}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # A short poll interval keeps stop() quick.
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="localcloud-compute",
            daemon=True,
        )
        self._thread.start()
        logger.info("Compute API listening on %s", self.url)

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                logger.warning(
                    "Compute API thread did not stop within %.0f s",
                    STOP_TIMEOUT_SECONDS,
                )
            self._thread = None
        self._server.server_close()
