"""Config models of nodes read from external OPC UA servers, and of that driver (docs/opcua_client.md).

A node names its server (`endpoint`, `security`, credentials) and maps vbatt's
field names to the server's NodeIds. Nodes with the same endpoint, security and
user share one connection. The mappable fields, their ranges and the output
names all come from the field table (`vbatt.kernel.fields`), never spelled here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, ValidationInfo, create_model, field_validator, model_validator

from vbatt.config.base import NodeId, NodeSettings, Strict
from vbatt.kernel.fields import NODE_MEASUREMENTS, NODE_OUTPUTS

__all__ = [
    "OpcuaNodeConfig",
    "OpcuaClientDriverConfig",
    "OpcuaItem",
    "OpcuaSecurity",
    "OpcuaInputs",
    "OpcuaOutputs",
    "OpcuaConstants",
    "MAPPABLE_INPUTS",
    "POLICIES",
    "parse_node_id",
]

# What a server can report: the device measurements (not the driver's bookkeeping).
MAPPABLE_INPUTS = NODE_MEASUREMENTS
POLICIES = ("Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss")


def parse_node_id(text: str):
    """An OPC UA NodeId from its string form (`ns=2;s=Rack1.SoC`, `nsu=urn:x;i=7`, ...)."""
    from asyncua import ua  # lazily: only configs with OPC UA nodes pay for the import

    try:
        nid = ua.NodeId.from_string(text)
    except Exception as exc:  # asyncua raises several kinds for malformed strings
        cause = exc.__cause__ or exc
        raise ValueError(f"not an OPC UA NodeId: {text!r} ({cause}); expected e.g. 'ns=2;s=Rack1.SoC', "
                         f"'ns=3;i=1042' or 'nsu=urn:vendor:plc;s=SoC'") from None
    return nid


def _short_item(v: Any) -> Any:
    return {"node_id": v} if isinstance(v, str) else v


class OpcuaItem(Strict):
    """One variable: vbatt value = server value × scale + offset (both directions)."""

    node_id: str
    scale: Annotated[float, Field(allow_inf_nan=False)] = 1.0
    offset: Annotated[float, Field(allow_inf_nan=False)] = 0.0

    @field_validator("node_id")
    @classmethod
    def _parses(cls, v: str) -> str:
        parse_node_id(v)
        return v

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, v: float) -> float:
        if v == 0:
            raise ValueError("scale must not be 0 (vbatt value = server value × scale + offset)")
        return v


Item = Annotated[OpcuaItem, BeforeValidator(_short_item)]

# One optional key per field of the table: unknown names are "unknown key" errors with their line.
OpcuaInputs = create_model("OpcuaInputs", __base__=Strict,
                           **{f.name: (Optional[Item], None) for f in MAPPABLE_INPUTS})
OpcuaOutputs = create_model("OpcuaOutputs", __base__=Strict,
                            **{f.name: (Optional[Item], None) for f in NODE_OUTPUTS})
OpcuaConstants = create_model(
    "OpcuaConstants", __base__=Strict,
    **{f.name: (Optional[Annotated[float, Field(ge=f.lo, le=f.hi, allow_inf_nan=False)]], None)
       for f in MAPPABLE_INPUTS})


def _readable_file(v: str) -> str:
    p = Path(v)
    if not p.is_file():
        raise ValueError(f"no such file: {v} (paths are relative to the working directory)")
    return v


def _certificate(v: str) -> str:
    from cryptography import x509

    data = Path(_readable_file(v)).read_bytes()
    try:
        x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"{v}: not an X.509 certificate in PEM or DER ({exc})") from None
    return v


CertFile = Annotated[str, BeforeValidator(lambda v: _certificate(v) if isinstance(v, str) else v)]
KeyFile = Annotated[str, BeforeValidator(lambda v: _readable_file(v) if isinstance(v, str) else v)]


class OpcuaSecurity(Strict):
    """A signed (and by default encrypted) secure channel with a pinned server certificate."""

    policy: Literal["Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"]
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: CertFile  # vbatt's client certificate (its SAN URI becomes the application URI)
    private_key: KeyFile
    private_key_password_env: Optional[str] = None  # name of an environment variable
    # The one server certificate trusted: a server presenting another key cannot complete the handshake.
    server_certificate: CertFile


def _security(v: Any) -> Any:
    if v == "none":
        return None
    if not isinstance(v, dict) and not isinstance(v, OpcuaSecurity):
        raise ValueError("expected 'none' or a mapping {policy, mode, certificate, private_key, "
                         "server_certificate}")
    return v


class OpcuaNodeConfig(NodeSettings):
    """A node whose fields are variables of an external OPC UA server (its settings: `NodeSettings`)."""

    id: NodeId
    driver: Literal["opcua"]
    # No default: 4840 on this host is vbatt's own server, never the device's.
    endpoint: Annotated[str, Field(pattern=r"^opc\.tcp://[^/:\s]+(:\d{1,5})?(/.*)?$")]
    # Explicit on purpose: `none` sends everything in clear text and must be a visible choice.
    security: Annotated[Optional[OpcuaSecurity], BeforeValidator(_security)]  # None: `security: none`
    username: Optional[Annotated[str, Field(min_length=1)]] = None
    password_env: Optional[str] = None  # environment variable holding the password (never the YAML)
    inputs: OpcuaInputs  # type: ignore[valid-type]
    outputs: OpcuaOutputs = OpcuaOutputs()  # type: ignore[valid-type]
    constants: OpcuaConstants = OpcuaConstants()  # type: ignore[valid-type]

    @field_validator("username")
    @classmethod
    def _not_in_clear(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and "security" in info.data and info.data["security"] is None:
            raise ValueError("a password must not travel over security: none (configure security)")
        return v

    @field_validator("password_env")
    @classmethod
    def _env_set(cls, v: str | None) -> str | None:
        if v is not None and v not in os.environ:
            raise ValueError(f"environment variable {v!r} is not set (it must hold the OPC UA password)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "OpcuaNodeConfig":
        mapped = {k for k, v in self.inputs if v is not None}
        if not mapped:
            raise ValueError("inputs: map at least one field to a NodeId "
                             f"(fields: {', '.join(f.name for f in MAPPABLE_INPUTS)})")
        both = sorted(mapped & {k for k, v in self.constants if v is not None})
        if both:
            raise ValueError(f"{', '.join(both)}: given both in inputs and in constants (choose one)")
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together (user authentication needs both)")
        return self

    def connection_key(self) -> tuple:
        """Nodes with equal keys share one client connection."""
        return (self.endpoint, self.security and self.security.model_dump_json(), self.username)


class OpcuaClientDriverConfig(Strict):
    """Timing of every OPC UA client connection (`drivers.opcua`)."""

    publishing_interval_ms: Annotated[float, Field(gt=0, le=60_000)] = 100.0
    sampling_interval_ms: Annotated[float, Field(ge=0, le=60_000)] | None = None  # default: publishing interval
    # Keep-alives prove an unchanged value is still current; None: derived so that
    # 3 fit into plant.stale_ms.
    keepalive_count: Annotated[int, Field(ge=1, le=1000)] | None = None
    connect_timeout_ms: Annotated[float, Field(gt=0)] = 5000.0
    request_timeout_ms: Annotated[float, Field(gt=0)] = 2000.0
    session_timeout_ms: Annotated[float, Field(ge=1000)] = 30_000.0
    reconnect_min_ms: Annotated[float, Field(gt=0)] = 500.0
    reconnect_max_ms: Annotated[float, Field(gt=0)] = 10_000.0
    write_interval_ms: Annotated[float, Field(ge=0)] = 100.0  # least time between two writes to one server

    @model_validator(mode="after")
    def _backoff(self) -> "OpcuaClientDriverConfig":
        if self.reconnect_min_ms > self.reconnect_max_ms:
            raise ValueError(f"reconnect_min_ms ({self.reconnect_min_ms:g}) must be <= "
                             f"reconnect_max_ms ({self.reconnect_max_ms:g})")
        return self
