"""Config model of vbatt's own OPC UA server (top-level `opcua:` section).

Secure by default: only SignAndEncrypt endpoints, username/password required,
client certificates checked against the trust list in `state_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from vbatt.config.base import Strict

__all__ = ["OpcuaServerConfig", "HistoryConfig", "SECURITY_POLICIES", "DEFAULT_POLICIES", "state_dir"]

# Config names -> asyncua SecurityPolicyType member names.
SECURITY_POLICIES = {
    "Basic256Sha256_SignAndEncrypt": "Basic256Sha256_SignAndEncrypt",
    "Aes128Sha256RsaOaep_SignAndEncrypt": "Aes128Sha256RsaOaep_SignAndEncrypt",
    "Aes256Sha256RsaPss_SignAndEncrypt": "Aes256Sha256RsaPss_SignAndEncrypt",
    "Basic256Sha256_Sign": "Basic256Sha256_Sign",
    "Aes128Sha256RsaOaep_Sign": "Aes128Sha256RsaOaep_Sign",
    "Aes256Sha256RsaPss_Sign": "Aes256Sha256RsaPss_Sign",
    "None": "NoSecurity",
}
DEFAULT_POLICIES = ("Basic256Sha256_SignAndEncrypt", "Aes128Sha256RsaOaep_SignAndEncrypt",
                    "Aes256Sha256RsaPss_SignAndEncrypt")
Policy = Literal[tuple(SECURITY_POLICIES)]  # type: ignore[valid-type]


class HistoryConfig(Strict):
    """History of the aggregate values (HistoryRead), stored in batches in `state_dir/history.sqlite`."""

    enabled: bool = True
    sample_ms: Annotated[float, Field(ge=10, le=3_600_000)] = 1000.0
    flush_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    retention_days: Annotated[float, Field(gt=0)] = 30.0


class OpcuaServerConfig(Strict):
    enabled: bool = False
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"  # listening address
    port: Annotated[int, Field(ge=1, le=65535)] = 4840
    security: Annotated[list[Policy], Field(min_length=1)] = list(DEFAULT_POLICIES)  # type: ignore[valid-type]
    allow_anonymous: bool = False  # anonymous sessions get the viewer role
    state_dir: str = "var/opcua"  # certificates, trust list, users, history; relative to the working dir
    publish_ms: Annotated[float, Field(ge=10, le=60_000)] = 100.0  # image -> address space
    stats_ms: Annotated[float, Field(ge=100, le=60_000)] = 1000.0  # cycle statistics refresh
    create_operator: bool = True  # first start without users: create one, print its password once
    application_uri: str = "urn:vbatt:opcua:server"
    history: HistoryConfig = HistoryConfig()

    @field_validator("security")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"security: each policy once (got {v})")
        return v


def state_dir(cfg: OpcuaServerConfig) -> Path:
    return Path(cfg.state_dir).expanduser()
