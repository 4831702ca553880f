"""IAM Service Account Credentials v1 (`google.iam.credentials.v1.IAMCredentials`).

ID tokens are signed by the localcloud token authority, so each service's front door can
verify them. Access tokens look opaque. The registry front accepts them, and the Cloud
Run front doors reject them as Cloud Run does.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import grpc
from google.cloud.iam_credentials_v1 import types

from localcloud.api.resources import now_timestamp
from localcloud.rpc import Method, invalid_argument, service_handler

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

SERVICE = "google.iam.credentials.v1.IAMCredentials"

# The project must be the wildcard "-"; the account is an email or a numeric unique id.
_ACCOUNT_NAME = re.compile(r"^projects/-/serviceAccounts/([^/]+)$")
_EMAIL = re.compile(r"^[^@\s/]+@[^@\s/]+\.[^@\s/]+$")
_UNIQUE_ID = re.compile(r"^\d{1,32}$")

DEFAULT_ACCESS_TOKEN_SECONDS = 3600
# Without the org policy constraints/iam.allowServiceAccountCredentialLifetimeExtension,
# access tokens live at most one hour.
MAX_ACCESS_TOKEN_SECONDS = 3600


def _account(name: str, field: str = "name") -> str:
    match = _ACCOUNT_NAME.match(name)
    account = match.group(1) if match else ""
    if not (_EMAIL.match(account) or _UNIQUE_ID.match(account)):
        invalid_argument(
            f"{field} {name!r} is invalid; use projects/-/serviceAccounts/EMAIL, for "
            "example projects/-/serviceAccounts/app@my-project.iam.gserviceaccount.com."
        )
    return account


def _check_delegates(delegates: Any) -> None:
    for delegate in delegates:
        _account(delegate, field="delegates entry")


class IamCredentials:
    def __init__(self, cloud: LocalCloud) -> None:
        self._tokens = cloud.tokens

    def generate_id_token(
        self, request: types.GenerateIdTokenRequest
    ) -> types.GenerateIdTokenResponse:
        account = _account(request.name)
        _check_delegates(request.delegates)
        if not request.audience:
            invalid_argument(
                "audience is required; set it to the URL of the service the token "
                "is for."
            )
        token = self._tokens.issue_id_token(
            account, request.audience, request.include_email
        )
        logger.info("issued an ID token for %s, audience %s", account, request.audience)
        return types.GenerateIdTokenResponse(token=token)

    def generate_access_token(
        self, request: types.GenerateAccessTokenRequest
    ) -> types.GenerateAccessTokenResponse:
        account = _account(request.name)
        _check_delegates(request.delegates)
        if not request.scope:
            invalid_argument(
                "scope is required; request at least one OAuth scope, for example "
                "https://www.googleapis.com/auth/cloud-platform."
            )
        seconds = DEFAULT_ACCESS_TOKEN_SECONDS
        if "lifetime" in request:
            seconds = int(request.lifetime.total_seconds())
        if not 1 <= seconds <= MAX_ACCESS_TOKEN_SECONDS:
            invalid_argument(
                f"lifetime {seconds}s is invalid; request between 1 and "
                f"{MAX_ACCESS_TOKEN_SECONDS} seconds."
            )
        token = self._tokens.issue_access_token(account, seconds)
        # The expire time is read back from the token, so the two always agree.
        expire = now_timestamp()
        expire.FromSeconds(self._tokens.verify_access_token(token).expires_at)
        logger.info("issued an access token for %s, valid %ss", account, seconds)
        return types.GenerateAccessTokenResponse(access_token=token, expire_time=expire)


def handlers(cloud: LocalCloud) -> list[grpc.GenericRpcHandler]:
    credentials = IamCredentials(cloud)
    methods: dict[str, Method] = {
        "GenerateIdToken": (
            types.GenerateIdTokenRequest,
            types.GenerateIdTokenResponse,
            credentials.generate_id_token,
        ),
        "GenerateAccessToken": (
            types.GenerateAccessTokenRequest,
            types.GenerateAccessTokenResponse,
            credentials.generate_access_token,
        ),
    }
    return [service_handler(SERVICE, methods)]
