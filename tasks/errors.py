"""Errors the pipeline raises on purpose. Each message names the value and the fix."""

from __future__ import annotations


class RefreshError(Exception):
    """Base class for every error the refresh pipeline raises deliberately."""


class ConfigError(RefreshError):
    """A target config or flow parameter is invalid; raised before any cloud call."""


class ModelSourceError(RefreshError):
    """The requested model repository or revision cannot be served."""


class DownloadError(RefreshError):
    """A downloaded file is missing, incomplete, or differs from the Hub's metadata."""


class DeployError(RefreshError):
    """A Cloud Run deploy did not reach a ready revision."""


class GateFailed(RefreshError):
    """Post-deploy checks failed, so the candidate was not promoted."""
