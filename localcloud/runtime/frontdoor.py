"""The front door of each Cloud Run service: one loopback port per URL and per tag URL.

Like Cloud Run's edge, the front door checks ingress, the caller's ID token and its
binding to a role that can invoke the service (INVOKE_ROLES). It then picks a revision
by traffic split or tag, starts the revision's instance when none runs, and proxies
the request. Every request, allowed or rejected, gets one request log entry.

All servers run as uvicorn servers on one asyncio loop in a background thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn
from google.api import monitored_resource_pb2
from google.cloud import run_v2
from google.cloud.logging_v2.types import LogEntry
from google.logging.type import http_request_pb2, log_severity_pb2
from google.protobuf import duration_pb2

from localcloud.api.resources import now_timestamp
from localcloud.runtime.instance import StartupError
from localcloud.tokens import InvalidToken

if TYPE_CHECKING:
    from localcloud.runtime.runtime import Runtime

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PORTS_KIND = "run.frontdoor-ports"
LOOPBACK = "127.0.0.1"
# The local "VPC": callers whose connection comes from these addresses count as
# internal for ingress. Every other loopback source address (127.0.0.2 and up) is
# treated as a caller on the internet, so a client that binds one gets the responses
# an outside caller gets.
VPC_ADDRESSES = frozenset({LOOPBACK, "::1"})

# Cloud Run limits HTTP/1 request bodies to 32 MiB.
MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024
# Cloud Run's default request timeout when the revision sets none.
DEFAULT_REQUEST_TIMEOUT_SECONDS = 300.0

# The predefined roles that contain run.routes.invoke, so each lets its members invoke
# a service, as on Cloud Run. Owner, Editor, Cloud Run Admin and Cloud Run Invoker are
# from Google's Cloud Run access docs. The others are from a public dump of the IAM
# role definitions (github.com/iann0036/iam-dataset). Custom roles are not emulated.
INVOKE_ROLES = frozenset(
    {
        "roles/owner",
        "roles/editor",
        "roles/run.admin",
        "roles/run.developer",
        "roles/run.invoker",
        "roles/run.servicesInvoker",
        "roles/run.serviceAgent",
        "roles/serverless.serviceAgent",
        "roles/cloudfunctions.admin",
        "roles/cloudfunctions.developer",
        "roles/cloudfunctions.serviceAgent",
        "roles/firebase.admin",
        "roles/firebase.developAdmin",
    }
)
SERVICE_ACCOUNT_DOMAIN = ".gserviceaccount.com"
# Cloud Run keeps the token's header and claims for the container but replaces its
# signature, so the forwarded token cannot be replayed.
REMOVED_SIGNATURE = "SIGNATURE_REMOVED_BY_GOOGLE"

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
_INTERNAL_INGRESS = frozenset(
    {
        run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY,
        run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER,
    }
)


@dataclass(frozen=True)
class Route:
    """The routing and access settings of one service, from its served state."""

    service_name: str
    custom_audiences: tuple[str, ...]
    invoker_iam_disabled: bool
    ingress: int
    split: tuple[tuple[str, int], ...]  # (revision resource name, percent)
    tags: dict[str, str] = field(default_factory=dict)  # tag -> revision resource name
    timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS

    @classmethod
    def from_service(cls, service: run_v2.Service) -> Route:
        split: list[tuple[str, int]] = []
        tags: dict[str, str] = {}
        latest = service.latest_ready_revision.rsplit("/", 1)[-1]
        for status in service.traffic_statuses:
            short = status.revision
            if status.type_ == LATEST:
                short = latest
            if not short:
                continue
            full = f"{service.name}/revisions/{short}"
            if status.percent:
                split.append((full, status.percent))
            if status.tag:
                tags[status.tag] = full
        timeout = DEFAULT_REQUEST_TIMEOUT_SECONDS
        if "timeout" in service.template:
            timeout = service.template.timeout.total_seconds() or timeout
        return cls(
            service_name=service.name,
            custom_audiences=tuple(service.custom_audiences),
            invoker_iam_disabled=service.invoker_iam_disabled,
            ingress=int(service.ingress),
            split=tuple(split),
            tags=tags,
            timeout_seconds=timeout,
        )

    def revisions(self) -> list[str]:
        names = {name for name, _ in self.split} | set(self.tags.values())
        return sorted(names)

    def pick(self, tag: str) -> str | None:
        if tag:
            return self.tags.get(tag)
        if not self.split:
            return None
        names = [name for name, _ in self.split]
        weights = [percent for _, percent in self.split]
        return random.choices(names, weights=weights)[0]


@dataclass
class _Door:
    port: int
    sock: socket.socket
    server: uvicorn.Server | None = None
    task: Future[None] | None = None


class FrontDoors:
    """The loopback servers of every service URL and tag URL, on one asyncio loop."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._store = runtime.cloud.store
        self._routes: dict[str, Route] = {}
        self._doors: dict[tuple[str, str], _Door] = {}
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        with self._lock:
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=loop.run_forever, name="localcloud-frontdoors", daemon=True
            )
            self._thread.start()
            self._loop = loop
            self._client = self._call(_new_client())

    def stop(self) -> None:
        with self._lock:
            loop = self._loop
            if loop is None:
                return
            for key in list(self._doors):
                self._close(key)
            if self._client is not None:
                self._call(self._client.aclose())
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)
            loop.close()
            self._loop = None
            self._thread = None

    def ensure_port(self, service_name: str, tag: str) -> int:
        """Return the port of a service URL or tag URL, opening its server if needed.

        A port recorded in the store is reused when it is free, so URLs stay the same
        across restarts of localcloud.
        """
        self.start()
        with self._lock:
            door = self._doors.get((service_name, tag))
            if door is not None:
                return door.port
            ports = self._recorded_ports(service_name)
            sock = _bind(ports.get(tag, 0))
            door = _Door(port=sock.getsockname()[1], sock=sock)
            if ports.get(tag) != door.port:
                ports[tag] = door.port
                self._store.put(PORTS_KIND, service_name, {"ports": ports})
            self._serve(service_name, tag, door)
            self._doors[(service_name, tag)] = door
            return door.port

    def set_route(self, service_name: str, route: Route) -> None:
        closing = []
        with self._lock:
            self._routes[service_name] = route
            self.ensure_port(service_name, "")
            for tag in route.tags:
                self.ensure_port(service_name, tag)
            for key in list(self._doors):
                if key[0] == service_name and key[1] and key[1] not in route.tags:
                    closing.append(self._doors.pop(key))
                    self._forget_port(service_name, key[1])
        # Stop the doors of removed tags after releasing the lock. Every request takes
        # the lock (in `route`) on the event loop, so waiting under it would stall the
        # loop that the stopping doors need, and every other URL's requests with it.
        for door in closing:
            self._stop(door)

    def remove_service(self, service_name: str) -> None:
        with self._lock:
            self._routes.pop(service_name, None)
            closing = [
                self._doors.pop(key)
                for key in list(self._doors)
                if key[0] == service_name
            ]
            self._store.delete(PORTS_KIND, service_name)
        for door in closing:
            self._stop(door)

    def route(self, service_name: str) -> Route | None:
        with self._lock:
            return self._routes.get(service_name)

    def audiences(self, service_name: str, route: Route) -> list[str]:
        """Return the audiences an ID token may name: every URL, custom ones too."""
        with self._lock:
            ports = [
                door.port for key, door in self._doors.items() if key[0] == service_name
            ]
        urls = [f"http://{LOOPBACK}:{port}" for port in ports]
        return [*urls, *(url + "/" for url in urls), *route.custom_audiences]

    def _recorded_ports(self, service_name: str) -> dict[str, int]:
        document = self._store.get(PORTS_KIND, service_name) or {}
        ports: dict[str, int] = document.get("ports", {})
        return ports

    def _forget_port(self, service_name: str, tag: str) -> None:
        ports = self._recorded_ports(service_name)
        if ports.pop(tag, None) is not None:
            self._store.put(PORTS_KIND, service_name, {"ports": ports})

    def _serve(self, service_name: str, tag: str, door: _Door) -> None:
        app = FrontDoorApp(self, service_name, tag)
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        door.server = uvicorn.Server(config)
        assert self._loop is not None
        door.task = asyncio.run_coroutine_threadsafe(
            door.server.serve(sockets=[door.sock]), self._loop
        )
        label = f"tag {tag}" if tag else "service URL"
        logger.info("front door of %s (%s) on port %d", service_name, label, door.port)

    def _close(self, key: tuple[str, str]) -> None:
        self._stop(self._doors.pop(key))

    def _stop(self, door: _Door) -> None:
        if door.server is not None:
            door.server.should_exit = True
        if door.task is not None:
            try:
                door.task.result(timeout=5)
            except Exception:
                logger.exception(
                    "front door on port %d did not stop cleanly", door.port
                )
        door.sock.close()

    def _call(self, coroutine: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None
        return self._client


async def _new_client() -> httpx.AsyncClient:
    # trust_env=False: proxy variables of the host must never redirect instance traffic.
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None)


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError:
        if port == 0:
            sock.close()
            raise
        logger.warning("port %d of a front door is taken; its URL changes", port)
        sock.bind((LOOPBACK, 0))
    sock.listen(128)
    return sock


class _BodyTooLarge(Exception):
    pass


@dataclass
class _Exchange:
    """The facts of one request that its request log entry records."""

    method: str
    url: str
    remote_ip: str
    user_agent: str
    started: float
    trace_id: str
    revision: str = ""
    status: int = 0
    response_size: int = 0
    request_size: int = 0
    note: str = ""


class FrontDoorApp:
    """The ASGI app behind one service URL (tag "") or one tag URL."""

    def __init__(self, doors: FrontDoors, service_name: str, tag: str) -> None:
        self.doors = doors
        self.service_name = service_name
        self.tag = tag

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # NOTE: WebSocket and other non-HTTP scopes are not proxied.
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        exchange = _start_exchange(scope)
        try:
            await self._handle(scope, receive, send, exchange)
        finally:
            await asyncio.to_thread(self._log, exchange)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, exchange: _Exchange
    ) -> None:
        route = self.doors.route(self.service_name)
        if route is None:
            await _reply(
                send, exchange, 503, "The service has no revision ready to serve."
            )
            return
        revision = route.pick(self.tag)
        exchange.revision = revision or ""

        headers = _header_list(scope)
        if not _ingress_allows(route.ingress, exchange.remote_ip):
            await _reply(
                send, exchange, 404, "Not found: ingress settings block this caller."
            )
            return
        declared = _content_length(headers)
        if declared is not None and declared > MAX_REQUEST_BODY_BYTES:
            await _reply(send, exchange, 413, "The request body exceeds 32 MiB.")
            return

        verdict = self._authorize(route, headers)
        if verdict is not None:
            status, message = verdict
            await _reply(send, exchange, status, message)
            return
        if revision is None:
            await _reply(send, exchange, 404, "No revision serves this URL.")
            return

        try:
            instance = await asyncio.to_thread(
                self.doors.runtime.ensure_running, revision
            )
        except StartupError as exc:
            logger.warning("instance of %s failed to start: %s", revision, exc.message)
            await _reply(send, exchange, 503, "The instance failed to start.")
            return
        await self._proxy(scope, receive, send, exchange, route, instance.ingress_port)

    def _authorize(
        self, route: Route, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, str] | None:
        """Return None when the caller may invoke the service, else status, message."""
        if route.invoker_iam_disabled:
            return None
        from localcloud.api import run

        invokers = run.members_with_roles(
            self.doors.runtime.cloud, self.service_name, INVOKE_ROLES
        )
        if "allUsers" in invokers:
            return None
        token = _bearer_token(headers)
        if token is None:
            return (
                401,
                "The request was not authenticated: send an ID token as a Bearer "
                "token.",
            )
        audiences = self.doors.audiences(self.service_name, route)
        try:
            claims = self.doors.runtime.cloud.tokens.verify_id_token(token, audiences)
        except InvalidToken:
            return 401, "The request was not authenticated: the ID token is invalid."
        if "allAuthenticatedUsers" in invokers:
            return None
        if _principal(claims) in invokers:
            return None
        return 403, "The caller is not allowed to invoke this service."

    async def _proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: _Exchange,
        route: Route,
        port: int,
    ) -> None:
        headers = _forward_headers(scope, exchange)
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = f"http://{LOOPBACK}:{port}{path.decode('latin-1')}"
        if query:
            url += "?" + query.decode("latin-1")

        content: bytes | AsyncIterator[bytes] = b""
        if _has_body(headers):
            content = _request_body(receive, exchange)
        client = self.doors.client
        request = client.build_request(
            scope["method"],
            url,
            headers=headers,
            content=content,
            timeout=httpx.Timeout(route.timeout_seconds),
        )
        try:
            response = await client.send(request, stream=True)
        except _BodyTooLarge:
            await _reply(send, exchange, 413, "The request body exceeds 32 MiB.")
            return
        except httpx.TimeoutException:
            await _reply(send, exchange, 504, "The request timed out in the instance.")
            return
        except httpx.HTTPError as exc:
            logger.warning("proxying to %s failed: %s", exchange.revision, exc)
            await _reply(send, exchange, 503, "The instance is unavailable.")
            return

        try:
            await _relay(response, send, exchange)
        finally:
            await response.aclose()

    def _log(self, exchange: _Exchange) -> None:
        runtime = self.doors.runtime
        runtime.write_logs([request_log_entry(self.service_name, exchange)])


def _start_exchange(scope: Scope) -> _Exchange:
    headers = dict(_header_list(scope))
    client = scope.get("client") or ("", 0)
    host = headers.get(b"host", b"").decode("latin-1")
    path = scope.get("raw_path") or scope["path"].encode()
    url = f"http://{host}{path.decode('latin-1')}"
    if scope.get("query_string"):
        url += "?" + scope["query_string"].decode("latin-1")
    return _Exchange(
        method=scope["method"],
        url=url,
        remote_ip=client[0],
        user_agent=headers.get(b"user-agent", b"").decode("latin-1"),
        started=time.monotonic(),
        trace_id=_trace_id(headers),
    )


def _trace_id(headers: dict[bytes, bytes]) -> str:
    cloud_trace = headers.get(b"x-cloud-trace-context", b"").decode("latin-1")
    if cloud_trace:
        candidate = cloud_trace.split("/", 1)[0]
        if len(candidate) == 32:
            return candidate
    parent = headers.get(b"traceparent", b"").decode("latin-1").split("-")
    if len(parent) == 4 and len(parent[1]) == 32:
        return parent[1]
    return secrets.token_hex(16)


def _header_list(scope: Scope) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in scope.get("headers", [])]


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _has_body(headers: list[tuple[str, str]]) -> bool:
    names = {name.lower() for name, _ in headers}
    if "transfer-encoding" in names:
        return True
    for name, value in headers:
        if name.lower() == "content-length":
            return value.strip() not in ("", "0")
    return False


def _ingress_allows(ingress: int, remote_ip: str) -> bool:
    if ingress == run_v2.IngressTraffic.INGRESS_TRAFFIC_NONE:
        return False
    if ingress in _INTERNAL_INGRESS:
        return remote_ip in VPC_ADDRESSES
    return True


def _bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    values = dict(headers)
    raw = values.get(b"x-serverless-authorization") or values.get(b"authorization")
    if raw is None:
        return None
    scheme, _, token = raw.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _principal(claims: dict[str, Any]) -> str:
    email = str(claims.get("email", ""))
    if not email:
        return ""
    if email.endswith(SERVICE_ACCOUNT_DOMAIN):
        return f"serviceAccount:{email}"
    return f"user:{email}"


def _strip_signature(value: str) -> str:
    scheme, _, token = value.partition(" ")
    parts = token.strip().split(".")
    if scheme.lower() != "bearer" or len(parts) != 3:
        return value
    return f"{scheme} {parts[0]}.{parts[1]}.{REMOVED_SIGNATURE}"


def _forward_headers(scope: Scope, exchange: _Exchange) -> list[tuple[str, str]]:
    """Build the headers sent to the container, as Cloud Run's edge rewrites them."""
    incoming = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in _header_list(scope)
    ]
    names = {name for name, _ in incoming}

    token_header = (
        "x-serverless-authorization"
        if "x-serverless-authorization" in names
        else "authorization"
    )
    headers: list[tuple[str, str]] = []
    forwarded_for = exchange.remote_ip
    for name, value in incoming:
        if name in _HOP_BY_HOP and name != "transfer-encoding":
            continue
        if name == token_header:
            value = _strip_signature(value)
        if name == "x-forwarded-for":
            forwarded_for = f"{value}, {exchange.remote_ip}"
            continue
        headers.append((name, value))

    headers.append(("x-forwarded-for", forwarded_for))
    headers.append(("x-forwarded-proto", scope.get("scheme", "http")))
    if "x-cloud-trace-context" not in names:
        span = random.getrandbits(63)
        headers.append(("x-cloud-trace-context", f"{exchange.trace_id}/{span};o=1"))
    if "traceparent" not in names:
        headers.append(
            ("traceparent", f"00-{exchange.trace_id}-{secrets.token_hex(8)}-01")
        )
    return headers


async def _request_body(receive: Receive, exchange: _Exchange) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        exchange.request_size += len(chunk)
        if exchange.request_size > MAX_REQUEST_BODY_BYTES:
            raise _BodyTooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _relay(response: httpx.Response, send: Send, exchange: _Exchange) -> None:
    headers = [
        (name.lower(), value)
        for name, value in response.headers.raw
        if name.decode("latin-1").lower() not in _HOP_BY_HOP
    ]
    exchange.status = response.status_code
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": headers,
        }
    )
    async for chunk in response.aiter_raw():
        exchange.response_size += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _reply(send: Send, exchange: _Exchange, status: int, message: str) -> None:
    body = (message + "\n").encode()
    exchange.status = status
    exchange.response_size = len(body)
    exchange.note = message
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="localcloud"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def request_log_entry(service_name: str, exchange: _Exchange) -> LogEntry:
    """Build the `run.googleapis.com/requests` entry of one request, as Cloud Run does.

    The entry records method, URL, status, sizes, latency, caller IP and user agent. It
    never records headers or bodies, so tokens and prompts stay out of the logs.
    """
    parts = service_name.split("/")
    project, location, service = parts[1], parts[3], parts[5]
    latency = duration_pb2.Duration()
    latency.FromNanoseconds(int((time.monotonic() - exchange.started) * 1e9))
    status = exchange.status or 500
    if status >= 500:
        severity = log_severity_pb2.ERROR
    elif status >= 400:
        severity = log_severity_pb2.WARNING
    else:
        severity = log_severity_pb2.INFO
    stamp = now_timestamp()
    entry = LogEntry(
        log_name=f"projects/{project}/logs/run.googleapis.com%2Frequests",
        resource=monitored_resource_pb2.MonitoredResource(
            type="cloud_run_revision",
            labels={
                "project_id": project,
                "service_name": service,
                "revision_name": exchange.revision.rsplit("/", 1)[-1],
                "location": location,
                "configuration_name": service,
            },
        ),
        timestamp=stamp,
        receive_timestamp=stamp,
        severity=severity,
        insert_id=secrets.token_hex(10),
        trace=f"projects/{project}/traces/{exchange.trace_id}",
        http_request=http_request_pb2.HttpRequest(
            request_method=exchange.method,
            request_url=exchange.url,
            request_size=exchange.request_size,
            status=status,
            response_size=exchange.response_size,
            user_agent=exchange.user_agent,
            remote_ip=exchange.remote_ip,
            server_ip=LOOPBACK,
            latency=latency,
            protocol="HTTP/1.1",
        ),
    )
    if exchange.note:
        entry.text_payload = exchange.note
    return entry
