"""Google-style ID tokens that localcloud signs through IAM Credentials and verifies at
each service's front door.

Tokens are RS256 JWTs with the claims Google puts in service account ID tokens (`iss`,
`aud`, `sub`, `email`, `email_verified`, `iat`, `exp`). The signing key is created once
per state folder and kept there, so tokens stay valid across a restart of localcloud.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://accounts.google.com"
ID_TOKEN_LIFETIME_SECONDS = 3600


class InvalidToken(Exception):
    """The bearer token is missing, malformed, expired, or for another audience."""


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

    def issue_access_token(self) -> str:
        """Return an opaque OAuth-style access token; front doors must reject it."""
        return "ya29.local-" + secrets.token_urlsafe(32)

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
