"""Artifact Registry v1 repositories
(`google.devtools.artifactregistry.v1.ArtifactRegistry`).

Only Docker repositories in standard mode are served. Images of the repository
`projects/P/locations/L/repositories/R` are named `L-docker.pkg.dev/P/R/IMAGE`, and the
local OCI registry stores them under that path.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import grpc
from google.cloud.artifactregistry_v1 import types
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2

from localcloud.api import filters
from localcloud.api.resources import from_document, now_timestamp, paginate, to_document
from localcloud.rpc import (
    Method,
    already_exists,
    invalid_argument,
    not_found,
    service_handler,
)

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

SERVICE = "google.devtools.artifactregistry.v1.ArtifactRegistry"
KIND = "artifactregistry.repositories"

_PARENT = re.compile(r"^projects/([^/]+)/locations/([^/]+)$")
# Repository ids start with a lowercase letter, use lowercase letters, digits and
# hyphens, do not end with a hyphen, and have at most 63 characters.
_REPOSITORY_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_REPOSITORY_NAME = re.compile(
    r"^projects/([^/]+)/locations/([^/]+)/repositories/([^/]+)$"
)
_DOCKER_HOST = re.compile(r"^([a-z0-9-]+)-docker\.pkg\.dev$")


def docker_repository_path(repository_name: str) -> str:
    """Return `L-docker.pkg.dev/P/R` for `projects/P/locations/L/repositories/R`."""
    match = _REPOSITORY_NAME.match(repository_name)
    if not match:
        raise ValueError(
            f"repository name {repository_name!r} is invalid; expected "
            "projects/PROJECT/locations/LOCATION/repositories/REPOSITORY."
        )
    project, location, repository = match.groups()
    return f"{location}-docker.pkg.dev/{project}/{repository}"


def find_docker_repository(cloud: LocalCloud, image: str) -> types.Repository | None:
    """Return the repository that contains `image` (`L-docker.pkg.dev/P/R/NAME[:TAG]`).

    Returns None when the image path is not an Artifact Registry path or the repository
    does not exist.
    """
    parts = image.split("/")
    if len(parts) < 4:
        return None
    host_match = _DOCKER_HOST.match(parts[0])
    if not host_match:
        return None
    name = (
        f"projects/{parts[1]}/locations/{host_match.group(1)}/repositories/{parts[2]}"
    )
    document = cloud.store.get(KIND, name)
    return from_document(types.Repository, document) if document else None


class ArtifactRegistry:
    def __init__(self, cloud: LocalCloud) -> None:
        self._cloud = cloud
        self._store = cloud.store

    def create_repository(self, request: types.CreateRepositoryRequest) -> Any:
        parent = _PARENT.match(request.parent)
        if not parent:
            invalid_argument(
                f"parent {request.parent!r} is invalid; use "
                "projects/PROJECT/locations/LOCATION."
            )
        if not _REPOSITORY_ID.match(request.repository_id):
            invalid_argument(
                f"repository_id {request.repository_id!r} is invalid; start with a "
                "lowercase letter, use up to 63 lowercase letters, digits and hyphens, "
                "and do not end with a hyphen."
            )
        repository = types.Repository(request.repository)
        _validate_repository(repository)

        name = f"{request.parent}/repositories/{request.repository_id}"
        repository.name = name
        repository.create_time = now_timestamp()
        repository.update_time = repository.create_time
        repository.mode = types.Repository.Mode(
            types.Repository.Mode.STANDARD_REPOSITORY
        )
        repository.registry_uri = docker_repository_path(name)
        with self._store.lock:
            if self._store.get(KIND, name) is not None:
                already_exists(f"the repository already exists: {name}")
            self._store.put(KIND, name, to_document(repository))
        logger.info("created repository %s (%s)", name, repository.registry_uri)
        return self._finished_operation(request.parent, repository)

    def get_repository(self, name: str) -> types.Repository:
        _check_name(name)
        document = self._store.get(KIND, name)
        if document is None:
            not_found(f"Requested entity was not found: repository {name}")
        return from_document(types.Repository, document)

    def list_repositories(
        self, request: types.ListRepositoriesRequest
    ) -> types.ListRepositoriesResponse:
        if not _PARENT.match(request.parent):
            invalid_argument(
                f"parent {request.parent!r} is invalid; use "
                "projects/PROJECT/locations/LOCATION."
            )
        parsed = filters.parse_or_reject(request.filter)
        documents = [
            document
            for _, document in self._store.list(KIND, f"{request.parent}/repositories/")
            if parsed.matches(document)
        ]
        if request.order_by:
            documents = _order(documents, request.order_by)
        page, next_token = paginate(documents, request.page_size, request.page_token)
        return types.ListRepositoriesResponse(
            repositories=[from_document(types.Repository, item) for item in page],
            next_page_token=next_token,
        )

    def delete_repository(self, request: types.DeleteRepositoryRequest) -> Any:
        self.get_repository(request.name)
        self._store.delete(KIND, request.name)
        logger.info("deleted repository %s", request.name)
        parent = request.name.rsplit("/repositories/", 1)[0]
        return self._finished_operation(parent, empty_pb2.Empty())

    def _finished_operation(self, parent: str, response: Any) -> Any:
        operations = self._cloud.operations
        operation = operations.create(parent, metadata=types.OperationMetadata())
        operations.complete(operation.name, response)
        return operations.get(operation.name)


def _validate_repository(repository: types.Repository) -> None:
    if repository.format_ == types.Repository.Format.FORMAT_UNSPECIFIED:
        invalid_argument("repository.format is required; set it to DOCKER.")
    if repository.format_ != types.Repository.Format.DOCKER:
        invalid_argument(
            f"repository.format {repository.format_.name} is not served by localcloud; "
            "only DOCKER repositories are available."
        )
    if repository.mode not in (
        types.Repository.Mode.MODE_UNSPECIFIED,
        types.Repository.Mode.STANDARD_REPOSITORY,
    ):
        invalid_argument(
            f"repository.mode {repository.mode.name} is not served by localcloud; "
            "leave it unset or use STANDARD_REPOSITORY."
        )


def _check_name(name: str) -> None:
    if not _REPOSITORY_NAME.match(name):
        invalid_argument(
            f"repository name {name!r} is invalid; use "
            "projects/PROJECT/locations/LOCATION/repositories/REPOSITORY."
        )


def _order(documents: list[dict[str, Any]], order_by: str) -> list[dict[str, Any]]:
    field, _, direction = order_by.strip().partition(" ")
    if field not in ("name", "create_time", "update_time") or direction not in (
        "",
        "asc",
        "desc",
    ):
        invalid_argument(
            f"order_by {order_by!r} is not supported; use name, create_time or "
            "update_time, optionally followed by asc or desc."
        )
    return sorted(
        documents,
        key=lambda item: str(item.get(field, "")),
        reverse=direction == "desc",
    )


def handlers(cloud: LocalCloud) -> list[grpc.GenericRpcHandler]:
    registry = ArtifactRegistry(cloud)
    methods: dict[str, Method] = {
        "CreateRepository": (
            types.CreateRepositoryRequest,
            operations_pb2.Operation,
            registry.create_repository,
        ),
        "GetRepository": (
            types.GetRepositoryRequest,
            types.Repository,
            lambda request: registry.get_repository(request.name),
        ),
        "ListRepositories": (
            types.ListRepositoriesRequest,
            types.ListRepositoriesResponse,
            registry.list_repositories,
        ),
        "DeleteRepository": (
            types.DeleteRepositoryRequest,
            operations_pb2.Operation,
            registry.delete_repository,
        ),
    }
    return [service_handler(SERVICE, methods)]
