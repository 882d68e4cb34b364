"""The stack's PostgreSQL cluster (``stack.database: postgres``): one local server holding two
databases, ``prefect`` (the Prefect server's) and ``mlflow`` (the registry's backend store).

Layout, in ``stack.postgres_dir`` (default ``.deltapatch/stack/postgres/``):

- ``data/`` — the cluster (``initdb``), owned by the user the server runs as;
- ``pgpass`` — the generated password, mode 0600, in libpq's password-file format. Clients get it
  through ``PGPASSFILE`` (asyncpg and psycopg2 both read it), so the password never appears in a URL,
  a command line or ``stack.json``.

The folder must be new, empty or such a cluster: a folder holding anything else (say
``stack.postgres_dir`` pointed at the project, whose ``data/`` is the datasets) is refused, never
cleared (:func:`check_folder`). Only a ``data/`` that deltapatch's own interrupted ``initdb`` left
(marked by ``initdb-in-progress``) is removed before trying again.

The server listens on ``stack.host`` (loopback by default) and ``stack.postgres_port`` only, with
no Unix socket (a socket path under a deep project folder can exceed the 107-byte limit). Authentication
is scram-sha-256 for every connection.

PostgreSQL refuses to run as root. When deltapatch runs as root (containers, CI), ``initdb`` and the
server run as the system user ``postgres`` through ``setpriv`` (which *execs*: the PID the stack
records is the postmaster itself, so `stack down` signals the server, not a wrapper), and the data
folder is owned by that user; it must be able to reach the folder (see :func:`check_reachable`).

:mod:`deltapatch.stack.lifecycle` starts the server like its other processes (:func:`server_command`) and stops
it last, with a *fast* shutdown (SIGINT: open sessions are ended, everything is flushed), after the
Prefect and MLflow servers that use it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltapatch.config import ConfigError, resolve_path, state_dir
from deltapatch.errors import DeltapatchError

USER = "deltapatch"  # the cluster's superuser, created by initdb
DATABASES = ("prefect", "mlflow")
SYSTEM_USER = "postgres"  # who runs the server when deltapatch runs as root
PASSFILE = "pgpass"
DATA = "data"
# Written before initdb runs and removed once it succeeded: a `data/` beside it is a half-made cluster
# of ours (interrupted initdb), which may be removed; any other non-cluster content is the user's.
INITDB_MARKER = "initdb-in-progress"
INITDB_SECRET = "initdb-password"
OWN_FILES = frozenset({PASSFILE, PASSFILE + ".tmp", INITDB_MARKER, INITDB_SECRET})
# Fast shutdown first (ends sessions, flushes, exits cleanly), immediate shutdown if that hangs.
STOP_SIGNALS = (signal.SIGINT, signal.SIGQUIT)
INSTALL_HINT = ("install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; `make test` does it), or "
                "keep stack.database: sqlite")


class PostgresError(DeltapatchError):
    """The local PostgreSQL cluster could not be set up, started or reached."""


@dataclass(frozen=True)
class Cluster:
    """Where the stack's cluster lives and listens."""

    folder: Path
    host: str
    port: int

    @property
    def data(self) -> Path:
        return self.folder / DATA

    @property
    def passfile(self) -> Path:
        return self.folder / PASSFILE

    def url(self, database: str, driver: str) -> str:
        """SQLAlchemy URL without the password (libpq/asyncpg read it from ``PGPASSFILE``)."""
        return f"postgresql+{driver}://{USER}@{self.host}:{self.port}/{database}"

    @property
    def prefect_url(self) -> str:
        return self.url("prefect", "asyncpg")

    @property
    def mlflow_url(self) -> str:
        # psycopg2 named explicitly: SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3.
        return self.url("mlflow", "psycopg2")

    @property
    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file()


def cluster(params: dict[str, Any], settings: Any) -> Cluster:
    """The cluster of a project; `settings` is its :class:`deltapatch.stack.StackSettings`."""
    folder = resolve_path(params, settings.postgres_dir) if settings.postgres_dir else state_dir(params) / "stack" / "postgres"
    return Cluster(folder.resolve(), settings.host, int(settings.postgres_port))


def client_env(c: Cluster) -> dict[str, str]:
    """What a process needs to log in: the password file (no password in any URL)."""
    return {"PGPASSFILE": str(c.passfile)}


# ------------------------------------------------------------------------------------- binaries


def bin_dir() -> Path:
    """The folder of ``initdb``/``postgres``: Debian's newest ``/usr/lib/postgresql/<v>/bin``, else the PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise PostgresError("stack.database is postgres but PostgreSQL is not installed (no initdb in "
                        "/usr/lib/postgresql/*/bin or on the PATH)", hint=INSTALL_HINT)


def _as_server_user() -> list[str]:
    """Prefix that runs a command as the user the server must run as (empty unless we are root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresError(f"PostgreSQL refuses to run as root and there is no `{SYSTEM_USER}` system user to run "
                            "it as", hint=INSTALL_HINT + " (the package creates that user)") from None
    setpriv = shutil.which("setpriv")
    if not setpriv:
        raise PostgresError("running as root, deltapatch needs `setpriv` (util-linux) to start PostgreSQL as "
                            f"the `{SYSTEM_USER}` user", hint="install util-linux, or run deltapatch as a normal user")
    return [setpriv, f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups", "--"]


def check_reachable(folder: Path) -> None:
    """As root, the ``postgres`` user must be able to enter every folder above the cluster.

    A private parent (mode 700: /root, pytest's temp folders) stops the server with "Permission
    denied" in its log; say which folder and the fix instead.
    """
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(SYSTEM_USER)
    groups = set(os.getgrouplist(SYSTEM_USER, user.pw_gid))
    for parent in [folder, *folder.parents]:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise PostgresError(
                f"PostgreSQL runs as the `{SYSTEM_USER}` user here (root may not run it), and that user cannot enter "
                f"{parent} (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}), "
                f"a parent of the cluster folder {folder}",
                hint=f"allow it to pass through (`chmod o+x {parent}`), or set stack.postgres_dir in params.yaml to a "
                     "folder it can reach")


# ------------------------------------------------------------------------------------- lifecycle


def check_folder(c: Cluster) -> None:
    """Refuse a cluster folder that is not new, empty, a cluster, or a cluster of ours that initdb
    left half-made: its content belongs to someone else (never delete user files)."""
    if c.initialised or not c.folder.exists():
        return
    if not c.folder.is_dir():
        raise ConfigError(f"stack.postgres_dir: {c.folder} is not a folder",
                          hint="set stack.postgres_dir in params.yaml to a new or empty folder, or leave it empty "
                               "for the default .deltapatch/stack/postgres")
    ours = set(OWN_FILES)
    if (c.folder / INITDB_MARKER).is_file() or (c.data.is_dir() and not any(c.data.iterdir())):
        ours.add(DATA)  # a half-made cluster of ours (interrupted initdb), or an empty folder
    foreign = sorted(entry.name for entry in c.folder.iterdir() if entry.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" … and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"stack.postgres_dir: {c.folder} is not empty and holds no PostgreSQL cluster ({c.data / 'PG_VERSION'} "
            f"is missing); it holds {shown}. deltapatch creates its cluster in {c.data} and will not delete or "
            "mix with files it did not make",
            hint="set stack.postgres_dir in params.yaml to a new or empty folder (or leave it empty for the default "
                 ".deltapatch/stack/postgres)")


def prepare(c: Cluster) -> bool:
    """Create the cluster once (``initdb`` with a generated password); True when it was created now.

    A folder holding anything but a cluster (or our own half-made one) is refused first, untouched
    (:func:`check_folder`)."""
    check_folder(c)
    binaries = bin_dir()
    _driver()  # before initdb: a cluster nobody can log in to is no use
    check_reachable(c.folder)
    if c.initialised:
        if not c.passfile.is_file():
            raise PostgresError(f"the PostgreSQL cluster {c.data} exists but its password file {c.passfile} is gone",
                                hint=f"stop the stack and remove {c.folder} to start over (its registry and flow "
                                     "history are lost), or restore the file")
        _write_passfile(c, _password_of(c))  # host/port may have changed in params.yaml
        return False
    runner = _as_server_user()
    c.folder.mkdir(parents=True, exist_ok=True)
    c.folder.chmod(0o711)  # enterable by the server's user, not listable
    marker = c.folder / INITDB_MARKER
    if c.data.exists():  # check_folder allowed it: ours, from an interrupted initdb (no PG_VERSION), or empty
        shutil.rmtree(c.data)
    marker.write_text("initdb of this cluster started; a data/ folder beside this file is half-made\n")
    c.data.mkdir(mode=0o700)
    password = secrets.token_urlsafe(24)
    secret = c.folder / INITDB_SECRET  # read by initdb only, then removed
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    if runner:
        server_user = pwd.getpwnam(SYSTEM_USER)
        for path in (c.data, secret):
            os.chown(path, server_user.pw_uid, server_user.pw_gid)
    try:
        proc = subprocess.run([*runner, str(binaries / "initdb"), "-D", str(c.data), "-U", USER, "-A", "scram-sha-256",
                               f"--pwfile={secret}", "-E", "UTF8", "--no-instructions"],
                              capture_output=True, text=True, check=False)
    finally:
        secret.unlink(missing_ok=True)
    if proc.returncode != 0:
        shutil.rmtree(c.data, ignore_errors=True)
        marker.unlink(missing_ok=True)
        raise PostgresError(f"initdb failed for {c.data}: {(proc.stderr or proc.stdout).strip()[-600:]}")
    _write_passfile(c, password)
    marker.unlink()
    return True


def _password_of(c: Cluster) -> str:
    return c.passfile.read_text().strip().split("\n")[0].rsplit(":", 1)[1]


def _write_passfile(c: Cluster, password: str) -> None:
    """libpq's format ``host:port:database:user:password``; 0600 (libpq ignores a looser file)."""
    tmp = c.passfile.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_text(f"{c.host}:{c.port}:*:{USER}:{password}\n")
    tmp.replace(c.passfile)


def server_command(c: Cluster) -> list[str]:
    """The postmaster in the foreground (the stack records and signals its PID)."""
    return [*_as_server_user(), str(bin_dir() / "postgres"), "-D", str(c.data), "-p", str(c.port),
            "-c", f"listen_addresses={c.host}", "-c", "unix_socket_directories="]


def _driver() -> Any:
    """psycopg2, MLflow's PostgreSQL driver (Prefect's, asyncpg, comes with Prefect)."""
    try:
        import psycopg2  # lazy: optional driver (extra `postgres`), needed only with stack.database: postgres
    except ImportError:
        raise PostgresError("stack.database is postgres but the psycopg2 driver is not installed",
                            hint="pip install 'deltapatch[postgres]' (psycopg2-binary)") from None
    return psycopg2


def _connect(c: Cluster, database: str = "postgres", timeout: int = 3) -> Any:
    return _driver().connect(host=c.host, port=c.port, user=USER, dbname=database, passfile=str(c.passfile),
                            connect_timeout=timeout)


def healthy(c: Cluster) -> bool:
    """The server accepts a login and answers a query."""
    psycopg2 = _driver()

    try:
        with _connect(c) as con, con.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)
    except psycopg2.Error:
        return False


def ensure_databases(c: Cluster) -> list[str]:
    """Create the ``prefect`` and ``mlflow`` databases when missing; returns those created."""
    psycopg2 = _driver()

    created = []
    try:
        con = _connect(c)
        con.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with con.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database")
                present = {row[0] for row in cur.fetchall()}
                for name in DATABASES:
                    if name not in present:
                        cur.execute(f'CREATE DATABASE "{name}"')
                        created.append(name)
        finally:
            con.close()
    except psycopg2.Error as exc:
        raise PostgresError(f"PostgreSQL at {c.host}:{c.port}: cannot create the databases {DATABASES}: "
                            f"{str(exc).strip()}") from None
    return created
