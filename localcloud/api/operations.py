"""Long-running operations (`google.longrunning.Operations`) shared by every API.

APIs create an operation when a request starts and complete or fail it when the work
ends. Clients poll with GetOperation on the same channel, as `google.api_core`'s
`operation.result(timeout=...)` does, or block with WaitOperation.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import grpc
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message as ProtobufMessage
from google.rpc import status_pb2

from localcloud.api import filters
from localcloud.api.resources import paginate
from localcloud.rpc import RpcError, not_found, service_handler

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

KIND = "operations"
SERVICE = "google.longrunning.Operations"

# WaitOperation returns the operation as it is after this long when neither the request
# nor the call deadline sets a shorter bound.
DEFAULT_WAIT_SECONDS = 60.0


def pack(message: Any) -> any_pb2.Any:
    """Pack a proto-plus or protobuf message into an Any."""
    packed = any_pb2.Any()
    if isinstance(message, ProtobufMessage):
        packed.Pack(message)
    else:
        packed.Pack(type(message).pb(message))
    return packed


class Operations:
    """Operations persisted in the store, so a restart keeps their outcome."""

    def __init__(self, cloud: LocalCloud) -> None:
        self._store = cloud.store
        self._changed = threading.Condition(self._store.lock)

    def create(
        self,
        parent: str,
        metadata: Any = None,
        resume: dict[str, Any] | None = None,
    ) -> operations_pb2.Operation:
        """Store a new pending operation.

        `resume` is what the API needs to finish the operation after a restart of
        localcloud; `pending()` returns it with the operation.
        """
        operation = operations_pb2.Operation(
            name=f"{parent}/operations/{uuid.uuid4()}", done=False
        )
        if metadata is not None:
            operation.metadata.CopyFrom(pack(metadata))
        self._save(operation, resume)
        logger.debug("operation %s started", operation.name)
        return operation

    def pending(self) -> list[tuple[operations_pb2.Operation, dict[str, Any] | None]]:
        """Return every operation not done yet, with its `resume` data (or None)."""
        return [
            (
                operations_pb2.Operation.FromString(
                    base64.b64decode(document["operation"])
                ),
                document.get("resume"),
            )
            for _, document in self._store.list(KIND)
            if not document["done"]
        ]

    def abort_pending(self, keep: set[str]) -> None:
        """Fail every pending operation outside `keep` with ABORTED.

        Called once at start, after each API has taken the operations it resumes. The
        rest were left by a localcloud that stopped before finishing them.
        """
        for operation, _ in self.pending():
            if operation.name in keep:
                continue
            self.fail(
                operation.name,
                grpc.StatusCode.ABORTED,
                "localcloud stopped before this operation finished. Read the "
                "resource to see its state, then retry the request.",
            )

    def complete(self, name: str, response: Any, metadata: Any = None) -> None:
        with self._changed:
            operation = self._pending(name)
            if operation is None:
                return
            operation.done = True
            operation.response.CopyFrom(pack(response))
            if metadata is not None:
                operation.metadata.CopyFrom(pack(metadata))
            self._save(operation, None)
            self._changed.notify_all()
        logger.debug("operation %s done", name)

    def fail(self, name: str, code: grpc.StatusCode, message: str) -> None:
        with self._changed:
            operation = self._pending(name)
            if operation is None:
                return
            operation.done = True
            operation.error.CopyFrom(
                status_pb2.Status(code=code.value[0], message=message)
            )
            self._save(operation, None)
            self._changed.notify_all()
        logger.info("operation %s failed with %s: %s", name, code.name, message)

    def get(self, name: str) -> operations_pb2.Operation:
        document = self._store.get(KIND, name)
        if document is None:
            not_found(f"Operation {name} not found.")
        return operations_pb2.Operation.FromString(
            base64.b64decode(document["operation"])
        )

    def list(self, parent: str, filter_text: str) -> list[operations_pb2.Operation]:
        parsed = filters.parse_or_reject(filter_text)
        prefix = f"{parent.rstrip('/')}/operations/"
        return [
            operations_pb2.Operation.FromString(base64.b64decode(document["operation"]))
            for _, document in self._store.list(KIND, prefix)
            if parsed.matches({"name": document["name"], "done": document["done"]})
        ]

    def delete(self, name: str) -> None:
        if not self._store.delete(KIND, name):
            not_found(f"Operation {name} not found.")

    def wait(self, name: str, timeout: float) -> operations_pb2.Operation:
        """Return the operation once done, or as it is when `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                operation = self.get(name)
                remaining = deadline - time.monotonic()
                if operation.done or remaining <= 0:
                    return operation
                self._changed.wait(remaining)

    def _pending(self, name: str) -> operations_pb2.Operation | None:
        operation = self.get(name)
        if operation.done:
            logger.warning(
                "operation %s is already done; keeping its first outcome", name
            )
            return None
        return operation

    def _save(
        self, operation: operations_pb2.Operation, resume: dict[str, Any] | None
    ) -> None:
        document: dict[str, Any] = {
            "name": operation.name,
            "done": operation.done,
            # The wire form keeps the packed Any payloads exact whatever their type.
            "operation": base64.b64encode(operation.SerializeToString()).decode(),
        }
        if resume is not None:
            document["resume"] = resume
        self._store.put(KIND, operation.name, document)


def handlers(cloud: LocalCloud) -> list[grpc.GenericRpcHandler]:
    operations = cloud.operations

    def get_operation(request: operations_pb2.GetOperationRequest) -> Any:
        return operations.get(request.name)

    def list_operations(request: operations_pb2.ListOperationsRequest) -> Any:
        items = operations.list(request.name, request.filter)
        page, next_token = paginate(items, request.page_size, request.page_token)
        return operations_pb2.ListOperationsResponse(
            operations=page, next_page_token=next_token
        )

    def delete_operation(request: operations_pb2.DeleteOperationRequest) -> Any:
        operations.delete(request.name)
        return empty_pb2.Empty()

    main = service_handler(
        SERVICE,
        {
            "GetOperation": (
                operations_pb2.GetOperationRequest,
                operations_pb2.Operation,
                get_operation,
            ),
            "ListOperations": (
                operations_pb2.ListOperationsRequest,
                operations_pb2.ListOperationsResponse,
                list_operations,
            ),
            "DeleteOperation": (
                operations_pb2.DeleteOperationRequest,
                empty_pb2.Empty,
                delete_operation,
            ),
        },
    )
    return [main, _wait_operation_handler(operations)]


def _wait_operation_handler(operations: Operations) -> grpc.GenericRpcHandler:
    # WaitOperation needs the call deadline, which service_handler does not pass on,
    # so it gets its own handler for the same service.
    def wait_operation(
        request: operations_pb2.WaitOperationRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        bounds = [DEFAULT_WAIT_SECONDS]
        if request.HasField("timeout"):
            bounds.append(request.timeout.ToTimedelta().total_seconds())
        remaining = context.time_remaining()
        if remaining is not None:
            # Return a little before the deadline so the client receives the result.
            bounds.append(max(remaining - 0.5, 0.0))
        try:
            return operations.wait(request.name, min(bounds))
        except RpcError as exc:
            context.abort(exc.code, exc.message)

    handler = grpc.unary_unary_rpc_method_handler(
        wait_operation,
        request_deserializer=operations_pb2.WaitOperationRequest.FromString,
        response_serializer=operations_pb2.Operation.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"WaitOperation": handler})
