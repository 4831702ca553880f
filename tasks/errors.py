"""Errors the pipeline raises on purpose. Each message names the value and the fix."""

from __future__ import annotations

from typing import Any


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


class SecretError(RefreshError):
    """A Secret Manager secret has no version a revision can be pinned to."""


class DeployConflict(DeployError):
    """Cloud Run rejected a revision name that already exists with another spec."""


class RevisionNotReady(DeployError):
    """A revision did not become ready; the message carries its condition and logs."""


class AuditError(RefreshError):
    """A security audit cannot start: a service is missing or splits its traffic."""


class AuditFailed(RefreshError):
    """A security audit ran and at least one check failed.

    `report` contains every check. Raising marks the flow run failed, so Prefect
    notifications on failed runs also cover a scheduled audit that finds a problem.
    """

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class LoadBalancerError(RefreshError):
    """The configured load balancer cannot be secured: its HTTPS proxy is missing."""
