"""One MQTT session for asyncio code: paho-mqtt 2.x with its own network thread, faults in our words.

paho's threaded loop (`loop_start`) reads and writes the socket, keeps the session alive, and
handles TLS record buffering itself; it runs our `on_message` in its thread, so handlers take a
lock or hand work to the asyncio loop. Reconnection is ours, not paho's (`reconnect_on_failure=False`):
the caller (drivers/aio.py's `Links`, or the edge node's loop) makes a new `Session` after a backoff,
so a will with a new bdSeq can be set before every connect, as Sparkplug wants.

`connect()` maps each way a connection fails to a `Fault` with its reason: refused or unreachable
(CONNECTION), the TLS handshake (TLS), accepted but no CONNACK (TIMEOUT), CONNACK refusing us
(EXCEPTION_REPLY, e.g. bad user name or password).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from vbatt.drivers.aio import LinkError
from vbatt.drivers.faults import Fault

__all__ = ["Will", "Session", "tls_context", "LinkError"]

log = logging.getLogger("vbatt.mqtt")


def tls_context(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None) -> ssl.SSLContext:
    """A client context that trusts `ca` only and checks the broker's host name; a client certificate
    (mutual TLS) when `cert` and `key` are given. A missing or unreadable file names itself."""
    for p in (ca, cert, key):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"TLS file not found: {p}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{ca}: not a CA certificate ({getattr(exc, 'reason', None) or exc}); expected a "
                         f"PEM file") from None
    if cert is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as exc:
            raise ValueError(f"{cert} with key {key}: not a certificate and its key ({exc.reason or exc})") from None
    return ctx


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class Session:
    """One connection to the broker. `on_message(topic_bytes, payload_bytes)` runs in paho's thread."""

    def __init__(self, client_id: str, *, host: str, port: int, username: str | None, password: str | None,
                 tls: ssl.SSLContext | None, on_message: Callable[[bytes, bytes], None],
                 will: Will | None = None, keepalive_s: int = 10, connect_timeout_s: float = 5.0,
                 max_queued: int = 0):
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                        protocol=paho.MQTTv311, reconnect_on_failure=False)
        c.connect_timeout = connect_timeout_s
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set_context(tls)
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        c.max_inflight_messages_set(0)  # QoS 1 commands must not wait behind a window
        c.max_queued_messages_set(max_queued)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c
        self.handler = on_message
        self.lost = threading.Event()  # the session ended (connection lost, or closed by us)
        self.lost_reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connack: asyncio.Future | None = None
        self._subacks: dict[int, asyncio.Future] = {}
        self._early: dict[int, list[int]] = {}
        self._sublock = threading.Lock()
        self._started = False
        self.handler_errors = 0

    # -- paho's thread -------------------------------------------------------------------------------
    def _resolve(self, fut: asyncio.Future | None, value) -> None:
        if fut is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(value))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._resolve(self._connack, reason_code)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self.lost.is_set():
            self.lost_reason = f"connection to the broker {self.host}:{self.port} lost ({reason_code})"
        self.lost.set()
        self._resolve(self._connack, None)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        codes = [int(rc.value) for rc in reason_codes]
        with self._sublock:  # the SUBACK may come before subscribe() has noted its future
            fut = self._subacks.pop(mid, None)
            if fut is None:
                self._early[mid] = codes
        self._resolve(fut, codes)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.handler(msg._topic, msg.payload)  # the raw topic: no decode per message
        except Exception:  # a handler's bug must not end the network thread
            self.handler_errors += 1
            if self.handler_errors <= 3:
                log.exception("handler of %s failed", msg._topic)

    # -- asyncio side --------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the session; raises LinkError with the fault and the reason."""
        self._loop = asyncio.get_running_loop()
        self._connack = self._loop.create_future()
        try:
            await asyncio.to_thread(self.client.connect, self.host, self.port, self.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            raise LinkError(Fault.TLS, f"TLS: the broker {self.host}:{self.port} has a certificate we do not "
                                       f"trust ({exc.verify_message})") from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise LinkError(Fault.TLS, f"TLS handshake with the broker {self.host}:{self.port} failed "
                                       f"({exc})") from None
        except TimeoutError:
            raise LinkError(Fault.TIMEOUT, f"the broker {self.host}:{self.port} did not complete the "
                                           f"connection within {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise LinkError(Fault.CONNECTION, f"cannot connect to the broker {self.host}:{self.port} "
                                              f"({exc.strerror or exc})") from None
        self.client.loop_start()
        self._started = True
        try:
            rc = await asyncio.wait_for(self._connack, self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise LinkError(Fault.TIMEOUT, f"the broker {self.host}:{self.port} accepted the connection but "
                                           f"sent no CONNACK within {self.connect_timeout_s:g} s") from None
        if rc is None:
            raise LinkError(Fault.CONNECTION, f"the broker {self.host}:{self.port} closed the connection before "
                                              f"its CONNACK")
        if rc.is_failure:
            raise LinkError(Fault.EXCEPTION_REPLY, f"the broker {self.host}:{self.port} refused the connection: "
                                                   f"{rc}")

    async def subscribe(self, topics: list[tuple[str, int]], timeout_s: float = 5.0) -> None:
        """Subscribe and wait for the SUBACK; a filter the broker refuses (its ACL) is EXCEPTION_REPLY."""
        fut = self._loop.create_future()
        with self._sublock:
            rc, mid = self.client.subscribe(topics)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise LinkError(Fault.CONNECTION, f"subscribe failed: {paho.error_string(rc)}")
            if mid in self._early:
                fut.set_result(self._early.pop(mid))
            else:
                self._subacks[mid] = fut
        try:
            codes = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise LinkError(Fault.TIMEOUT, f"no SUBACK within {timeout_s:g} s") from None
        bad = [t for (t, _), c in zip(topics, codes) if c >= 0x80]
        if bad:
            raise LinkError(Fault.EXCEPTION_REPLY, f"the broker refused the subscription(s) {bad} (not allowed "
                                                   f"by its ACL?)")

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message (any thread); False when the session is gone."""
        if self.lost.is_set():
            return False
        return self.client.publish(topic, payload, qos, retain).rc == paho.MQTT_ERR_SUCCESS

    @property
    def connected(self) -> bool:
        return self._started and not self.lost.is_set() and self.client.is_connected()

    def close(self, clean: bool = True) -> None:
        """End the session; clean: a DISCONNECT (the broker then drops our will), else just the socket."""
        if not self._started:
            try:
                self.client.socket() and self.client.socket().close()
            except OSError:
                pass
            self.lost.set()
            return
        self._started = False
        if not self.lost.is_set():
            self.lost_reason = "closed"
        self.lost.set()
        if clean:
            self.client.disconnect()
        else:
            s = self.client.socket()
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        self.client.loop_stop()
