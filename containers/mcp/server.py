"""Read-only MCP server over streamable HTTP, with an explicit tool allowlist.

The server is stateless and returns one JSON response to each POST, so any
instance can serve any request and Cloud Run may scale it past one instance.
Only allowlisted tools are registered. A call to any other tool is rejected and
logged as a `tool_denied` event, and invalid arguments are logged as
`invalid_input`, each as one JSON line without the argument values.

Environment (defaults in brackets):
    MCP_TOOL_ALLOWLIST  comma-separated tools to serve [model_card,lookup_doc];
                        cite_source is served only when listed
    MCP_SOURCE_HOSTS    hosts whose URLs cite_source accepts, comma-separated
                        [huggingface.co]
    MODEL_ID, MODEL_SHA model id and 40-character commit sha for model_card
    MCP_ALLOWED_HOSTS   extra Host header values to accept, comma-separated
                        (loopback hosts are always accepted)
    DOCS_DIR            folder of markdown documents [the bundled docs folder]
    MAX_REQUEST_BYTES   request body limit in bytes [65536]
    K_REVISION          revision name, set by Cloud Run
    PORT, HOST          listen address [127.0.0.1:8080]
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypedDict
from urllib.parse import urlsplit

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from containers.common import (
    ConfigError,
    caller_of,
    env_int,
    env_str,
    log_event,
    run_service,
    trace_fields,
    truncate,
)

MCP_PATH: Final = "/mcp"
HEALTH_PATH: Final = "/healthz"
DEFAULT_DOCS_DIR: Final = Path(__file__).resolve().parent / "docs"
DEFAULT_MAX_REQUEST_BYTES: Final = 65536
MAX_DOC_BYTES: Final = 65536
DOC_NAME_PATTERN: Final = re.compile(r"^[a-z0-9-]{1,64}$")
COMMIT_SHA_PATTERN: Final = re.compile(r"^[0-9a-f]{40}$")
# JSON-RPC "Invalid params", the code that the MCP specification (2025-06-18,
# tools, error handling) gives for an unknown tool.
INVALID_PARAMS: Final = -32602
LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_TOOLS: Final = ("model_card", "lookup_doc")
DEFAULT_SOURCE_HOSTS: Final = ("huggingface.co",)
MAX_URL_CHARS: Final = 2048
# Names and addresses of the instance metadata server, which hands out the
# service account's tokens on GCP.
METADATA_HOSTS: Final = ("metadata.google.internal", "metadata")
METADATA_ADDRESSES: Final = (
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
)

# Headers of the HTTP request being served, for the caller and trace log fields.
# The SDK runs each stateless request in a task started from the request's
# context, so the value set by RequestHeadersMiddleware is visible to the tools.
_request_headers: contextvars.ContextVar[dict[str, str] | None] = (
    contextvars.ContextVar("request_headers", default=None)
)


class ModelCard(TypedDict):
    model_id: str
    model_sha: str


class SourceCitation(TypedDict):
    url: str
    host: str


@dataclass(frozen=True)
class ServerConfig:
    allowlist: tuple[str, ...]
    model_id: str
    model_sha: str
    docs_dir: Path
    extra_hosts: tuple[str, ...]
    max_request_bytes: int
    revision: str
    source_hosts: tuple[str, ...] = DEFAULT_SOURCE_HOSTS


def load_config(known_tools: tuple[str, ...]) -> ServerConfig:
    """Read and validate the environment, raising ConfigError with the fix."""
    raw_allowlist = env_str("MCP_TOOL_ALLOWLIST")
    if raw_allowlist:
        allowlist = tuple(
            name.strip() for name in raw_allowlist.split(",") if name.strip()
        )
    else:
        allowlist = tuple(name for name in DEFAULT_TOOLS if name in known_tools)
    unknown = [name for name in allowlist if name not in known_tools]
    if unknown or not allowlist:
        raise ConfigError(
            f"MCP_TOOL_ALLOWLIST={raw_allowlist!r} is invalid; list one or more of "
            f"{', '.join(known_tools)} separated by commas"
        )

    model_sha = env_str("MODEL_SHA")
    if model_sha and not COMMIT_SHA_PATTERN.match(model_sha):
        raise ConfigError(
            f"MODEL_SHA={model_sha!r} is not a full commit sha; set it to the "
            "40-character lowercase hex sha of the served model revision"
        )

    docs_dir = Path(env_str("DOCS_DIR") or DEFAULT_DOCS_DIR)
    if "lookup_doc" in allowlist and not docs_dir.is_dir():
        raise ConfigError(
            f"DOCS_DIR={str(docs_dir)!r} is not a folder; point it at the documents "
            "for lookup_doc or remove lookup_doc from MCP_TOOL_ALLOWLIST"
        )

    extra_hosts = tuple(
        host.strip() for host in env_str("MCP_ALLOWED_HOSTS").split(",") if host.strip()
    )
    raw_source_hosts = env_str("MCP_SOURCE_HOSTS", ",".join(DEFAULT_SOURCE_HOSTS))
    source_hosts = tuple(
        host.strip().lower() for host in raw_source_hosts.split(",") if host.strip()
    )
    return ServerConfig(
        allowlist=allowlist,
        model_id=env_str("MODEL_ID"),
        model_sha=model_sha,
        docs_dir=docs_dir.resolve(),
        extra_hosts=extra_hosts,
        max_request_bytes=env_int(
            "MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES, 1024, 4 * 1024 * 1024
        ),
        revision=env_str("K_REVISION", "unknown"),
        source_hosts=source_hosts,
    )


def log_anomaly(event: str, reason: str, tool: str, **fields: Any) -> None:
    headers = _request_headers.get() or {}
    log_event(
        "WARNING",
        f"{event} for tool {truncate(tool, 64)!r}: {reason}",
        event,
        reason=reason,
        tool=truncate(tool, 64),
        caller=caller_of(headers),
        revision=env_str("K_REVISION", "unknown"),
        **fields,
        **trace_fields(headers),
    )


class InvalidInput(ToolError):
    """A tool argument that fails validation, with a reason code for the log."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AllowlistedMCPServer(MCPServer):
    """MCPServer that serves only allowlisted tools and logs every rejected call."""

    def __init__(self, allowlist: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allowlist = frozenset(allowlist)

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any],
        context: Context[Any, Any] | None = None,
    ) -> Any:
        # Unlisted tools are never registered either; this check makes the
        # rejection explicit and logged rather than a generic "unknown tool".
        if name not in self.allowlist:
            log_anomaly("tool_denied", "tool not in MCP_TOOL_ALLOWLIST", name)
            raise MCPError(
                INVALID_PARAMS,
                f"tool {truncate(name, 64)!r} is not allowed on this server",
            )
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            # The SDK wraps errors raised by a tool in its own ToolError.
            invalid = exc if isinstance(exc, InvalidInput) else exc.__cause__
            if isinstance(invalid, InvalidInput):
                log_anomaly("invalid_input", invalid.reason, name)
            elif isinstance(exc.__cause__, ValidationError):
                fields = sorted(
                    ".".join(str(part) for part in error["loc"])
                    for error in exc.__cause__.errors()
                )
                log_anomaly("invalid_input", "invalid_arguments", name, fields=fields)
            raise


def model_card_tool(config: ServerConfig) -> Callable[[], ModelCard]:
    def model_card() -> ModelCard:
        """Return the id and commit sha of the model this deployment serves."""
        return {"model_id": config.model_id, "model_sha": config.model_sha}

    return model_card


def lookup_doc_tool(config: ServerConfig) -> Callable[[str], str]:
    def lookup_doc(name: str) -> str:
        """Return a bundled markdown document by name, such as 'getting-started'.

        Names are lowercase letters, digits and hyphens, at most 64 characters.
        """
        if not DOC_NAME_PATTERN.match(name):
            raise InvalidInput(
                f"document name {truncate(name, 80)!r} is invalid; use 1-64 lowercase "
                "letters, digits or hyphens, without a path or extension",
                reason="invalid_document_name",
            )
        # The pattern already excludes separators and dots. Resolving also catches
        # a symlink inside the folder that points outside it.
        path = (config.docs_dir / f"{name}.md").resolve()
        if path.parent != config.docs_dir or not path.is_file():
            available = ", ".join(sorted(p.stem for p in config.docs_dir.glob("*.md")))
            raise InvalidInput(
                f"document {name!r} not found; available documents: {available}",
                reason="document_not_found",
            )
        if path.stat().st_size > MAX_DOC_BYTES:
            raise ToolError(f"document {name!r} is over {MAX_DOC_BYTES} bytes")
        return path.read_text(encoding="utf-8")

    return lookup_doc


def _url_problem(url: str, allowed_hosts: tuple[str, ...]) -> tuple[str, str] | None:
    """Return (reason, message) when `url` must not be cited, or None when it may."""
    if len(url) > MAX_URL_CHARS:
        return "url_too_long", f"the URL is over {MAX_URL_CHARS} characters"
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host in METADATA_HOSTS or address in METADATA_ADDRESSES:
        return "metadata_address", "the metadata server is never a source"
    if host == "localhost" or (address is not None and not address.is_global):
        return "private_address", "private, loopback and link-local hosts are rejected"
    if parts.scheme != "https" or not host or parts.username or parts.password:
        return "invalid_url", "use an https URL without credentials"
    if not any(host == h or host.endswith("." + h) for h in allowed_hosts):
        return "host_not_allowed", f"allowed hosts: {', '.join(allowed_hosts)}"
    return None


def cite_source_tool(config: ServerConfig) -> Callable[[str], SourceCitation]:
    def cite_source(url: str) -> SourceCitation:
        """Return a citation for a documentation URL on an allowed host.

        The URL is validated only and never fetched.
        """
        problem = _url_problem(url, config.source_hosts)
        if problem is not None:
            reason, detail = problem
            raise InvalidInput(
                f"URL {truncate(url, 80)!r} is rejected: {detail}", reason=reason
            )
        parts = urlsplit(url)
        return {"url": parts.geturl(), "host": (parts.hostname or "").lower()}

    return cite_source


TOOL_FACTORIES: Final[dict[str, Callable[[ServerConfig], Callable[..., Any]]]] = {
    "model_card": model_card_tool,
    "lookup_doc": lookup_doc_tool,
    "cite_source": cite_source_tool,
}


class RequestHeadersMiddleware:
    """Expose the request headers to the tools through a context variable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
        }
        token = _request_headers.set(headers)
        try:
            await self.app(scope, receive, send)
        finally:
            _request_headers.reset(token)


def transport_security(config: ServerConfig) -> TransportSecuritySettings:
    # DNS-rebinding protection stays on: only loopback hosts and the configured
    # service hosts may appear in Host, and browsers may call only from those.
    hosts = [*LOOPBACK_HOSTS, *config.extra_hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*hosts, *(f"{host}:*" for host in hosts)],
        allowed_origins=[
            origin
            for host in hosts
            for origin in (f"https://{host}", f"http://{host}:*", f"https://{host}:*")
        ]
        + [f"http://{host}" for host in LOOPBACK_HOSTS],
    )


def build_app() -> Starlette:
    config = load_config(tuple(TOOL_FACTORIES))
    server = AllowlistedMCPServer(
        config.allowlist, name="model-refresh-mcp", log_level="WARNING"
    )
    for name in config.allowlist:
        server.add_tool(TOOL_FACTORIES[name](config), name=name)

    @server.custom_route(HEALTH_PATH, methods=["GET"])
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        max_request_body_size=config.max_request_bytes,
        transport_security=transport_security(config),
    )
    app.add_middleware(RequestHeadersMiddleware)
    log_event(
        "INFO",
        f"MCP server serving tools {', '.join(config.allowlist)}",
        "mcp_configured",
        tools=list(config.allowlist),
        model_id=config.model_id,
        revision=config.revision,
    )
    return app


if __name__ == "__main__":
    sys.exit(run_service("mcp server", build_app))
