"""The four local PEM files: the merchant's pair and the sandbox's ("Alipay's") pair.

``ensure_keys`` is safe when several processes start at once (``make run``
starts the sandbox and the API side by side): a private key is published with
``os.link``, which never overwrites, so exactly one generated key wins; each
public key is always derived from the private key on disk and replaced
atomically, so the pair on disk always matches.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .constants import DEFAULT_KEYS_DIR

logger = logging.getLogger(__name__)

KEY_FILES = {
    "app_private": "app_private.pem",
    "app_public": "app_public.pem",
    "alipay_private": "alipay_private.pem",
    "alipay_public": "alipay_public.pem",
}

__all__ = [
    "DEFAULT_KEYS_DIR",
    "KEY_FILES",
    "ensure_keys",
    "load_private_key",
    "load_public_key",
    "private_pem",
    "public_pem",
]


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    """PKCS8 PEM (``BEGIN PRIVATE KEY``), unencrypted."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: rsa.RSAPublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM (``BEGIN PUBLIC KEY``)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return key


def load_public_key(path: Path) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{path} is not an RSA public key")
    return key


def _write_temp(directory: Path, data: bytes, mode: int) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pem")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Path(name)


def _publish_private(path: Path) -> None:
    """Create ``path`` with a fresh key unless it exists; never overwrite."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tmp = _write_temp(path.parent, private_pem(key), 0o600)
    try:
        os.link(tmp, path)
        logger.info("generated RSA private key %s", path)
    except FileExistsError:
        logger.info("another process created %s first; keeping it", path)
    finally:
        tmp.unlink(missing_ok=True)


def _sync_public(private_path: Path, public_path: Path) -> None:
    """Make ``public_path`` the public half of the key in ``private_path``."""
    wanted = public_pem(load_private_key(private_path).public_key())
    try:
        if public_path.read_bytes() == wanted:
            return
        logger.warning("%s does not match %s; rewriting it", public_path, private_path)
    except FileNotFoundError:
        pass
    tmp = _write_temp(public_path.parent, wanted, 0o644)
    try:
        os.replace(tmp, public_path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_keys(keys_dir: Path = DEFAULT_KEYS_DIR) -> dict[str, Path]:
    """Make the four PEM files in ``keys_dir`` when missing; return their paths.

    Keys: ``app_private``, ``app_public``, ``alipay_private``, ``alipay_public``.
    Private keys are mode 0600. Existing keys are kept.
    """
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = {name: keys_dir / filename for name, filename in KEY_FILES.items()}
    for owner in ("app", "alipay"):
        private_path, public_path = paths[f"{owner}_private"], paths[f"{owner}_public"]
        if not private_path.exists():
            _publish_private(private_path)
        _sync_public(private_path, public_path)
    return paths
