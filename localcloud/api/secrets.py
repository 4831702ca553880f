"""Secret Manager v1 (`google.cloud.secretmanager.v1.SecretManagerService`).

Secret and version metadata live in the store. Payloads live in separate files with mode
0600 under `<state_dir>/secret-payloads`, and destroying a version deletes its file.
Payloads are never logged.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.cloud.secretmanager_v1 import types
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.protobuf import empty_pb2, json_format, timestamp_pb2

from localcloud.api import filters
from localcloud.api.resources import (
    apply_update_mask,
    from_document,
    now_timestamp,
    paginate,
    rfc3339_now,
    to_document,
)
from localcloud.rpc import (
    Method,
    RpcError,
    aborted,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    service_handler,
)

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"
SECRET_KIND = "secretmanager.secrets"
VERSION_KIND = "secretmanager.versions"

# Limits documented at https://cloud.google.com/secret-manager/quotas.
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_ANNOTATIONS_BYTES = 16 * 1024
MAX_LABELS = 64

_PARENT = re.compile(r"^projects/[^/]+(/locations/[^/]+)?$")
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_SECRET_NAME = re.compile(r"^(projects/[^/]+(?:/locations/[^/]+)?)/secrets/([^/]+)$")
_VERSION_NAME = re.compile(
    r"^(projects/[^/]+(?:/locations/[^/]+)?/secrets/[^/]+)/versions/([^/]+)$"
)
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
_ANNOTATION_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_RESERVED_ALIASES = {"latest", "new"}
UPDATABLE_SECRET_FIELDS = {
    "labels",
    "annotations",
    "topics",
    "rotation",
    "expire_time",
    "ttl",
    "version_aliases",
    "version_destroy_ttl",
}


class SecretAccessError(Exception):
    """A secret version cannot be read: it is missing, disabled or destroyed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def crc32c(data: bytes) -> int:
    """Return the CRC32C (Castagnoli) checksum that Secret Manager uses for payloads."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_table() -> list[int]:
    table = []
    for index in range(256):
        value = index
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
        table.append(value)
    return table


_CRC32C_TABLE = _crc32c_table()


def _new_etag() -> str:
    return f'"{uuid.uuid4().hex[:14]}"'


class SecretManager:
    def __init__(self, cloud: LocalCloud) -> None:
        self._store = cloud.store
        self._payload_dir = cloud.state_dir / "secret-payloads"

    # Secrets

    def create_secret(self, request: types.CreateSecretRequest) -> types.Secret:
        if not _PARENT.match(request.parent):
            invalid_argument(
                f"parent {request.parent!r} is invalid; use projects/PROJECT or "
                "projects/PROJECT/locations/LOCATION."
            )
        if not _SECRET_ID.match(request.secret_id):
            invalid_argument(
                f"secret_id {request.secret_id!r} is invalid; use 1 to 255 letters, "
                "digits, hyphens (-) and underscores (_)."
            )
        secret = types.Secret(request.secret)
        _validate_replication(secret, regional="/locations/" in request.parent)
        _validate_secret_fields(secret)
        if secret.version_aliases:
            invalid_argument("version_aliases must be empty when creating a secret.")

        name = f"{request.parent}/secrets/{request.secret_id}"
        secret.name = name
        secret.create_time = now_timestamp()
        secret.etag = _new_etag()
        with self._store.lock:
            if self._store.get(SECRET_KIND, name) is not None:
                already_exists(f"Secret [{name}] already exists.")
            self._save_secret(secret, next_version=1, iam_policy=None)
        logger.info("created secret %s", name)
        return secret

    def get_secret(self, name: str) -> types.Secret:
        return from_document(types.Secret, self._secret_document(name)["secret"])

    def list_secrets(
        self, request: types.ListSecretsRequest
    ) -> types.ListSecretsResponse:
        parsed = filters.parse_or_reject(request.filter)
        documents = [
            document["secret"]
            for _, document in self._store.list(
                SECRET_KIND, f"{request.parent}/secrets/"
            )
            if parsed.matches(document["secret"])
        ]
        page, next_token = paginate(
            documents, request.page_size, request.page_token, max_page_size=25_000
        )
        return types.ListSecretsResponse(
            secrets=[from_document(types.Secret, item) for item in page],
            next_page_token=next_token,
            total_size=len(documents),
        )

    def update_secret(self, request: types.UpdateSecretRequest) -> types.Secret:
        paths = list(request.update_mask.paths)
        if not paths:
            invalid_argument(
                "update_mask is required; list the fields to change, for example "
                "labels or annotations."
            )
        with self._store.lock:
            stored = self._secret_document(request.secret.name)
            _check_etag(request.secret.etag, stored["secret"].get("etag", ""), "Secret")
            updated = dict(stored["secret"])
            apply_update_mask(
                updated, to_document(request.secret), paths, UPDATABLE_SECRET_FIELDS
            )
            secret = from_document(types.Secret, updated)
            _validate_secret_fields(secret)
            self._validate_aliases(secret)
            secret.etag = _new_etag()
            self._save_secret(secret, stored["next_version"], stored.get("iam_policy"))
        logger.info("updated secret %s fields %s", secret.name, ", ".join(paths))
        return secret

    def delete_secret(self, request: types.DeleteSecretRequest) -> None:
        with self._store.lock:
            stored = self._secret_document(request.name)
            _check_etag(request.etag, stored["secret"].get("etag", ""), "Secret")
            for version_name, _ in self._store.list(
                VERSION_KIND, f"{request.name}/versions/"
            ):
                self._payload_path(version_name).unlink(missing_ok=True)
                self._store.delete(VERSION_KIND, version_name)
            self._store.delete(SECRET_KIND, request.name)
        logger.info("deleted secret %s", request.name)

    # Versions

    def add_secret_version(
        self, request: types.AddSecretVersionRequest
    ) -> types.SecretVersion:
        data = request.payload.data
        if len(data) > MAX_PAYLOAD_BYTES:
            invalid_argument(
                f"payload.data is {len(data)} bytes; Secret Manager accepts at most "
                f"{MAX_PAYLOAD_BYTES} bytes (64 KiB). Store larger data elsewhere and "
                "keep only its key in the secret."
            )
        checksum_sent = "data_crc32c" in request.payload
        if checksum_sent and request.payload.data_crc32c != crc32c(data):
            invalid_argument(
                f"payload.data_crc32c {request.payload.data_crc32c} does not match the "
                f"CRC32C of payload.data ({crc32c(data)}); compute it over the exact "
                "bytes sent."
            )
        with self._store.lock:
            stored = self._secret_document(request.parent)
            secret = from_document(types.Secret, stored["secret"])
            number = stored["next_version"]
            version = types.SecretVersion(
                name=f"{request.parent}/versions/{number}",
                create_time=now_timestamp(),
                state=types.SecretVersion.State.ENABLED,
                replication_status=_replication_status(secret),
                etag=_new_etag(),
                client_specified_payload_checksum=checksum_sent,
            )
            self._write_payload(version.name, data)
            self._store.put(VERSION_KIND, version.name, to_document(version))
            self._save_secret(secret, number + 1, stored.get("iam_policy"))
        logger.info("added secret version %s", version.name)
        return version

    def get_secret_version(self, name: str) -> types.SecretVersion:
        with self._store.lock:
            return from_document(types.SecretVersion, self._version_document(name))

    def access(self, name: str) -> tuple[str, bytes]:
        """Return the resolved version name and the payload, or raise RpcError."""
        with self._store.lock:
            document = self._version_document(name)
            resolved = document["name"]
            state = document.get("state", "STATE_UNSPECIFIED")
            if state != "ENABLED":
                failed_precondition(f"Secret Version [{resolved}] is in {state} state.")
            return resolved, self._payload_path(resolved).read_bytes()

    def list_secret_versions(
        self, request: types.ListSecretVersionsRequest
    ) -> types.ListSecretVersionsResponse:
        parsed = filters.parse_or_reject(request.filter)
        with self._store.lock:
            self._secret_document(request.parent)
            documents = [
                self._version_document(name)
                for name, _ in self._store.list(
                    VERSION_KIND, f"{request.parent}/versions/"
                )
            ]
        # Secret Manager lists versions newest first.
        documents.sort(
            key=lambda item: int(item["name"].rsplit("/", 1)[1]), reverse=True
        )
        matching = [item for item in documents if parsed.matches(item)]
        page, next_token = paginate(
            matching, request.page_size, request.page_token, max_page_size=25_000
        )
        return types.ListSecretVersionsResponse(
            versions=[from_document(types.SecretVersion, item) for item in page],
            next_page_token=next_token,
            total_size=len(matching),
        )

    def enable(self, request: types.EnableSecretVersionRequest) -> types.SecretVersion:
        return self._change_state(request.name, request.etag, "ENABLED")

    def disable(
        self, request: types.DisableSecretVersionRequest
    ) -> types.SecretVersion:
        return self._change_state(request.name, request.etag, "DISABLED")

    def destroy(
        self, request: types.DestroySecretVersionRequest
    ) -> types.SecretVersion:
        return self._change_state(request.name, request.etag, "DESTROYED")

    def _change_state(self, name: str, etag: str, target: str) -> types.SecretVersion:
        with self._store.lock:
            document = self._version_document(name)
            _check_etag(etag, document.get("etag", ""), "SecretVersion")
            if document.get("state") == "DESTROYED":
                failed_precondition(
                    f"Secret Version [{document['name']}] is in DESTROYED state; a "
                    "destroyed version cannot change state. Add a new version instead."
                )
            document.pop("scheduled_destroy_time", None)
            if target == "DESTROYED":
                secret = self._secret_document(document["name"].split("/versions/")[0])
                destroy_ttl = secret["secret"].get("version_destroy_ttl")
                if destroy_ttl:
                    # With a destroy delay the version is disabled now and destroyed
                    # when the delay ends.
                    target = "DISABLED"
                    document["scheduled_destroy_time"] = _add_duration(destroy_ttl)
                else:
                    self._finish_destroy(document)
            document["state"] = target
            document["etag"] = _new_etag()
            self._store.put(VERSION_KIND, document["name"], document)
        logger.info("secret version %s is now %s", document["name"], target)
        return from_document(types.SecretVersion, document)

    def _finish_destroy(self, document: dict[str, Any]) -> None:
        self._payload_path(document["name"]).unlink(missing_ok=True)
        document["state"] = "DESTROYED"
        document["destroy_time"] = rfc3339_now()
        document.pop("scheduled_destroy_time", None)

    # IAM policy of a secret

    def get_iam_policy(self, resource: str) -> policy_pb2.Policy:
        stored = self._secret_document(resource).get("iam_policy")
        policy = policy_pb2.Policy()
        if stored:
            json_format.ParseDict(stored, policy)
        return policy

    def set_iam_policy(
        self, request: iam_policy_pb2.SetIamPolicyRequest
    ) -> policy_pb2.Policy:
        with self._store.lock:
            stored = self._secret_document(request.resource)
            current = self.get_iam_policy(request.resource)
            if request.policy.etag and request.policy.etag != current.etag:
                aborted(
                    f"The etag of the policy on {request.resource} changed since it "
                    "was read; read the policy again, reapply the change and retry."
                )
            policy = policy_pb2.Policy()
            policy.CopyFrom(request.policy)
            policy.etag = uuid.uuid4().bytes[:8]
            stored["iam_policy"] = json_format.MessageToDict(policy)
            self._store.put(SECRET_KIND, request.resource, stored)
        logger.info("set IAM policy on %s", request.resource)
        return policy

    def test_iam_permissions(
        self, request: iam_policy_pb2.TestIamPermissionsRequest
    ) -> iam_policy_pb2.TestIamPermissionsResponse:
        self._secret_document(request.resource)
        # NOTE: requests are anonymous here, so the caller is granted every Secret
        # Manager permission it requests.
        granted = [p for p in request.permissions if p.startswith("secretmanager.")]
        return iam_policy_pb2.TestIamPermissionsResponse(permissions=granted)

    # Storage

    def _secret_document(self, name: str) -> dict[str, Any]:
        if not _SECRET_NAME.match(name):
            invalid_argument(
                f"secret name {name!r} is invalid; use "
                "projects/PROJECT/secrets/SECRET_ID."
            )
        document = self._store.get(SECRET_KIND, name)
        if document is None:
            not_found(f"Secret [{name}] not found.")
        return document

    def _version_document(self, name: str) -> dict[str, Any]:
        match = _VERSION_NAME.match(name)
        if not match:
            invalid_argument(
                f"secret version name {name!r} is invalid; use "
                "projects/PROJECT/secrets/SECRET_ID/versions/VERSION."
            )
        secret_name, version_id = match.groups()
        stored = self._secret_document(secret_name)
        resolved = self._resolve_version(secret_name, version_id, stored)
        document = self._store.get(VERSION_KIND, resolved)
        if document is None:
            not_found(f"Secret Version [{resolved}] not found.")
        scheduled = document.get("scheduled_destroy_time")
        if scheduled and _is_past(scheduled):
            self._finish_destroy(document)
            self._store.put(VERSION_KIND, resolved, document)
        return document

    def _resolve_version(
        self, secret_name: str, version_id: str, stored: dict[str, Any]
    ) -> str:
        if version_id.isdigit():
            return f"{secret_name}/versions/{version_id}"
        if version_id == "latest":
            # "latest" is the most recently created version, whatever its state.
            newest = stored["next_version"] - 1
            if newest < 1:
                not_found(f"Secret [{secret_name}] not found or has no versions.")
            return f"{secret_name}/versions/{newest}"
        aliases = stored["secret"].get("version_aliases", {})
        if version_id in aliases:
            return f"{secret_name}/versions/{aliases[version_id]}"
        not_found(
            f"Secret Version [{secret_name}/versions/{version_id}] not found; use a "
            "version number, latest, or an alias set in version_aliases."
        )

    def _validate_aliases(self, secret: types.Secret) -> None:
        for alias, number in secret.version_aliases.items():
            if not _ALIAS.match(alias) or alias.lower() in _RESERVED_ALIASES:
                invalid_argument(
                    f"version alias {alias!r} is invalid; start with a letter, use up "
                    "to 63 letters, digits, hyphens and underscores, and avoid "
                    "latest and new."
                )
            version_name = f"{secret.name}/versions/{number}"
            if self._store.get(VERSION_KIND, version_name) is None:
                invalid_argument(
                    f"version alias {alias!r} points to {version_name}, which does not "
                    "exist; point it at an existing version number."
                )

    def _save_secret(
        self, secret: types.Secret, next_version: int, iam_policy: dict[str, Any] | None
    ) -> None:
        document = {"secret": to_document(secret), "next_version": next_version}
        if iam_policy:
            document["iam_policy"] = iam_policy
        self._store.put(SECRET_KIND, secret.name, document)

    def _payload_path(self, version_name: str) -> Path:
        return self._payload_dir / urllib.parse.quote(version_name, safe="")

    def _write_payload(self, version_name: str, data: bytes) -> None:
        self._payload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._payload_path(version_name)
        tmp = path.with_name(path.name + ".tmp")
        # Create the file with mode 0600 from the start so the payload is never
        # readable by other users, even briefly.
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)


def _validate_replication(secret: types.Secret, regional: bool) -> None:
    kind = types.Replication.pb(secret.replication).WhichOneof("replication")
    if regional:
        if kind is not None:
            invalid_argument(
                "replication must not be set on a regional secret; its location "
                "comes from the parent."
            )
        return
    if kind is None:
        invalid_argument(
            "secret.replication is required; set replication.automatic or "
            "replication.user_managed with at least one replica location."
        )
    if kind == "user_managed":
        replicas = secret.replication.user_managed.replicas
        if not replicas or any(not replica.location for replica in replicas):
            invalid_argument(
                "replication.user_managed needs at least one replica, each with a "
                "location such as us-central1."
            )


def _validate_secret_fields(secret: types.Secret) -> None:
    if len(secret.labels) > MAX_LABELS:
        invalid_argument(
            f"a secret has at most {MAX_LABELS} labels, got {len(secret.labels)}."
        )
    for key, value in secret.labels.items():
        if not _valid_label(key, first_letter=True) or not _valid_label(value, False):
            invalid_argument(
                f"label {key!r}={value!r} is invalid; keys start with a lowercase "
                "letter, and keys and values use up to 63 lowercase letters, digits, "
                "hyphens and underscores."
            )
    size = 0
    for key, value in secret.annotations.items():
        if not _ANNOTATION_KEY.match(key):
            invalid_argument(
                f"annotation key {key!r} is invalid; use 1 to 63 letters, digits, "
                "dots, hyphens and underscores, starting and ending with a letter or "
                "digit."
            )
        size += len(key.encode()) + len(value.encode())
    if size > MAX_ANNOTATIONS_BYTES:
        invalid_argument(
            f"annotations total {size} bytes; Secret Manager accepts at most "
            f"{MAX_ANNOTATIONS_BYTES} bytes of annotation keys and values."
        )
    if "rotation" in secret and not secret.topics:
        invalid_argument(
            "rotation needs at least one Pub/Sub topic in topics to send the "
            "rotation notifications to."
        )


def _valid_label(text: str, first_letter: bool) -> bool:
    if len(text) > 63 or (first_letter and not text):
        return False
    if first_letter and not text[0].islower():
        return False
    return all(char.islower() or char.isdigit() or char in "_-" for char in text)


def _replication_status(secret: types.Secret) -> types.ReplicationStatus:
    if "user_managed" in secret.replication:
        replicas = [
            types.ReplicationStatus.UserManagedStatus.ReplicaStatus(
                location=replica.location
            )
            for replica in secret.replication.user_managed.replicas
        ]
        return types.ReplicationStatus(
            user_managed=types.ReplicationStatus.UserManagedStatus(replicas=replicas)
        )
    if "automatic" in secret.replication:
        return types.ReplicationStatus(
            automatic=types.ReplicationStatus.AutomaticStatus()
        )
    return types.ReplicationStatus()


def _check_etag(sent: str, current: str, kind: str) -> None:
    if sent and sent != current:
        aborted(
            f"{kind} etag {sent} does not match the current etag {current}; read the "
            "resource again and retry with its etag."
        )


def _is_past(rfc3339: str) -> bool:
    moment = timestamp_pb2.Timestamp()
    moment.FromJsonString(rfc3339)
    return moment.ToDatetime() <= now_timestamp().ToDatetime()


def _add_duration(duration: str) -> str:
    """Return now plus a proto JSON duration such as "86400s" as an RFC 3339 string."""
    stamp = now_timestamp()
    seconds = float(duration.rstrip("s"))
    stamp.FromDatetime(stamp.ToDatetime() + timedelta(seconds=seconds))
    return stamp.ToJsonString()


def access_secret_version(cloud: LocalCloud, version_name: str) -> bytes:
    """Read the payload of `version_name` (a number, alias or `latest`).

    Raises SecretAccessError when the version is missing, disabled or destroyed.
    """
    try:
        _, data = SecretManager(cloud).access(version_name)
    except RpcError as exc:
        raise SecretAccessError(exc.message) from exc
    return data


def handlers(cloud: LocalCloud) -> list[grpc.GenericRpcHandler]:
    manager = SecretManager(cloud)

    def access(request: types.AccessSecretVersionRequest) -> Any:
        name, data = manager.access(request.name)
        payload = types.SecretPayload(data=data, data_crc32c=crc32c(data))
        return types.AccessSecretVersionResponse(name=name, payload=payload)

    def delete_secret(request: types.DeleteSecretRequest) -> Any:
        manager.delete_secret(request)
        return empty_pb2.Empty()

    iam = iam_policy_pb2
    methods: dict[str, Method] = {
        "CreateSecret": (
            types.CreateSecretRequest,
            types.Secret,
            manager.create_secret,
        ),
        "GetSecret": (
            types.GetSecretRequest,
            types.Secret,
            lambda request: manager.get_secret(request.name),
        ),
        "ListSecrets": (
            types.ListSecretsRequest,
            types.ListSecretsResponse,
            manager.list_secrets,
        ),
        "UpdateSecret": (
            types.UpdateSecretRequest,
            types.Secret,
            manager.update_secret,
        ),
        "DeleteSecret": (types.DeleteSecretRequest, empty_pb2.Empty, delete_secret),
        "AddSecretVersion": (
            types.AddSecretVersionRequest,
            types.SecretVersion,
            manager.add_secret_version,
        ),
        "GetSecretVersion": (
            types.GetSecretVersionRequest,
            types.SecretVersion,
            lambda request: manager.get_secret_version(request.name),
        ),
        "AccessSecretVersion": (
            types.AccessSecretVersionRequest,
            types.AccessSecretVersionResponse,
            access,
        ),
        "ListSecretVersions": (
            types.ListSecretVersionsRequest,
            types.ListSecretVersionsResponse,
            manager.list_secret_versions,
        ),
        "EnableSecretVersion": (
            types.EnableSecretVersionRequest,
            types.SecretVersion,
            manager.enable,
        ),
        "DisableSecretVersion": (
            types.DisableSecretVersionRequest,
            types.SecretVersion,
            manager.disable,
        ),
        "DestroySecretVersion": (
            types.DestroySecretVersionRequest,
            types.SecretVersion,
            manager.destroy,
        ),
        "GetIamPolicy": (
            iam.GetIamPolicyRequest,
            policy_pb2.Policy,
            lambda request: manager.get_iam_policy(request.resource),
        ),
        "SetIamPolicy": (
            iam.SetIamPolicyRequest,
            policy_pb2.Policy,
            manager.set_iam_policy,
        ),
        "TestIamPermissions": (
            iam.TestIamPermissionsRequest,
            iam.TestIamPermissionsResponse,
            manager.test_iam_permissions,
        ),
    }
    return [service_handler(SERVICE, methods)]
