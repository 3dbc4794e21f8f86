"""amqtt 0.12 plugins that make the embedded broker enforce the Mosquitto password and ACL files.

Both plugins delegate every decision to `shared.credentials.BrokerCredentials`, which re-reads
the files when they change on disk, so `mro-edge devices add` takes effect without a restart.
They are loaded through the `plugins` section of the amqtt config (see services/broker/service.py),
which also replaces amqtt's default plugins (anonymous auth, $SYS, per-packet event logging).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from shared.credentials import BrokerCredentials

log = logging.getLogger(__name__)

_shared: dict[tuple[Path, str], BrokerCredentials] = {}


def credentials_for(broker_dir: str | Path, station: str) -> BrokerCredentials:
    """One BrokerCredentials per (dir, station) so both plugins share one parsed cache."""
    key = (Path(broker_dir).resolve(), station)
    if key not in _shared:
        _shared[key] = BrokerCredentials(key[0], station)
    return _shared[key]


@dataclass
class CredentialsConfig:
    broker_dir: str
    station: str


class PasswordFileAuthPlugin(BaseAuthPlugin):
    """CONNECT needs a user name and password that match the Mosquitto password file.

    A will message whose topic the user may not publish to is dropped at CONNECT (the client
    is still accepted), which is what Mosquitto 2.0 does: the ACL cannot be bypassed by
    dying with a will on someone else's topic.
    """

    Config = CredentialsConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.credentials = credentials_for(self.config.broker_dir, self.config.station)

    async def authenticate(self, *, session: Session) -> bool:
        username, password = session.username, session.password
        if not username or password is None or not self.credentials.check(username, password):
            log.info("refused CONNECT of client %r as user %r", session.client_id, username)
            return False
        if session.will_flag and not self.credentials.may_publish(
            username, session.will_topic or "", session.client_id
        ):
            log.warning("dropping will of %r on %r: not allowed by the ACL", username, session.will_topic)
            session.will_flag = False
            session.will_retain = False
        return True


class AclFileTopicPlugin(BaseTopicPlugin):
    """PUBLISH needs `write`, delivery (amqtt's RECEIVE) needs `read`, per the ACL file."""

    Config = CredentialsConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.credentials = credentials_for(self.config.broker_dir, self.config.station)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or not session.username or not topic:
            return False
        match action:
            case Action.PUBLISH:
                return self.credentials.may_publish(session.username, topic, session.client_id)
            case Action.RECEIVE:
                return self.credentials.may_receive(session.username, topic, session.client_id)
            case Action.SUBSCRIBE:
                return self.credentials.may_subscribe(session.username, topic, session.client_id)
        return False
