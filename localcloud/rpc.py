"""Helpers that serve Google API methods over gRPC to the unmodified official clients.

Requests are decoded and responses encoded with the message classes the client libraries
ship (proto-plus `Type.deserialize`/`Type.serialize`, or protobuf `FromString`/
`SerializeToString` for the raw `*_pb2` types), so the bytes on the wire are exactly
what the real services send.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

logger = logging.getLogger(__name__)


class RpcError(Exception):
    """An error that a handler returns to the client as a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(message: str) -> NoReturn:
    raise RpcError(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> NoReturn:
    raise RpcError(grpc.StatusCode.ALREADY_EXISTS, message)


def invalid_argument(message: str) -> NoReturn:
    raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message: str) -> NoReturn:
    raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, message)


def aborted(message: str) -> NoReturn:
    raise RpcError(grpc.StatusCode.ABORTED, message)


def _codec(message_type: Any) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    if hasattr(message_type, "deserialize"):  # proto-plus message class
        return message_type.deserialize, message_type.serialize
    return message_type.FromString, lambda message: message.SerializeToString()


def _wrap(method_name: str, func: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return func(request)
        except RpcError as exc:
            context.abort(exc.code, exc.message)
        except Exception:
            logger.exception("%s failed", method_name)
            context.abort(
                grpc.StatusCode.INTERNAL, f"{method_name} failed in localcloud"
            )

    return handler


Method = tuple[Any, Any, Callable[[Any], Any]]


def service_handler(service: str, methods: dict[str, Method]) -> grpc.GenericRpcHandler:
    """Build a generic handler for `service`, such as `google.cloud.run.v2.Services`.

    `methods` maps each RPC name to (request type, response type, function). The
    function takes the decoded request and returns the response message, or raises
    `RpcError`.
    """
    handlers = {}
    for name, (request_type, response_type, func) in methods.items():
        deserialize, _ = _codec(request_type)
        _, serialize = _codec(response_type)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _wrap(f"{service}/{name}", func),
            request_deserializer=deserialize,
            response_serializer=serialize,
        )
    return grpc.method_handlers_generic_handler(service, handlers)
