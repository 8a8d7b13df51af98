"""Env values encrypted at rest ("sealed") with a key derived from `[store] secret_key`.

AES-256-GCM from PyCA's `cryptography`, never our own cipher: authenticated (a changed byte
is refused, not decrypted to garbage), with associated data that binds each value to its
row. A sealed value copied to another user's or another key's row does not open, so whoever
can write the database but does not hold the key cannot move one user's secret into a val
of their own.

    sealed value = "v1." + urlsafe-base64(nonce (12 random bytes) || ciphertext || tag)
    key          = HKDF-SHA256(secret_key, info="valrun env v1"), 32 bytes
    key id       = HKDF-SHA256(secret_key, info="valrun key id"), 8 bytes, hex: stored in
                   the `meta` table to tell a wrong key from a damaged value
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from runtime.errors import ValrunError

PREFIX = "v1."
NONCE_BYTES = 12


class SealError(ValrunError):
    """A sealed value did not open: the wrong key, or a damaged or moved value."""


def _derive(secret_key: str, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(
        secret_key.encode("utf-8")
    )


class Sealer:
    def __init__(self, secret_key: str) -> None:
        self._aead = AESGCM(_derive(secret_key, b"valrun env v1", 32))
        self.key_id = _derive(secret_key, b"valrun key id", 8).hex()

    @staticmethod
    def _aad(user_id: int, key: str) -> bytes:
        return f"env\0{user_id}\0{key}".encode()

    def seal(self, user_id: int, key: str, value: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, value.encode("utf-8"), self._aad(user_id, key))
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, user_id: int, key: str, sealed: str) -> str:
        if not sealed.startswith(PREFIX):
            raise SealError(f"env {key}: not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(sealed.removeprefix(PREFIX))
            plain = self._aead.decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._aad(user_id, key)
            )
        except (ValueError, InvalidTag):
            raise SealError(
                f"env {key} of user {user_id} does not open with this secret key "
                "(a wrong key, or the value was changed or moved)"
            ) from None
        return plain.decode("utf-8")
