"""Ingress gateway in front of the LLM engine, in the same Cloud Run service.

The guard is the only container that receives traffic; the engine (vLLM on GCP,
containers.llm.engine locally) is a sidecar on loopback. It enforces request size,
`max_tokens` and per-caller rate limits, screens prompts for injection phrases,
adds the operator's system prompt, and withholds completions that leak the
system-prompt canary or look like a credential. Each rejected or altered request
writes exactly one WARNING JSON line for log-based metrics, without prompt text.

Environment (defaults in brackets):
    ENGINE_URL               engine base URL on loopback [http://127.0.0.1:8081]
    MAX_REQUEST_BYTES        request body limit in bytes [65536]
    MAX_TOKENS_CAP           highest max_tokens a request may ask for [256]
    RATE_LIMIT_PER_MINUTE    chat requests per caller per minute, 0 = off [60]
    PROMPT_INJECTION_FILTER  block, log or off [block]
    SYSTEM_PROMPT            system message prepended to every chat request
    SYSTEM_PROMPT_CANARY     text inside SYSTEM_PROMPT that must never be output
    ENGINE_TIMEOUT_SECONDS   time limit for one engine request [120]
    K_REVISION               revision name, set by Cloud Run
    PORT, HOST               listen address [127.0.0.1:8080]
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from containers.common import (
    ConfigError,
    caller_of,
    env_int,
    env_str,
    log_event,
    run_service,
    trace_fields,
)

DEFAULT_ENGINE_URL: Final = "http://127.0.0.1:8081"
DEFAULT_MAX_REQUEST_BYTES: Final = 65536
DEFAULT_MAX_TOKENS_CAP: Final = 256
DEFAULT_RATE_LIMIT_PER_MINUTE: Final = 60
DEFAULT_ENGINE_TIMEOUT_SECONDS: Final = 120
HEALTH_TIMEOUT_SECONDS: Final = 2.0
# Bounds the rate limiter's memory when many distinct callers appear.
MAX_TRACKED_CALLERS: Final = 10_000
INJECTION_FILTER_MODES: Final = ("block", "log", "off")
BLOCKED_OUTPUT_MESSAGE: Final = "I can't share that."
CHAT_PATH: Final = "/v1/chat/completions"
MESSAGE_TEXT_FIELDS: Final = ("content", "reasoning_content", "reasoning")
ALL_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# An API key shorter than this could match ordinary text in a completion.
MIN_API_KEY_CHARS_TO_MATCH: Final = 8

# Phrases of common system-prompt extraction and instruction-override attempts.
# They catch the copy-pasted attacks, not a determined attacker, so the output
# checks below stay in place either way.
INJECTION_PATTERNS: Final = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"\b(ignore|disregard|forget|override)\b.{0,40}\b(previous|prior|above|"
        r"earlier|preceding|system|all)\b.{0,20}\b(instructions?|prompts?|rules|"
        r"messages?|directions)\b",
        r"\b(reveal|print|show|repeat|output|display|leak|dump|tell me)\b.{0,40}"
        r"\b(system prompt|system message|hidden (prompt|instructions)|initial "
        r"(prompt|instructions)|instructions above)\b",
        r"\byou are now\b.{0,30}\b(developer|jailbreak|dan|unrestricted)\b",
        r"\bbegin(ning)? of (the )?(conversation|prompt)\b.{0,40}\bverbatim\b",
    )
)

# Credential formats with a fixed, documented prefix, so matches are rarely
# ordinary text.
SECRET_PATTERNS: Final = (
    ("google_api_key", re.compile(r"AIza[0-9A-Za-z_\-]{35}")),
    ("openai_api_key", re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}")),
    ("huggingface_token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("github_token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}")),
    ("aws_access_key_id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10,}")),
    ("private_key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("gcp_service_account_key", re.compile(r'"private_key_id"\s*:')),
)


@dataclass(frozen=True)
class GuardConfig:
    engine_url: str
    max_request_bytes: int
    max_tokens_cap: int
    rate_limit_per_minute: int
    injection_filter: str
    system_prompt: str
    canary: str
    engine_timeout_seconds: int
    revision: str

    @classmethod
    def from_env(cls) -> GuardConfig:
        config = cls(
            engine_url=env_str("ENGINE_URL", DEFAULT_ENGINE_URL).rstrip("/"),
            max_request_bytes=env_int(
                "MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES, 1024, 16 * 1024 * 1024
            ),
            max_tokens_cap=env_int("MAX_TOKENS_CAP", DEFAULT_MAX_TOKENS_CAP, 1, 65536),
            rate_limit_per_minute=env_int(
                "RATE_LIMIT_PER_MINUTE", DEFAULT_RATE_LIMIT_PER_MINUTE, 0, 1_000_000
            ),
            injection_filter=env_str("PROMPT_INJECTION_FILTER", "block").lower(),
            system_prompt=env_str("SYSTEM_PROMPT"),
            canary=env_str("SYSTEM_PROMPT_CANARY"),
            engine_timeout_seconds=env_int(
                "ENGINE_TIMEOUT_SECONDS", DEFAULT_ENGINE_TIMEOUT_SECONDS, 1, 3600
            ),
            revision=env_str("K_REVISION", "unknown"),
        )
        config.validate()
        return config

    def validate(self) -> None:
        _require_loopback_url(self.engine_url)
        if self.injection_filter not in INJECTION_FILTER_MODES:
            raise ConfigError(
                f"PROMPT_INJECTION_FILTER={self.injection_filter!r} is invalid; "
                f"use one of {', '.join(INJECTION_FILTER_MODES)}"
            )
        # The message leaves out the canary because it is as sensitive as the prompt.
        if self.canary and self.canary not in self.system_prompt:
            raise ConfigError(
                "SYSTEM_PROMPT_CANARY is set but SYSTEM_PROMPT does not contain it; "
                "put the canary text inside the system prompt or unset it"
            )
        if self.canary and len(self.canary) < 8:
            raise ConfigError(
                f"SYSTEM_PROMPT_CANARY is {len(self.canary)} characters long; use a "
                "random token of at least 8 characters so it never appears by chance"
            )


def _require_loopback_url(url: str) -> None:
    # The engine is a sidecar in the same instance, so a non-loopback URL could only
    # send prompts and API keys off the instance.
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ConfigError(
            f"ENGINE_URL={url!r} is invalid; point it at the engine sidecar on "
            "loopback, for example http://127.0.0.1:8081"
        )


class RateLimiter:
    """Token bucket per caller, refilled continuously at `per_minute` / 60 a second.

    NOTE: the buckets live in one instance's memory, so N instances allow up to N
    times the limit, and callers without an identity header share one bucket.
    """

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.refill_per_second = per_minute / 60.0
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, caller: str) -> bool:
        if self.capacity == 0:
            return True
        now = time.monotonic()
        tokens, updated = self._buckets.pop(caller, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.refill_per_second)
        allowed = tokens >= 1.0
        self._buckets[caller] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_TRACKED_CALLERS:
            self._buckets.popitem(last=False)
        return allowed


class Rejection(Exception):
    """A request that the guard rejects without a completion, with a logged reason."""

    def __init__(self, status: int, reason: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.fields = fields


def find_injection(messages: list[Any]) -> bool:
    for message in messages:
        if not isinstance(message, dict) or message.get("role") == "system":
            continue
        text = _message_text(message)
        if any(pattern.search(text) for pattern in INJECTION_PATTERNS):
            return True
    return False


def find_leak(text: str, canary: str, api_key: str) -> str | None:
    """Return why `text` must not reach the caller, or None when it may."""
    if canary and canary.lower() in text.lower():
        return "system_prompt_canary"
    if len(api_key) >= MIN_API_KEY_CHARS_TO_MATCH and api_key in text:
        return "api_key"
    for name, pattern in SECRET_PATTERNS:
        if pattern.search(text):
            return f"secret_pattern:{name}"
    return None


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        )
    return ""


async def read_body_capped(request: Request, limit: int) -> bytes:
    """Read the body, stopping as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejection(
            413,
            "body_too_large",
            f"the request body is {declared} bytes, over the limit of {limit} bytes",
            limit=limit,
        )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejection(
                413,
                "body_too_large",
                f"the request body is over the limit of {limit} bytes",
                limit=limit,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def parse_chat_request(raw: bytes, config: GuardConfig) -> dict[str, Any]:
    """Validate the request against the caps and add the system prompt."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Rejection(
            400, "malformed_json", "the request body is not valid JSON"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise Rejection(
            400,
            "invalid_request",
            "the request body must be a JSON object with a 'messages' list",
        )
    if body.get("stream"):
        # The output checks need the whole completion before the caller sees it.
        raise Rejection(
            400,
            "stream_not_supported",
            "stream=true is not supported behind the guard; omit it",
        )

    cap = config.max_tokens_cap
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise Rejection(
                400,
                "invalid_max_tokens",
                f"{field}={value!r} is invalid; use a positive integer up to {cap}",
            )
        if value > cap:
            raise Rejection(
                400,
                "max_tokens_over_cap",
                f"{field}={value} is over the cap of {cap} (MAX_TOKENS_CAP); "
                f"request at most {cap} tokens",
                limit=cap,
            )
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = cap

    if config.system_prompt:
        system = {"role": "system", "content": config.system_prompt}
        body["messages"] = [system, *body["messages"]]
    return body


def build_app(config: GuardConfig) -> Starlette:
    limiter = RateLimiter(config.rate_limit_per_minute)
    client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal client
        # trust_env=False keeps proxy variables from rerouting traffic to the sidecar.
        async with httpx.AsyncClient(
            base_url=config.engine_url,
            timeout=config.engine_timeout_seconds,
            trust_env=False,
        ) as engine:
            client = engine
            yield

    def engine_client() -> httpx.AsyncClient:
        assert client is not None, "the lifespan creates the client before requests"
        return client

    def log_anomaly(request: Request, event: str, reason: str, **fields: Any) -> None:
        log_event(
            "WARNING",
            f"{event} on {request.method} {request.url.path[:128]}: {reason}",
            event,
            reason=reason,
            caller=caller_of(request.headers),
            revision=config.revision,
            path=request.url.path[:128],
            **fields,
            **trace_fields(request.headers),
        )

    def reject(request: Request, rejection: Rejection) -> Response:
        log_anomaly(
            request,
            "request_rejected",
            rejection.reason,
            status=rejection.status,
            **rejection.fields,
        )
        return JSONResponse(
            {
                "error": {
                    "message": str(rejection),
                    "type": "invalid_request_error",
                    "code": rejection.reason,
                }
            },
            status_code=rejection.status,
        )

    def forwarded_headers(request: Request) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        for name in ("authorization", "x-cloud-trace-context"):
            if name in request.headers:
                headers[name] = request.headers[name]
        return headers

    async def call_engine(
        request: Request, method: str, path: str, body: bytes | None = None
    ) -> httpx.Response:
        try:
            return await engine_client().request(
                method, path, content=body, headers=forwarded_headers(request)
            )
        except httpx.TimeoutException:
            raise Rejection(
                504,
                "engine_timeout",
                f"the engine did not respond within {config.engine_timeout_seconds} s",
            ) from None
        except httpx.TransportError as exc:
            raise Rejection(
                502,
                "engine_unavailable",
                f"the engine at {config.engine_url} is unreachable "
                f"({type(exc).__name__})",
            ) from None

    def relay(request: Request, upstream: httpx.Response) -> Response:
        if upstream.status_code == 401:
            log_anomaly(request, "request_rejected", "unauthorized", status=401)
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type", "application/json"),
        )

    async def health(request: Request) -> Response:
        try:
            upstream = await engine_client().get(
                "/health", timeout=HEALTH_TIMEOUT_SECONDS
            )
        except httpx.HTTPError:
            return Response(status_code=503)
        return Response(status_code=200 if upstream.status_code == 200 else 503)

    async def list_models(request: Request) -> Response:
        try:
            upstream = await call_engine(request, "GET", "/v1/models")
        except Rejection as rejection:
            return reject(request, rejection)
        return relay(request, upstream)

    async def chat_completions(request: Request) -> Response:
        try:
            if not limiter.allow(caller_of(request.headers)):
                raise Rejection(
                    429,
                    "rate_limited",
                    f"over {config.rate_limit_per_minute} requests a minute for "
                    "this caller; retry later",
                    limit=config.rate_limit_per_minute,
                )
            raw = await read_body_capped(request, config.max_request_bytes)
            body = parse_chat_request(raw, config)
            if config.injection_filter != "off" and find_injection(body["messages"]):
                if config.injection_filter == "block":
                    raise Rejection(
                        400,
                        "prompt_injection",
                        "the request matches a prompt-injection pattern and was "
                        "rejected; rephrase it",
                    )
                log_anomaly(request, "prompt_injection_suspected", "prompt_injection")
            upstream = await call_engine(
                request, "POST", CHAT_PATH, json.dumps(body).encode()
            )
        except Rejection as rejection:
            return reject(request, rejection)

        if upstream.status_code != 200:
            return relay(request, upstream)
        return check_completion(request, upstream)

    def check_completion(request: Request, upstream: httpx.Response) -> Response:
        try:
            completion = upstream.json()
            choices = completion["choices"]
            if not all(isinstance(choice, dict) for choice in choices):
                raise TypeError("every choice must be an object")
        except (ValueError, KeyError, TypeError):
            return reject(
                request,
                Rejection(502, "engine_bad_response", "the engine response is invalid"),
            )

        api_key = request.headers.get("authorization", "").removeprefix("Bearer ")
        reasons = []
        for choice in choices:
            message = choice.get("message")
            if not isinstance(message, dict):
                continue
            # With a reasoning parser, vLLM returns the reasoning in a separate
            # message field, and it can leak just like the answer.
            # NOTE: tool-call arguments are not checked.
            parts = [message.get(field) for field in MESSAGE_TEXT_FIELDS]
            text = "\n".join(str(part) for part in parts if part)
            reason = find_leak(text, config.canary, api_key)
            if reason is not None:
                message["content"] = BLOCKED_OUTPUT_MESSAGE
                for field in MESSAGE_TEXT_FIELDS[1:]:
                    message.pop(field, None)
                reasons.append(reason)
        if reasons:
            log_anomaly(
                request,
                "output_blocked",
                reasons[0],
                status=200,
                blocked_choices=len(reasons),
            )
        return JSONResponse(completion)

    async def not_found(request: Request) -> Response:
        path = request.url.path[:128]
        return reject(
            request,
            Rejection(
                404,
                "route_not_found",
                f"no route for {request.method} {path}; the guard serves "
                f"POST {CHAT_PATH}, GET /v1/models and GET /health",
            ),
        )

    # The catch-all comes last and takes every method, so a known path with the
    # wrong method is also a logged 404 rather than Starlette's silent 405.
    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route(CHAT_PATH, chat_completions, methods=["POST"]),
            Route("/{path:path}", not_found, methods=ALL_METHODS),
        ],
        lifespan=lifespan,
    )


def create_app() -> Starlette:
    config = GuardConfig.from_env()
    log_event(
        "INFO",
        f"guard forwarding to {config.engine_url}",
        "guard_configured",
        max_request_bytes=config.max_request_bytes,
        max_tokens_cap=config.max_tokens_cap,
        rate_limit_per_minute=config.rate_limit_per_minute,
        prompt_injection_filter=config.injection_filter,
        system_prompt_set=bool(config.system_prompt),
        canary_set=bool(config.canary),
        revision=config.revision,
    )
    return build_app(config)


if __name__ == "__main__":
    sys.exit(run_service("llm guard", create_app))
