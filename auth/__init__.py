"""Authentication and authorization: tokens (JWT), permissions from claims, Origin checks.

Pure code, no I/O except :func:`auth.tokens.load_or_create_secret`; no asyncio.
"""

from .origin import OriginPolicy
from .permissions import Permissions
from .tokens import (
    ROLES,
    Claims,
    RevocationList,
    Secret,
    TokenVerifier,
    load_or_create_secret,
    mint_token,
    secret_from_env,
)

__all__ = [
    "ROLES",
    "Claims",
    "OriginPolicy",
    "Permissions",
    "RevocationList",
    "Secret",
    "TokenVerifier",
    "load_or_create_secret",
    "mint_token",
    "secret_from_env",
]
