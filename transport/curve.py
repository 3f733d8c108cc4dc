"""CURVE keys, the host's ZAP authenticator and the :class:`Security` hooks (DESIGN §7).

Key files are the format pyzmq's ``zmq.auth`` reads and writes (ZPL
certificates): ``NAME.key`` holds the public key, ``NAME.key_secret`` the
pair.  A key's **identity** is its NAME.  ``mmn keygen DIR`` lays out::

    DIR/host/host.key(_secret)      the host's server pair (everyone needs host.key)
    DIR/admin/admin.key(_secret)    operators (mmn CLI, mmn up, healthchecks)
    DIR/nodes/NAME.key(_secret)     nodes, one per name or per kind

Secret files are written mode 0600 inside a 0700 directory (pyzmq's
``create_certificates`` leaves them world-readable; we create them in a
private temporary directory, fix the mode, then move them in place).

The host accepts, per channel, only the public keys of one directory:
node channel <- ``nodes/``, admin channel and event stream <- ``admin/``.
So a node key gets nothing at all from the admin endpoint (ZAP refusal).

Two traps this module avoids:

* a CURVE server whose context has no ZAP handler accepts *any* client key:
  :class:`HostAuth` starts pyzmq's ``ThreadAuthenticator`` on the host's own
  context before any socket binds, and every server socket also sets
  ``ZAP_ENFORCE_DOMAIN`` so a missing handler fails closed;
* ``zmq.auth.asyncio.AsyncioAuthenticator`` needs an asyncio loop and hangs
  under trio: the thread authenticator is used instead.

The authenticator reports a key's identity as the connection's ZAP
``User-Id``; the host reads it per message (``ZSocket(..., user_ids=True)``)
and never believes a name a message claims.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from protocol.types import name_matches_key  # re-exported: the rule lives with the wire contract

log = logging.getLogger(__name__)

HOST_KEY_NAME = "host"
ADMIN_KEY_NAME = "admin"
DEFAULT_NODE_KEYS = ("kvm", "gru", "xpmem")

#: ZAP domains of the host's three sockets.
DOMAIN_NODE = "mmn-node"
DOMAIN_ADMIN = "mmn-admin"
DOMAIN_EVENTS = "mmn-events"

__all__ = [
    "ADMIN_KEY_NAME",
    "CurveClient",
    "CurveServer",
    "HostAuth",
    "KeyError_",
    "KeyLayout",
    "keygen",
    "load_public_keys",
    "load_secret",
    "name_matches_key",
]


class KeyError_(Exception):  # noqa: N801 - KeyError is a builtin
    """A key file or directory is missing or malformed (one line for people)."""


# --------------------------------------------------------------------------
# files


@dataclass(frozen=True)
class KeyLayout:
    """Where the files of one ``mmn keygen DIR`` are."""

    root: Path

    @property
    def host_dir(self) -> Path:
        return self.root / "host"

    @property
    def admin_dir(self) -> Path:
        return self.root / "admin"

    @property
    def nodes_dir(self) -> Path:
        return self.root / "nodes"

    @property
    def host_public(self) -> Path:
        return self.host_dir / f"{HOST_KEY_NAME}.key"

    @property
    def host_secret(self) -> Path:
        return self.host_dir / f"{HOST_KEY_NAME}.key_secret"

    def admin_secret(self, name: str = ADMIN_KEY_NAME) -> Path:
        return self.admin_dir / f"{name}.key_secret"

    def node_secret(self, name: str, kind: str | None = None) -> Path:
        """``nodes/NAME.key_secret``, else ``nodes/KIND.key_secret`` (a key
        shared by every node of a kind, e.g. scaled containers)."""
        exact = self.nodes_dir / f"{name}.key_secret"
        if exact.exists() or kind is None:
            return exact
        shared = self.nodes_dir / f"{kind}.key_secret"
        return shared if shared.exists() else exact


def _write_pair(directory: Path, name: str) -> None:
    """Create ``name.key`` (0644) and ``name.key_secret`` (0600) in ``directory``
    without the secret ever being readable by others."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    scratch = Path(tempfile.mkdtemp(prefix=".keygen-", dir=directory))  # 0700
    try:
        public, secret = zmq.auth.create_certificates(str(scratch), name)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        os.replace(secret, directory / f"{name}.key_secret")
        os.replace(public, directory / f"{name}.key")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def keygen(
    root: str | os.PathLike[str],
    nodes: tuple[str, ...] | list[str] = DEFAULT_NODE_KEYS,
    admins: tuple[str, ...] | list[str] = (ADMIN_KEY_NAME,),
    *,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Write the host pair, ``admins`` and ``nodes`` under ``root``.

    Existing pairs are kept unless ``overwrite`` (so ``mmn up`` can add the
    keys of new nodes to a directory whose host key the nodes already know).

    Returns:
        ``{"created": [paths of new secret files], "kept": [...]}``.
    Raises:
        KeyError_: a name that cannot be a file name.
    """
    layout = KeyLayout(Path(root))
    layout.root.mkdir(parents=True, exist_ok=True)
    os.chmod(layout.root, 0o700)
    created: list[str] = []
    kept: list[str] = []
    wanted = [(layout.host_dir, HOST_KEY_NAME)]
    wanted += [(layout.admin_dir, n) for n in admins] + [(layout.nodes_dir, n) for n in nodes]
    # Every directory the host loads exists, even with no key in it: a host
    # started with no nodes (``mmn up --kvm 0 --gru 0 --xpmem 0``) accepts none.
    for directory in (layout.host_dir, layout.admin_dir, layout.nodes_dir):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
    for directory, name in wanted:
        if not name or "/" in name or name.startswith(".") or any(c.isspace() for c in name):
            raise KeyError_(f"{name!r} cannot name a key")
        secret = directory / f"{name}.key_secret"
        if secret.exists() and (directory / f"{name}.key").exists() and not overwrite:
            kept.append(str(secret))
            continue
        _write_pair(directory, name)
        created.append(str(secret))
    return {"created": created, "kept": kept}


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys from a ``.key_secret`` file.

    Warns when the file is readable by group or others.
    Raises:
        KeyError_: missing, unreadable or not a secret key file.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"secret key {p}: {exc}") from None
    if not secret:
        raise KeyError_(f"{p} holds no secret key (a .key_secret file is needed)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret key %s is readable by others (mode %o): chmod 600 it", p, stat.S_IMODE(mode))
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key of a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"public key {path}: {exc}") from None
    return public


def load_public_keys(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """Every ``NAME.key`` in ``directory``: raw 32-byte public key -> NAME.

    Raises:
        KeyError_: not a directory, or a malformed key file.
    """
    d = Path(directory)
    if not d.is_dir():
        raise KeyError_(f"key directory {d} does not exist")
    out: dict[bytes, str] = {}
    for f in sorted(d.glob("*.key")):
        out[zmq.utils.z85.decode(load_public(f))] = f.stem
    return out


# --------------------------------------------------------------------------
# Security hooks for transport.bind / connect


class CurveServer:
    """``configure_server``: a CURVE server in ZAP ``domain``, failing closed."""

    def __init__(self, public: bytes, secret: bytes, domain: str) -> None:
        self.public = public
        self.secret = secret
        self.domain = domain

    def configure_server(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def configure_client(self, sock: zmq.Socket[Any]) -> None:  # pragma: no cover - not a client
        raise TypeError("a CurveServer only binds")


class CurveClient:
    """``configure_client``: our key pair and the host's public key."""

    def __init__(self, public: bytes, secret: bytes, server_public: bytes) -> None:
        self.public = public
        self.secret = secret
        self.server_public = server_public

    @classmethod
    def from_files(cls, secret_file: str | os.PathLike[str], server_key_file: str | os.PathLike[str]) -> CurveClient:
        public, secret = load_secret(secret_file)
        return cls(public, secret, load_public(server_key_file))

    def configure_client(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def configure_server(self, sock: zmq.Socket[Any]) -> None:  # pragma: no cover - not a server
        raise TypeError("a CurveClient only connects")


# --------------------------------------------------------------------------
# the host's authenticator


class _Authenticator(ThreadAuthenticator):
    """ZAP in a thread: a key is allowed in a domain iff its file is in that
    domain's directory; the ZAP User-Id is the key's identity (file name)."""

    def __init__(self, context: zmq.Context[Any], keys: dict[str, dict[bytes, str]]) -> None:
        super().__init__(context=context, log=logging.getLogger("mmn.zap"))
        self._keys = keys
        self._identity = ""

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        name = self._keys.get(domain, {}).get(client_key)
        if name is None:
            log.info("ZAP: refused an unknown key in %s", domain)
            return False, b"Unknown key"
        self._identity = name
        return True, b"OK"

    def curve_user_id(self, client_public_key: bytes) -> str:
        # Called right after a successful _authenticate_curve, in the same thread.
        return self._identity


class HostAuth:
    """The host's CURVE setup: its own context with a ZAP handler, and one
    :class:`CurveServer` per channel.

    ``with HostAuth(server_secret, node_keys_dir, admin_keys_dir) as auth:``
    then bind with ``context=auth.context, security=auth.server(DOMAIN_NODE)``.
    Leaving the block stops the authenticator and destroys the context (close
    the sockets first).
    """

    def __init__(
        self,
        server_secret: str | os.PathLike[str],
        node_keys: str | os.PathLike[str],
        admin_keys: str | os.PathLike[str],
    ) -> None:
        self.public, self.secret = load_secret(server_secret)
        self.node_keys = load_public_keys(node_keys)
        self.admin_keys = load_public_keys(admin_keys)
        if not self.admin_keys:
            log.warning("no admin keys in %s: nobody can use the admin endpoint", admin_keys)
        self.context: zmq.Context[Any] = zmq.Context()
        self._auth: _Authenticator | None = None

    def start(self) -> HostAuth:
        keys = {DOMAIN_NODE: self.node_keys, DOMAIN_ADMIN: self.admin_keys, DOMAIN_EVENTS: self.admin_keys}
        self._auth = _Authenticator(self.context, keys)
        self._auth.start()
        return self

    def server(self, domain: str) -> CurveServer:
        if self._auth is None:
            raise RuntimeError("start the authenticator before binding (or any key gets in)")
        return CurveServer(self.public, self.secret, domain)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.context.destroy(linger=0)

    def __enter__(self) -> HostAuth:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
