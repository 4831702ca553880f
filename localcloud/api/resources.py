"""Helpers shared by the API modules: proto messages as JSON documents, page tokens and
update masks.

Documents use the proto field names (`display_name`, not `displayName`) and enum names,
so update-mask paths and list filters address them with the names the APIs document.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2

from localcloud.rpc import invalid_argument

Message = TypeVar("Message")

# Google APIs cap list pages; most document 1000 as the maximum page size.
MAX_PAGE_SIZE = 1000


def to_document(message: Any) -> dict[str, Any]:
    """Convert a proto-plus message to a JSON-ready dict with proto field names."""
    text = type(message).to_json(
        message,
        use_integers_for_enums=False,
        preserving_proto_field_name=True,
        indent=None,
    )
    document: dict[str, Any] = json.loads(text)
    return document


def from_document(message_type: type[Message], document: dict[str, Any]) -> Message:
    """Build a proto-plus message of `message_type` from a document of `to_document`."""
    message: Message = message_type.from_json(  # type: ignore[attr-defined]
        json.dumps(document), ignore_unknown_fields=True
    )
    return message


def now_timestamp() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


def rfc3339_now() -> str:
    """Return the current UTC time in the RFC 3339 form that proto JSON uses."""
    return now_timestamp().ToJsonString()


def paginate(
    items: Sequence[Message],
    page_size: int,
    page_token: str,
    default_page_size: int = 100,
    max_page_size: int = MAX_PAGE_SIZE,
) -> tuple[list[Message], str]:
    """Return one page of `items` and the token of the next page ("" on the last page).

    Tokens encode the offset of the next item, so a token stays valid while the list
    only grows at its end, as it does for the resources served here.
    """
    if page_size < 0:
        invalid_argument(f"page_size must not be negative, got {page_size}.")
    size = min(page_size or default_page_size, max_page_size)
    start = _decode_page_token(page_token)
    end = start + size
    next_token = _encode_page_token(end) if end < len(items) else ""
    return list(items[start:end]), next_token


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        label, _, number = text.partition(":")
        offset = int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        offset = -1
        label = ""
    if label != "offset" or offset < 0:
        invalid_argument(
            f"page_token {token!r} is invalid; pass the next_page_token of the "
            "previous response unchanged."
        )
    return offset


def apply_update_mask(
    target: dict[str, Any],
    source: dict[str, Any],
    paths: Sequence[str],
    allowed: set[str],
) -> None:
    """Copy the fields named by `paths` from `source` into `target`, in place.

    Each path is a dotted field path in proto field names. A path that is missing from
    `source` clears the field in `target`, as the update semantics of Google APIs do.
    """
    for path in paths:
        top = path.split(".", 1)[0]
        if top not in allowed:
            invalid_argument(
                f"update_mask path {path!r} is not updatable; updatable fields are "
                f"{', '.join(sorted(allowed))}."
            )
        _copy_path(target, source, path.split("."))


def _copy_path(
    target: dict[str, Any], source: dict[str, Any], parts: list[str]
) -> None:
    head, rest = parts[0], parts[1:]
    if not rest:
        if head in source:
            target[head] = source[head]
        else:
            target.pop(head, None)
        return
    child_source = source.get(head)
    if not isinstance(child_source, dict):
        child_source = {}
    child_target = target.setdefault(head, {})
    _copy_path(child_target, child_source, rest)
