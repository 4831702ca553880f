"""Build and push the LLM and MCP images: base image -> app and weights layers -> push.

The app layer contains the `containers` package under /app, and the LLM image adds the
verified model files under /models/model. Both are deterministic, so an unchanged
model or app produces the same digest and the push uploads nothing.
"""

from __future__ import annotations

from pathlib import Path

from google.api_core import exceptions as gexc
from google.cloud import artifactregistry_v1
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks import oci
from tasks.clients import Clients
from tasks.config import RefreshConfig, Target
from tasks.deploy import MODEL_DIR
from tasks.model import ModelRevision, default_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = "/app"
# A fixed non-root uid, as in distroless images: nothing in the image runs as root.
RUNTIME_USER = "65532:65532"
_APP_SUFFIXES = (".py", ".md", ".json", ".txt")
LAYER_DIGEST_CACHE = "layer-digests.json"


def registry_client(clients: Clients) -> oci.RegistryClient:
    return oci.RegistryClient(
        clients.registry_base_url,
        auth=clients.registry_headers,
        single_patch_uploads=blob_upload_mode(clients.target) == "streamed",
    )


def blob_upload_mode(target: Target) -> str:
    """Return how new layers go up: `streamed` saves a pass over the weights.

    Artifact Registry documents monolithic uploads only, so a GCP target streams only
    when its config sets `blob_uploads: streamed`.
    """
    if target.blob_uploads is not None:
        return target.blob_uploads
    return "streamed" if target.kind == "local" else "monolithic"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def ensure_repository(clients: Clients) -> str:
    """Create the Artifact Registry Docker repository if it does not exist yet."""
    name = f"{clients.location}/repositories/{clients.target.artifact_repository}"
    try:
        clients.artifacts.get_repository(name=name)
        return name
    except gexc.NotFound:
        pass
    try:
        operation = clients.artifacts.create_repository(
            parent=clients.location,
            repository_id=clients.target.artifact_repository,
            repository=artifactregistry_v1.Repository(
                format_=artifactregistry_v1.Repository.Format.DOCKER,
                description="Images of the model-refresh services",
                labels={"managed-by": "model-refresh"},
            ),
        )
        operation.result(timeout=120)
    except gexc.AlreadyExists:
        pass  # created by a concurrent run
    get_run_logger().info("Created Artifact Registry repository %s", name)
    return name


def app_layer() -> oci.Layer:
    """Build the app layer: each source file of the `containers` package, in /app."""
    source = REPO_ROOT / "containers"
    files: dict[str, Path | bytes] = {}
    for path in sorted(source.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        if path.suffix not in _APP_SUFFIXES:
            continue
        relative = path.relative_to(REPO_ROOT).as_posix()
        files[f"{APP_DIR}/{relative}"] = path
    return oci.Layer.from_files(files, created_by="model-refresh: service code")


def weights_layer(files: dict[str, Path]) -> oci.Layer:
    """Build the layer of the verified model files under MODEL_DIR.

    A symlink among the files raises LayerError, so no file from outside the download
    folder reaches the image. The layer's digests are cached next to the downloads, so
    a rebuild of the same files checks the registry with HEAD instead of reading the
    weights again.
    """
    layer = oci.Layer.from_files(
        {f"{MODEL_DIR}/{path}": local for path, local in sorted(files.items())},
        compression=oci.WEIGHTS_COMPRESSION,
        created_by="model-refresh: model weights",
        follow_symlinks=False,
    )
    layer.digest_cache = default_cache_dir() / LAYER_DIGEST_CACHE
    return layer


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def build_llm_image(
    clients: Clients,
    config: RefreshConfig,
    revision: ModelRevision,
    files: dict[str, Path],
) -> str:
    """Append the weights and the guard and engine code to the LLM base image."""
    target = f"{clients.target.image_repository}/llm:model-{revision.sha[:12]}"
    with registry_client(clients) as registry:
        image = oci.append_layers(
            config.target.llm_base_image,
            [weights_layer(files), app_layer()],
            target,
            oci.ConfigChanges(
                env={"PYTHONDONTWRITEBYTECODE": "1", "MODEL_DIR": MODEL_DIR},
                entrypoint=["python3", "-m", "containers.llm.guard"],
                working_dir=APP_DIR,
                user=RUNTIME_USER,
                labels={
                    "org.opencontainers.image.title": "llm",
                    "model-refresh.model.repo": revision.repo_id,
                    "model-refresh.model.sha": revision.sha,
                },
            ),
            registry=registry,
        )
        stats = registry.stats
    get_run_logger().info(
        "Pushed %s (%d blobs uploaded, %d bytes; %d skipped, %d mounted)",
        image,
        stats.blobs_uploaded,
        stats.bytes_uploaded,
        stats.blobs_skipped,
        stats.blobs_mounted,
    )
    return image


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def build_mcp_image(clients: Clients, config: RefreshConfig) -> str:
    """Append the MCP server code to the Python base image and push it."""
    target = f"{clients.target.image_repository}/mcp:build"
    with registry_client(clients) as registry:
        image = oci.append_layers(
            config.target.python_base_image,
            [app_layer()],
            target,
            oci.ConfigChanges(
                env={"PYTHONDONTWRITEBYTECODE": "1"},
                entrypoint=["python3", "-m", "containers.mcp.server"],
                working_dir=APP_DIR,
                user=RUNTIME_USER,
                labels={"org.opencontainers.image.title": "mcp"},
            ),
            registry=registry,
        )
    get_run_logger().info("Pushed %s", image)
    return image
