"""CPU inference server for small Llama checkpoints, with vLLM's OpenAI routes.

Locally it replaces vLLM's OpenAI-compatible server. It loads the same
safetensors weights and serves `GET /health`, `GET /v1/models` and non-streaming
`POST /v1/chat/completions`. The forward pass is plain numpy, so it is only
practical for the tiny demo model.

Environment:
    MODEL_DIR          folder with config.json, *.safetensors and tokenizer files
    SERVED_MODEL_NAME  model id in responses (default: the folder name)
    LLM_API_KEY        when set, every /v1 request needs `Authorization: Bearer KEY`
    PORT, HOST         listen address (default 127.0.0.1:8080)
"""

from __future__ import annotations

import hmac
import json
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import numpy as np
from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import SafetensorError
from safetensors.numpy import load_file
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer

from containers.common import (
    ConfigError,
    env_str,
    log_event,
    run_service,
    trace_fields,
)

SUPPORTED_MODEL_TYPE: Final = "llama"
SUPPORTED_ACTIVATION: Final = "silu"
USAGE_SCOPE_KEY: Final = "model_refresh.usage"


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_json(cls, path: Path) -> LlamaConfig:
        """Read config.json, raising ConfigError for anything this engine cannot run."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"cannot read model config {path}: {exc}; "
                "point MODEL_DIR at a Hugging Face model folder"
            ) from exc

        model_type = raw.get("model_type")
        if model_type != SUPPORTED_MODEL_TYPE:
            raise ConfigError(
                f"model_type={model_type!r} in {path} is not supported; "
                "this engine runs only 'llama' checkpoints, serve others with vLLM"
            )
        activation = raw.get("hidden_act", SUPPORTED_ACTIVATION)
        if activation != SUPPORTED_ACTIVATION:
            raise ConfigError(
                f"hidden_act={activation!r} in {path} is not supported; "
                "this engine implements only the 'silu' SwiGLU MLP"
            )
        if raw.get("rope_scaling"):
            raise ConfigError(
                f"rope_scaling={raw['rope_scaling']!r} in {path} is not supported; "
                "this engine implements only plain rotary embeddings"
            )

        try:
            num_heads = int(raw["num_attention_heads"])
            hidden_size = int(raw["hidden_size"])
            config = cls(
                hidden_size=hidden_size,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads", num_heads)),
                head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
                vocab_size=int(raw["vocab_size"]),
                max_positions=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(raw.get("rope_theta", 10000.0)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"model config {path} has a missing or invalid field ({exc!r}); "
                "compare it with a Hugging Face LlamaConfig"
            ) from exc

        if config.num_heads % config.num_kv_heads != 0:
            raise ConfigError(
                f"num_attention_heads={config.num_heads} is not a multiple of "
                f"num_key_value_heads={config.num_kv_heads} in {path}"
            )
        return config


@dataclass(frozen=True)
class LlamaLayer:
    input_norm: np.ndarray
    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray
    o_proj: np.ndarray
    post_attention_norm: np.ndarray
    gate_proj: np.ndarray
    up_proj: np.ndarray
    down_proj: np.ndarray


class KVCache:
    """Keys and values of every position seen so far, per layer, as [heads, T, dim]."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[np.ndarray | None] = [None] * num_layers
        self.values: list[np.ndarray | None] = [None] * num_layers

    def extend(
        self, layer: int, keys: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        old_keys, old_values = self.keys[layer], self.values[layer]
        if old_keys is not None and old_values is not None:
            keys = np.concatenate([old_keys, keys], axis=1)
            values = np.concatenate([old_values, values], axis=1)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


class LlamaModel:
    """Llama decoder forward pass in numpy float32."""

    def __init__(self, config: LlamaConfig, tensors: dict[str, np.ndarray]) -> None:
        self.config = config
        self._tensors = tensors
        self.embed_tokens = self._take("model.embed_tokens.weight", config.vocab_size)
        self.layers = [self._load_layer(i) for i in range(config.num_layers)]
        self.final_norm = self._take("model.norm.weight")
        if config.tie_word_embeddings and "lm_head.weight" not in tensors:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = self._take("lm_head.weight", config.vocab_size)

        # Rotary frequencies for every position the model accepts, computed once.
        half = config.head_dim // 2
        exponents = np.arange(half, dtype=np.float64) * 2 / config.head_dim
        inv_freq = 1.0 / (config.rope_theta**exponents)
        angles = np.outer(np.arange(config.max_positions), inv_freq)
        angles = np.concatenate([angles, angles], axis=-1)
        self._cos = np.cos(angles).astype(np.float32)
        self._sin = np.sin(angles).astype(np.float32)

    def _take(self, name: str, rows: int | None = None) -> np.ndarray:
        if name not in self._tensors:
            raise ConfigError(
                f"tensor {name!r} is missing from the safetensors files; "
                "the checkpoint does not use Hugging Face Llama tensor names"
            )
        tensor = self._tensors[name].astype(np.float32, copy=False)
        if rows is not None and tensor.shape[0] != rows:
            raise ConfigError(
                f"tensor {name!r} has shape {tensor.shape}, expected {rows} rows "
                "(vocab_size in config.json)"
            )
        return tensor

    def _load_layer(self, index: int) -> LlamaLayer:
        c = self.config
        prefix = f"model.layers.{index}"
        layer = LlamaLayer(
            input_norm=self._take(f"{prefix}.input_layernorm.weight"),
            q_proj=self._take(f"{prefix}.self_attn.q_proj.weight"),
            k_proj=self._take(f"{prefix}.self_attn.k_proj.weight"),
            v_proj=self._take(f"{prefix}.self_attn.v_proj.weight"),
            o_proj=self._take(f"{prefix}.self_attn.o_proj.weight"),
            post_attention_norm=self._take(f"{prefix}.post_attention_layernorm.weight"),
            gate_proj=self._take(f"{prefix}.mlp.gate_proj.weight"),
            up_proj=self._take(f"{prefix}.mlp.up_proj.weight"),
            down_proj=self._take(f"{prefix}.mlp.down_proj.weight"),
        )
        expected = {
            "q_proj": (c.num_heads * c.head_dim, c.hidden_size),
            "k_proj": (c.num_kv_heads * c.head_dim, c.hidden_size),
            "v_proj": (c.num_kv_heads * c.head_dim, c.hidden_size),
            "o_proj": (c.hidden_size, c.num_heads * c.head_dim),
            "gate_proj": (c.intermediate_size, c.hidden_size),
            "up_proj": (c.intermediate_size, c.hidden_size),
            "down_proj": (c.hidden_size, c.intermediate_size),
        }
        for field, shape in expected.items():
            actual = getattr(layer, field).shape
            if actual != shape:
                raise ConfigError(
                    f"tensor {prefix}.*.{field}.weight has shape {actual}, expected "
                    f"{shape} from config.json; the weights do not match the config"
                )
        return layer

    def forward(self, token_ids: list[int], cache: KVCache, start: int) -> np.ndarray:
        """Run `token_ids` from position `start` and return the last logits row."""
        c = self.config
        length = len(token_ids)
        x = self.embed_tokens[np.asarray(token_ids)]
        cos = self._cos[start : start + length]
        sin = self._sin[start : start + length]

        # A query at position start+i may attend to keys at positions 0..start+i.
        key_positions = np.arange(start + length)
        query_positions = np.arange(start, start + length)[:, None]
        mask = np.where(key_positions > query_positions, -np.inf, 0.0)
        mask = mask.astype(np.float32)
        group = c.num_heads // c.num_kv_heads
        scale = np.float32(1.0 / math.sqrt(c.head_dim))

        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            q = split_heads(h @ layer.q_proj.T, c.num_heads, c.head_dim)
            k = split_heads(h @ layer.k_proj.T, c.num_kv_heads, c.head_dim)
            v = split_heads(h @ layer.v_proj.T, c.num_kv_heads, c.head_dim)
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
            keys, values = cache.extend(index, k, v)

            # Grouped-query attention: each key/value head serves `group` query heads.
            keys = np.repeat(keys, group, axis=0)
            values = np.repeat(values, group, axis=0)
            scores = (q @ keys.transpose(0, 2, 1)) * scale + mask
            attention = softmax(scores) @ values
            attention = attention.transpose(1, 0, 2).reshape(length, -1)
            x = x + attention @ layer.o_proj.T

            h = rms_norm(x, layer.post_attention_norm, c.rms_norm_eps)
            gate = h @ layer.gate_proj.T
            x = x + (silu(gate) * (h @ layer.up_proj.T)) @ layer.down_proj.T

        last = rms_norm(x[-1:], self.final_norm, c.rms_norm_eps)
        return (last @ self.lm_head.T)[0]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + eps)).astype(np.float32) * weight


def split_heads(x: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    return x.reshape(x.shape[0], heads, head_dim).transpose(1, 0, 2)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # Hugging Face Llama rotates the two halves of each head, not interleaved pairs.
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return shifted / np.sum(shifted, axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class ChatModel:
    """A loaded checkpoint: weights, tokenizer and chat template."""

    def __init__(self, model_dir: Path) -> None:
        self.config = LlamaConfig.from_json(model_dir / "config.json")
        self.model = LlamaModel(self.config, _load_safetensors(model_dir))
        self.tokenizer = _load_tokenizer(model_dir)
        tokenizer_config = _read_optional_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(tokenizer_config.get("bos_token"))
        self.eos_token = _token_text(tokenizer_config.get("eos_token"))
        self.template = _load_chat_template(model_dir, tokenizer_config)
        self.eos_token_ids = _eos_token_ids(model_dir)
        # Generations run one at a time, which bounds the CPU and memory that one
        # instance uses whatever the number of concurrent requests.
        self._lock = threading.Lock()

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        prompt = self.template.render(
            messages=messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=True,
        )
        # The template already writes the begin-of-text token.
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        rng = np.random.default_rng(params.seed)
        cache = KVCache(self.config.num_layers)
        completion: list[int] = []
        finish_reason = "length"
        text = ""

        with self._lock:
            logits = self.model.forward(prompt_ids, cache, 0)
            while len(completion) < params.max_tokens:
                token = sample(logits, params, rng)
                if token in self.eos_token_ids:
                    finish_reason = "stop"
                    break
                completion.append(token)
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                stop_at = _first_stop(text, params.stop)
                if stop_at is not None:
                    text = text[:stop_at]
                    finish_reason = "stop"
                    break
                position = len(prompt_ids) + len(completion) - 1
                logits = self.model.forward([token], cache, position)

        return Generation(text, len(prompt_ids), len(completion), finish_reason)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    probs = softmax(logits.astype(np.float64) / params.temperature)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return int(rng.choice(len(probs), p=probs))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


def _load_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    # Only safetensors are read, because pickle-based checkpoints (*.bin, *.pt)
    # can run code on load.
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"no *.safetensors files in {model_dir}; this engine loads only "
            "safetensors weights, convert the checkpoint or download its "
            "safetensors variant"
        )
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            file_tensors = load_file(str(file))
        except (OSError, SafetensorError) as exc:
            raise ConfigError(
                f"cannot read {file}: {exc}; download the file again and check "
                "its sha256 against the Hub"
            ) from exc
        for name, tensor in file_tensors.items():
            if name in tensors:
                raise ConfigError(f"tensor {name!r} appears in more than one file")
            tensors[name] = tensor
    return tensors


def _load_tokenizer(model_dir: Path) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        raise ConfigError(
            f"cannot load {path}: {exc}; the model folder needs a fast tokenizer.json"
        ) from exc


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a JSON object")
    return data


def _token_text(token: Any) -> str:
    # tokenizer_config.json stores special tokens either as text or as an
    # AddedToken object with a "content" field.
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return str(token or "")


def _load_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> Template:
    template_file = model_dir / "chat_template.jinja"
    source: Any
    if template_file.exists():
        source = template_file.read_text(encoding="utf-8")
    else:
        source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        named = {item.get("name"): item.get("template") for item in source}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        raise ConfigError(
            f"no chat template in {model_dir}; add chat_template to "
            "tokenizer_config.json or a chat_template.jinja file"
        )

    # Templates come with the downloaded model, so they render in a sandbox that
    # blocks attribute access to Python internals.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_template_error
    try:
        return environment.from_string(source)
    except TemplateError as exc:
        raise ConfigError(f"invalid chat template in {model_dir}: {exc}") from exc


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _eos_token_ids(model_dir: Path) -> frozenset[int]:
    for name in ("generation_config.json", "config.json"):
        value = _read_optional_json(model_dir / name).get("eos_token_id")
        if isinstance(value, int):
            return frozenset({value})
        if isinstance(value, list):
            return frozenset(int(item) for item in value)
    return frozenset()


class RequestError(Exception):
    """A client error, returned as an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{index}] must be an object with a 'role'")
        parsed.append({"role": message["role"], "content": _content_text(message)})
    return parsed


def _content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    # The OpenAI API also accepts a list of typed parts. Only text parts apply here.
    if isinstance(content, list):
        texts = [
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        ]
        return "".join(texts)
    if content is None:
        return ""
    raise RequestError("message 'content' must be a string or a list of text parts")


def parse_sampling(
    body: dict[str, Any], prompt_tokens: int, max_positions: int
) -> SamplingParams:
    remaining = max_positions - prompt_tokens
    if remaining <= 0:
        raise RequestError(
            f"the prompt is {prompt_tokens} tokens, but the model accepts at most "
            f"{max_positions} positions; shorten the messages"
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = remaining
    if (
        not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or max_tokens < 1
    ):
        raise RequestError(f"max_tokens={max_tokens!r} must be a positive integer")

    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p=0 keeps no token; use a value in (0, 1]")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError(f"seed={seed!r} must be an integer")
    if seed is not None and seed < 0:
        raise RequestError(f"seed={seed} must not be negative")

    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings")

    return SamplingParams(
        max_tokens=min(max_tokens, remaining),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop),
    )


def _number(
    body: dict[str, Any], name: str, default: float, low: float, high: float
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RequestError(f"{name}={value!r} must be a number")
    if not low <= value <= high:
        raise RequestError(f"{name}={value} must be between {low} and {high}")
    return float(value)


def error_response(message: str, status: int) -> JSONResponse:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": error_type, "code": status}},
        status_code=status,
    )


class RequestLogMiddleware:
    """Log one JSON line per request with status, token counts and latency.

    The prompt and completion are never logged, only their token counts, which
    the chat handler stores in the ASGI scope.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.monotonic()
        status = 500
        usage: dict[str, int] = {}
        scope[USAGE_SCOPE_KEY] = usage

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            headers = {
                key.decode("latin-1"): value.decode("latin-1")
                for key, value in scope["headers"]
            }
            severity = "INFO" if status < 400 else "WARNING"
            event = "auth_failed" if status == 401 else "request"
            path = scope["path"]
            log_event(
                severity,
                f"{scope['method']} {path} {status}",
                event,
                method=scope["method"],
                path=path[:128],
                status=status,
                latency_ms=round((time.monotonic() - started) * 1000, 1),
                **usage,
                **trace_fields(headers),
            )


class ApiKeyMiddleware:
    """Reject /v1 requests without the API key, like vLLM's --api-key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            authorization = dict(scope["headers"]).get(b"authorization", b"")
            # compare_digest is built to resist timing analysis (Python hmac docs).
            if not hmac.compare_digest(authorization, self._expected):
                response = JSONResponse({"error": "Unauthorized"}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app() -> ASGIApp:
    """Load the model named by the environment and return the ASGI app."""
    model_dir_value = env_str("MODEL_DIR")
    if not model_dir_value:
        raise ConfigError("MODEL_DIR is not set; set it to the model folder")
    model_dir = Path(model_dir_value)
    if not model_dir.is_dir():
        raise ConfigError(
            f"MODEL_DIR={model_dir_value!r} is not a folder; set it to the folder "
            "that contains config.json and the safetensors files"
        )
    served_name = env_str("SERVED_MODEL_NAME") or model_dir.resolve().name
    api_key = env_str("LLM_API_KEY")

    loaded_at = time.monotonic()
    chat = ChatModel(model_dir)
    created = int(time.time())
    log_event(
        "INFO",
        f"loaded model {served_name} in {time.monotonic() - loaded_at:.2f} s",
        "model_loaded",
        served_model_name=served_name,
        api_key_required=bool(api_key),
    )

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def list_models(request: Request) -> Response:
        model = {
            "id": served_name,
            "object": "model",
            "created": created,
            "owned_by": "model-refresh",
            "max_model_len": chat.config.max_positions,
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response("the request body is not valid JSON", 400)
        if not isinstance(body, dict):
            return error_response("the request body must be a JSON object", 400)
        try:
            generation = await _complete(chat, served_name, body)
        except RequestError as exc:
            return error_response(str(exc), exc.status)

        request.scope[USAGE_SCOPE_KEY].update(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
        )
        return JSONResponse(_completion_body(served_name, generation))

    app: ASGIApp = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ]
    )
    if api_key:
        app = ApiKeyMiddleware(app, api_key)
    return RequestLogMiddleware(app)


async def _complete(
    chat: ChatModel, served_name: str, body: dict[str, Any]
) -> Generation:
    requested_model = body.get("model")
    if requested_model not in (None, served_name):
        raise RequestError(
            f"model {requested_model!r} is not served here; use {served_name!r}", 404
        )
    if body.get("stream"):
        raise RequestError("stream=true is not supported by this engine; omit it")
    if body.get("n", 1) != 1:
        raise RequestError(f"n={body.get('n')!r} is not supported; use n=1")

    messages = parse_messages(body)
    try:
        prompt_ids = chat.render_prompt(messages)
    except TemplateError as exc:
        raise RequestError(f"the chat template rejected the messages: {exc}") from exc
    params = parse_sampling(body, len(prompt_ids), chat.config.max_positions)
    return await anyio.to_thread.run_sync(chat.generate, prompt_ids, params)


def _completion_body(served_name: str, generation: Generation) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": None,
                "finish_reason": generation.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        },
    }


if __name__ == "__main__":
    sys.exit(run_service("llm engine", build_app))
