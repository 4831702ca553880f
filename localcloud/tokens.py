"""Google-style tokens that localcloud issues through IAM Credentials and verifies.

ID tokens are RS256 JWTs with the claims Google puts in service account ID tokens
(`iss`, `aud`, `sub`, `email`, `email_verified`, `iat`, `exp`); each service's front
door verifies them. Access tokens look like Google's opaque OAuth tokens (`ya29.`
prefix) and carry a principal and an expiry under an HMAC. The registry front verifies
them, and the Cloud Run front doors reject them.

The signing key is created once per state folder and kept there, and the HMAC key is
derived from it, so both kinds of token stay valid across a restart of localcloud.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://accounts.google.com"
ID_TOKEN_LIFETIME_SECONDS = 3600
ACCESS_TOKEN_LIFETIME_SECONDS = 3600
ACCESS_TOKEN_PREFIX = "ya29.local-"


class InvalidToken(Exception):
    """The bearer token is missing, malformed, expired, or for another audience."""


@dataclass(frozen=True)
class AccessTokenClaims:
    """The principal and the validity window of a verified access token."""

    principal: str
    issued_at: int  # seconds since the Unix epoch
    expires_at: int  # seconds since the Unix epoch


class TokenAuthority:
    def __init__(self, state_dir: Path) -> None:
        key_path = state_dir / "signing-key.pem"
        if key_path.exists():
            loaded = serialization.load_pem_private_key(
                key_path.read_bytes(), password=None
            )
            assert isinstance(loaded, rsa.RSAPrivateKey)
            self._key = loaded
        else:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            state_dir.mkdir(parents=True, exist_ok=True)
            key_path.write_bytes(
                self._key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            key_path.chmod(0o600)
        public_der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = hashlib.sha256(public_der).hexdigest()[:40]
        private_der = self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._access_key = hashlib.sha256(
            b"localcloud access tokens\0" + private_der
        ).digest()

    def issue_id_token(
        self, email: str, audience: str, include_email: bool = True
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": audience,
            "azp": email,
            "sub": str(int(hashlib.sha256(email.encode()).hexdigest()[:15], 16)),
            "iat": now,
            "exp": now + ID_TOKEN_LIFETIME_SECONDS,
        }
        if include_email:
            claims["email"] = email
            claims["email_verified"] = True
        return jwt.encode(
            claims, self._key, algorithm="RS256", headers={"kid": self.key_id}
        )

    def issue_access_token(
        self,
        principal: str = "localcloud",
        lifetime_seconds: int = ACCESS_TOKEN_LIFETIME_SECONDS,
        *,
        issued_at: int | None = None,
    ) -> str:
        """Return an OAuth-style access token for `principal`, valid for
        `lifetime_seconds` from `issued_at` (default: now).

        The registry front accepts it, and the Cloud Run front doors reject it, as
        Cloud Run rejects access tokens.
        """
        now = int(time.time()) if issued_at is None else issued_at
        payload = _b64encode(
            json.dumps(
                {"sub": principal, "iat": now, "exp": now + lifetime_seconds},
                separators=(",", ":"),
            ).encode()
        )
        return f"{ACCESS_TOKEN_PREFIX}{payload}.{self._access_signature(payload)}"

    def verify_access_token(self, token: str) -> AccessTokenClaims:
        """Return the claims of an access token that this authority issued and that
        has not expired. Raises InvalidToken otherwise, also for an ID token."""
        if token.startswith("eyJ"):
            raise InvalidToken("an ID token is not an access token")
        if not token.isascii() or not token.startswith(ACCESS_TOKEN_PREFIX):
            raise InvalidToken("the access token is malformed or was not issued here")
        payload, dot, signature = token[len(ACCESS_TOKEN_PREFIX) :].partition(".")
        if not dot or not hmac.compare_digest(
            signature, self._access_signature(payload)
        ):
            raise InvalidToken("the access token is malformed or was not issued here")
        try:
            claims = json.loads(_b64decode(payload))
            result = AccessTokenClaims(
                principal=str(claims["sub"]),
                issued_at=int(claims["iat"]),
                expires_at=int(claims["exp"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidToken("the access token payload is malformed") from exc
        if result.expires_at <= time.time():
            raise InvalidToken("the access token has expired")
        return result

    def _access_signature(self, payload: str) -> str:
        digest = hmac.new(self._access_key, payload.encode(), hashlib.sha256).digest()
        return _b64encode(digest)

    def verify_id_token(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """Return the claims of a valid ID token whose `aud` is one of `audiences`."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["RS256"],
                audience=audiences,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "aud", "iss", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        return claims


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64url text: {exc}") from exc
