"""Several sessions on one secure channel, each request served as the session its token names.

OPC UA lets a client open several sessions on one secure channel (Part 4, 5.7.2.1),
each with its own user; every request names its session by the AuthenticationToken
of its header, and the server shall check that this session belongs to the channel.
Stock asyncua's `UaProcessor` keeps one session per connection and ignores the token:
a second CreateSession replaced the first, so a viewer session's calls ran with the
rights of the operator session opened after it, and closing either closed "the" session.

Here the connection's processor (`ChannelProcessor`) only decrypts and routes. Each
session gets its own stock `UaProcessor` (a lane) that shares the channel's
`SecureConnection` (keys, sequence numbers) and transport, and keeps what stock
asyncua keeps per connection: the session and its user, the queue of Publish
requests, the subscriptions' callbacks, the inactivity watchdog. A request with a
token that is not a live session of this channel is refused with BadSessionIdInvalid.
ActivateSession with the token of a session of another (lost) channel still moves the
session here, as stock asyncua does (Part 4, 6.7), after its signature and user token
are checked again.
"""

from __future__ import annotations

import asyncio
import logging

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.server import binary_server_asyncio as _bsa
from asyncua.server.internal_session import SessionState
from asyncua.server.uaprocessor import UaProcessor

__all__ = ["ChannelProcessor", "install"]

log = logging.getLogger("vbatt.opcua.sessions")
_FLAG = "vbatt_sessions_per_request"
_stock_processor = _bsa.UaProcessor


def _type(name: str) -> ua.NodeId:
    return ua.NodeId(getattr(ua.ObjectIds, f"{name}Request_Encoding_DefaultBinary"))


_CREATE, _ACTIVATE, _CLOSE = _type("CreateSession"), _type("ActivateSession"), _type("CloseSession")
# Services without a session: the channel itself answers them.
_CHANNEL = {_type(n) for n in ("GetEndpoints", "FindServers", "RegisterServer", "RegisterServer2",
                               "CloseSecureChannel")}


class ChannelProcessor(UaProcessor):
    """One per connection: routes each request to the lane of the session its token names."""

    max_sessions = 16  # per channel: a client cannot pile up sessions on one connection

    def __init__(self, iserver, transport, limits):
        self._lanes: dict[ua.NodeId, UaProcessor] = {}
        super().__init__(iserver, transport, limits)

    # The stock protocol asks `processor.session` whether the client activated a session in time
    # (and prints it); any live session of the channel answers that.
    @property
    def session(self):
        live = [lane.session for lane in self._lanes.values() if self._owns(lane)]
        return next((s for s in live if s.is_activated()), live[0] if live else None)

    @session.setter
    def session(self, value) -> None:  # set to None by UaProcessor.__init__; sessions live in the lanes
        pass

    def _new_lane(self) -> UaProcessor:
        lane = _stock_processor(self.iserver, self._transport, self._limits)
        lane._connection = self._connection  # one secure channel: the same keys and sequence numbers
        return lane

    @staticmethod
    def _owns(lane: UaProcessor) -> bool:
        s = lane.session
        return s is not None and s.state is not SessionState.Closed and getattr(s, "vbatt_lane", None) is lane

    def _claim(self, lane: UaProcessor) -> None:
        lane.session.vbatt_lane = lane
        self._lanes[lane.session.auth_token] = lane

    def _retire(self, lane: UaProcessor, code: int | None = None) -> None:
        """Stop a lane's watchdog; answer its waiting Publish requests with `code` (the session is over)."""
        lane._closing = True
        task = lane._session_watchdog_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        while code is not None and lane._publish_requests:
            req = lane._publish_requests.popleft()
            fault = ua.ServiceFault()
            fault.ResponseHeader.ServiceResult = ua.StatusCode(code)
            lane.send_response(req.requesthdr.RequestHandle, req.seqhdr, fault)

    def _prune(self) -> None:
        """Forget lanes whose session timed out, was closed, or was taken over by another channel."""
        for token, lane in list(self._lanes.items()):
            if not self._owns(lane):
                del self._lanes[token]
                self._retire(lane, ua.StatusCodes.BadSessionClosed)

    def _rebind_subscriptions(self, session, lane: UaProcessor) -> None:
        for sub in self.iserver.subscription_service.subscriptions.values():
            if sub.session_id == session.session_id:
                sub.pub_result_callback = lane.forward_publish_response
                sub.pub_request_callback = lane.get_publish_request

    async def _process_message(self, typeid, requesthdr, seqhdr, body):
        if typeid in _CHANNEL:
            return await super()._process_message(typeid, requesthdr, seqhdr, body)
        self._prune()
        if typeid == _CREATE:
            return await self._create(typeid, requesthdr, seqhdr, body)
        token = requesthdr.AuthenticationToken
        lane = self._lanes.get(token)
        if lane is None and typeid == _ACTIVATE:
            return await self._take_over(typeid, requesthdr, seqhdr, body)
        if lane is None:
            log.info("request for session %s, which is not a session of this channel", token)
            raise ServiceError(ua.StatusCodes.BadSessionIdInvalid)
        result = await lane._process_message(typeid, requesthdr, seqhdr, body)
        if typeid == _CLOSE:
            self._lanes.pop(token, None)
            self._retire(lane, ua.StatusCodes.BadSessionClosed)
        return result

    async def _create(self, typeid, requesthdr, seqhdr, body):
        if len(self._lanes) >= self.max_sessions:
            log.warning("CreateSession refused: %d sessions already on this channel", len(self._lanes))
            raise ServiceError(ua.StatusCodes.BadTooManySessions)
        lane = self._new_lane()
        try:
            result = await lane._process_message(typeid, requesthdr, seqhdr, body)
        except Exception:
            # Refused after the session was registered (e.g. an untrusted certificate): unregister it.
            if lane.session is not None:
                await lane.session.close_session(True)
            self._retire(lane)
            raise
        self._claim(lane)
        return result

    async def _take_over(self, typeid, requesthdr, seqhdr, body):
        """ActivateSession of a session this channel does not have: the stock reconnect (Part 4, 6.7)."""
        lane = self._new_lane()
        existing = self.iserver.lookup_external_session(requesthdr.AuthenticationToken)
        owner = getattr(existing, "vbatt_lane", None)
        try:
            result = await lane._process_message(typeid, requesthdr, seqhdr, body)
        except BaseException:
            # The stock code moves the subscriptions before it checks the signature and the user:
            # a refused takeover gives them back to the channel that still owns the session.
            if existing is not None and owner is not None:
                self._rebind_subscriptions(existing, owner)
            self._retire(lane)
            raise
        self._claim(lane)
        return result

    async def close(self):
        """The connection is lost: each session as stock asyncua treats its only one (kept with subscriptions)."""
        self._closing = True
        for lane in list(self._lanes.values()):
            if self._owns(lane):
                await lane.close()
            else:
                self._retire(lane)
        self._lanes.clear()


def _processor(iserver, transport, limits):
    cls = ChannelProcessor if getattr(iserver, _FLAG, False) else _stock_processor
    return cls(iserver, transport, limits)


def install(iserver) -> None:
    """Serve this internal server's connections with `ChannelProcessor` (other servers keep the stock one).

    asyncua makes each connection's processor in `OPCUAProtocol.connection_made` from the
    module's `UaProcessor` name, with no hook per server: that name becomes a factory that
    looks at the server."""
    setattr(iserver, _FLAG, True)
    _bsa.UaProcessor = _processor
