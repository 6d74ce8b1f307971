"""--endpoint, --api-key-env and --served-model: where and what a remote backend asks."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .base import BackendError


@dataclass(frozen=True)
class ServerOptions:
    """Where the servers are, where their API key is, and which served model to ask for (named by
    the backend's `prepare` where not given)."""

    endpoints: tuple[str, ...] = ()
    api_key_env: str | None = None
    served_model: str | None = None

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise BackendError(f"--api-key-env {self.api_key_env}: that environment variable is not set")
        return key
