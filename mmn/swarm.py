"""``mmn swarm-secrets``: the CURVE keys of docker-stack.yml as Docker secrets.

Swarm has no one-shot keygen service (it would restart it forever) and a
stack cannot wait for one, so the keys exist before the stack: this command
makes them (``mmn keygen`` into a private temporary directory, removed
afterwards, unless ``--keys DIR`` names a directory to keep them in or take
them from) and creates one secret per key file with ``docker secret create``,
on a manager of the swarm::

    PREFIX-host.key_secret   PREFIX-host.key      the host's pair
    PREFIX-admin.key_secret  PREFIX-admin.key     the operators' pair (CLI, healthcheck)
    PREFIX-KIND.key_secret   PREFIX-KIND.key      one pair per node kind (kvm, gru, xpmem, hmm)

PREFIX is ``--prefix`` (``mmn``), the stack's ``$MMN_SECRETS``.  Which
service mounts which secret is docker-stack.yml's business: the host gets its
pair, the admin pair and the nodes' public keys; a node its kind's pair's
secret and the host's public key.

Secrets cannot be changed, so a complete set is kept as it is (run it again
freely); with none there, all are made; a partial set is an error unless
``--keys DIR`` holds the keys it was made from (the missing ones are then
added from DIR).  ``--remove`` removes the set (Docker refuses while a
service uses a secret: ``docker stack rm`` first).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import render
from .client import EXIT_OK, Failed, UsageError

DEFAULT_PREFIX = "mmn"
#: The key files of a ``mmn keygen`` directory that the stack uses, in order.
KINDS = ("kvm", "gru", "xpmem", "hmm")
KEY_FILES: tuple[str, ...] = (
    "host/host.key_secret",
    "host/host.key",
    "admin/admin.key_secret",
    "admin/admin.key",
    *(f"nodes/{kind}.{ext}" for kind in KINDS for ext in ("key_secret", "key")),
)
#: Docker's rule for object names, and its length limit for secrets.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME_MAX = 64
LABEL = "org.mmnotify.key"


def secret_names(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """``{secret name: key file relative to a keygen directory}``.

    Raises:
        ValueError: the prefix cannot start a Docker secret name.
    """
    names = {f"{prefix}-{Path(rel).name}": rel for rel in KEY_FILES}
    for name in names:
        if not _NAME.match(name) or len(name) > _NAME_MAX:
            raise ValueError(f"{prefix!r} cannot prefix a Docker secret name ({name!r})")
    return names


def plan(names: dict[str, str], existing: set[str], have_dir: bool) -> tuple[list[str], list[str]]:
    """``(to create, kept)`` for a set of secret names of which ``existing``
    are there already.

    Raises:
        ValueError: a partial set without the directory its keys came from
            (new keys would not match the secrets already there).
    """
    kept = [n for n in names if n in existing]
    missing = [n for n in names if n not in existing]
    if kept and missing and not have_dir:
        raise ValueError(
            f"only some of the secrets exist ({', '.join(kept)}); new keys would not match them: "
            f"pass --keys DIR with the keys they were made from, or remove them first "
            f"(mmn swarm-secrets --remove, after docker stack rm)")
    return missing, kept


class Docker:
    """The ``docker`` CLI, for secrets."""

    def __init__(self, command: Sequence[str] = ("docker",)) -> None:
        self.command = list(command)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise RuntimeError(f"{self.command[0]}: not found (Docker's CLI is needed)") from None
        if proc.returncode != 0:
            err = " ".join(proc.stderr.split()) or f"exit {proc.returncode}"
            if "not a swarm manager" in err or "swarm mode" in err:
                err += " (run it on a manager of the swarm: docker swarm init, or docker swarm join as a manager)"
            raise RuntimeError(f"docker {args[0]} {args[1]}: {err}")
        return proc

    def secrets(self) -> set[str]:
        out = self._run("secret", "ls", "--format", "{{.Name}}").stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def create(self, name: str, path: Path, label: str) -> None:
        self._run("secret", "create", "--label", f"{LABEL}={label}", name, str(path))

    def remove(self, names: Sequence[str]) -> None:
        if names:
            self._run("secret", "rm", *names)


def create_secrets(prefix: str = DEFAULT_PREFIX, keys: str | None = None,
                   docker: Docker | None = None) -> dict[str, Any]:
    """Make the set (see the module doc).  Returns ``{"created": [...],
    "kept": [...], "keys": DIR or None}``.

    Raises:
        ValueError: a bad prefix, or a partial set without ``keys``.
        RuntimeError: docker failed (not a manager, no engine ...).
    """
    from transport.curve import ADMIN_KEY_NAME, keygen

    docker = docker or Docker()
    names = secret_names(prefix)
    to_create, kept = plan(names, docker.secrets(), keys is not None)
    if not to_create:
        return {"created": [], "kept": kept, "keys": keys}
    scratch = None if keys is not None else tempfile.mkdtemp(prefix="mmn-swarm-keys-")
    root = Path(keys if keys is not None else scratch)  # type: ignore[arg-type]
    try:
        keygen(root, KINDS, (ADMIN_KEY_NAME,))  # keeps the pairs already in DIR
        created: list[str] = []
        try:
            for name in to_create:
                docker.create(name, root / names[name], names[name])
                created.append(name)
        except RuntimeError:
            if scratch is not None:  # keys nobody has any more: leave no partial set
                try:
                    docker.remove(created)
                except RuntimeError:
                    pass
            raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"created": created, "kept": kept, "keys": keys}


def remove_secrets(prefix: str = DEFAULT_PREFIX, docker: Docker | None = None) -> dict[str, Any]:
    """Remove the set's secrets that exist.  Returns ``{"removed": [...]}``."""
    docker = docker or Docker()
    names = secret_names(prefix)
    there = [n for n in names if n in docker.secrets()]
    docker.remove(there)
    return {"removed": there}


# --------------------------------------------------------------------------
# the command (registered by mmn.cli.build_parser)


def add_parser(subs: Any) -> None:
    p = subs.add_parser("swarm-secrets", help="the CURVE keys of docker-stack.yml as Docker secrets (on a manager)",
                        description="Make the CURVE keys of docker-stack.yml and create them as Docker secrets "
                                    "PREFIX-host.key_secret, PREFIX-host.key, PREFIX-admin.key_secret, ... "
                                    "(run it on a manager of the swarm, before docker stack deploy).")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="P",
                   help="secrets P-host.key_secret, ... (docker-stack.yml's $MMN_SECRETS; default mmn)")
    p.add_argument("--keys", default=argparse.SUPPRESS, metavar="DIR",
                   help="keep the keys in DIR (mmn keygen layout; pairs already there are used); "
                        "default: a temporary directory, removed (the keys then live only in the swarm)")
    p.add_argument("--remove", action="store_true", help="remove the secrets instead (after docker stack rm)")
    p.add_argument("--docker", default="docker", metavar="CMD", help="Docker's CLI (docker)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    p.set_defaults(handler=run)


def run(ns: argparse.Namespace) -> int:
    docker = Docker([ns.docker])
    keys = getattr(ns, "keys", None) if not ns.remove else None
    try:
        result = remove_secrets(ns.prefix, docker) if ns.remove else create_secrets(ns.prefix, keys, docker)
    except ValueError as exc:
        raise UsageError(f"swarm-secrets: {exc}") from None
    except RuntimeError as exc:
        raise Failed("docker", str(exc)) from None
    except OSError as exc:
        raise UsageError(f"swarm-secrets: {exc}") from None
    if getattr(ns, "json", False):
        render.emit_json(result)
    else:
        for key in ("created", "kept", "removed"):
            for name in result.get(key, []):
                render.emit(f"{key:<8}{name}")
        if result.get("created") and not result.get("keys"):
            render.emit("the keys exist only as these secrets (and in the host task): "
                  "mmn status through docker exec into it")
    return EXIT_OK
