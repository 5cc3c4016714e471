"""Object-store storage (``s3://bucket/prefix``, ``gs://bucket/prefix``) through ``pyarrow.fs``: a
folder of this node (the staging folder) mirrored to a folder of the store. Reads and writes files
of both, and the staging folder's record of what was last synced (``.seld-mirror.json``); plain
pyarrow, no Ray. Run folders and study folders are written with file I/O in their staging folder and
pushed (files whose content changed, one object each, written whole; deletions) after every epoch
and at the end; a (re)started trial or study first pulls what the store holds. To free a node's
disk, delete a whole staging folder (its record goes with it), never single files: a file deleted
from a synced folder is deleted from the store by the next push.

The store is reached with the standard AWS variables (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for a non-AWS server, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` when set, else the
node's own credential chain, e.g. an instance role); Google Cloud Storage with its default
credentials. A :class:`Mirror` carries its filesystem object (and so any keys from the environment)
to the processes it is handed to, in memory: nothing is written to a file or a log.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from seld.errors import UserError

SCHEMES = ("s3", "gs")
# Seconds to connect / to wait on a request, and attempts per request: an unreachable endpoint is
# one clear error within seconds, not minutes of the SDK's default retries.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 120.0
MAX_ATTEMPTS = 3
STAGING_ENV = "SELD_STAGING_DIR"  # node-local root of the staging folders (default ~/.cache/seld/staging)
_CHUNK = 1 << 20
RECORD = ".seld-mirror.json"  # in a staging folder: what was last synced (hidden: never pushed)
RAY_STATE = "ray"  # a run folder's Ray Train storage (seld.runfolder.RAY_SUBDIR): never deleted by a push


def is_uri(value: str | os.PathLike | None) -> bool:
    """Whether ``value`` is a URI (``scheme://...``) rather than a filesystem path."""
    return value is not None and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(value)) is not None


def check_uri(uri: str, source: str = "--storage") -> str:
    """``uri`` without a trailing slash when it names a bucket of a supported store; else UserError
    (one line naming ``source`` and the URI)."""
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise UserError(f"{source} {uri}: unsupported storage URI scheme {parsed.scheme + '://'!r}; use a "
                        f"filesystem path every node mounts or {' / '.join(s + '://bucket/prefix' for s in SCHEMES)}")
    if not parsed.netloc or parsed.query or parsed.fragment or parsed.params:
        raise UserError(f"{source} {uri}: expected {parsed.scheme}://bucket/prefix (a bucket name, an "
                        "optional prefix, no query)")
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` (object-store keys use ``/``)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def staging_dir(uri: str) -> Path:
    """The default staging folder of ``uri`` on this node: ``$SELD_STAGING_DIR/<scheme>/<bucket>/<key>``
    (``~/.cache/seld/staging`` when the variable is unset)."""
    parsed = urlparse(check_uri(uri))
    root = Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "seld" / "staging")
    return root / parsed.scheme / parsed.netloc / parsed.path.strip("/")


def _s3_filesystem():
    """An S3 filesystem from the standard AWS environment variables (see the module docstring)."""
    import pyarrow.fs as pafs

    kwargs: dict = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS)}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=ep.netloc, scheme=ep.scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        kwargs["region"] = region or "us-east-1"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str):
    """``(pyarrow filesystem, path inside it)`` for a storage URI (``bucket/prefix``)."""
    import pyarrow.fs as pafs

    parsed = urlparse(check_uri(uri))
    path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    if parsed.scheme == "s3":
        return _s3_filesystem(), path
    return pafs.GcsFileSystem(), path


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return re.sub(r"\s+", " ", text[0] if text else type(e).__name__)[:300]


def _skipped(rel: str, skip: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    # Hidden files are the atomic writers' temporaries (seld.runfolder.temp_path), probes and the
    # mirror's own record (RECORD).
    return name.startswith(".") or name.endswith(".tmp") or any(fnmatch.fnmatch(rel, p) for p in skip)


def _ray_state(rel: str) -> bool:
    """Whether ``rel`` lies in a ``ray/`` folder: Ray Train writes its resume states to the store
    itself (``storage_path``), so a staging folder never holds them and a push never deletes them."""
    return rel.startswith(f"{RAY_STATE}/") or f"/{RAY_STATE}/" in rel


def _local_stat(path: Path) -> list[int] | None:
    """What identifies a local file's content without reading it: size, mtime, ctime (which no
    program can set back, so a rewrite that restores the mtime still shows) and inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Mirror:
    """A staging folder (``local``, on this node) mirrored to a storage URI (``uri``).

    Files are equal when their content is: a local file by its SHA-256, an object by its ETag (the
    store changes it with every write; S3's timestamps have one-second resolution and the nodes'
    clocks may disagree, so times decide nothing). What was last synced, per relative path (the
    local file's SHA-256 and stat, the object's ETag), is recorded in the staging folder
    (``RECORD``, a hidden file: never pushed), so every process on this node shares it.

    * :meth:`push` makes the store equal the staging folder: it uploads each file whose content
      differs from what was last synced, and deletes each object whose local file was deleted since
      it was synced, unless the object changed since (another writer's) or lies in a ``ray/``
      folder (Ray's resume states, which Ray writes to the store itself).
    * :meth:`pull` makes the staging folder equal the store: it downloads each object that changed
      since it was synced (or was never synced and differs), and deletes each local file whose
      object was deleted, unless the local file changed since (a pending push).

    Only what this node synced is ever deleted, so several writers (a trial's driver, Train's rank
    0 and controller, possibly on other nodes) can share a folder. Picklable: handed to trials and
    Train workers, it carries its filesystem (endpoint, region and any keys from the environment
    where it was made) in memory; the record stays with each node's staging folder.

    Attributes:
        local: the staging folder.
        uri: ``s3://bucket/prefix/...`` or ``gs://...``, with a prefix (a mirror never owns a bucket's root).
    """

    local: Path
    uri: str
    fs: object = field(default=None, repr=False)
    root: str = ""  # the uri as a path of ``fs`` (bucket/prefix); derived from ``uri`` when ``fs`` is None

    def __post_init__(self) -> None:
        self.local = Path(self.local)
        self.uri = check_uri(self.uri, "Mirror")
        if self.fs is None:
            self.fs, self.root = filesystem(self.uri)
        if "/" not in self.root.strip("/"):
            raise UserError(f"Mirror {self.uri}: no folder under the bucket (root {self.root!r}); a mirror "
                            "pushes and deletes only under bucket/prefix, never at a bucket's root")

    def child(self, name: str) -> Mirror:
        """The mirror of the subfolder ``name`` (same filesystem)."""
        return Mirror(self.local / name, join(self.uri, name), self.fs, f"{self.root}/{name}")

    def path(self, *parts: str) -> str:
        """``parts`` under the mirror's root, as a path of its filesystem (for Ray's storage_path)."""
        return "/".join([self.root, *parts])

    def check(self, write: bool = True) -> None:
        """Reach the store before anything runs: list the folder (and with ``write``, write and
        delete a probe object). UserError naming the URI (bucket missing, endpoint unreachable,
        credentials missing or refused) otherwise."""
        import pyarrow.fs as pafs

        bucket = self.root.split("/", 1)[0]
        try:
            if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise UserError(f"{self.uri}: bucket {bucket!r} not found (create it first, or check "
                                "AWS_ENDPOINT_URL / the project)")
            self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
            if write:
                probe = f"{self.root}/.seld-probe-{os.getpid()}"
                with self.fs.open_output_stream(probe) as f:
                    f.write(b"probe\n")
                self.fs.delete_file(probe)
        except UserError:
            raise
        except (OSError, ValueError, RuntimeError) as e:  # pyarrow reports SDK errors as OSError
            what = "write to" if write else "read"
            raise UserError(f"{self.uri}: cannot {what} the storage (endpoint unreachable, credentials "
                            f"missing or refused?): {_one_line(e)}") from None

    def remote_files(self) -> dict[str, tuple[int, float]]:
        """relative path -> (size, mtime seconds or 0) of every object under the mirror's root."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        n = len(self.root) + 1
        return {i.path[n:]: (i.size, i.mtime.timestamp() if i.mtime else 0.0)
                for i in infos if i.type == pafs.FileType.File}

    def etag(self, rel: str) -> str | None:
        """The object's ETag (its content's identity in the store), or None when there is no object.

        A store whose objects carry no ETag falls back to size and modification time (then equal
        sizes written within one second look alike)."""
        try:
            with self.fs.open_input_file(f"{self.root}/{rel}") as f:
                meta = {k.lower(): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f.metadata().items()}
        except FileNotFoundError:
            return None
        except OSError:
            if rel not in self.remote_files():
                return None
            raise
        return meta.get("etag") or f"{meta.get('content-length')}@{meta.get('last-modified')}"

    # --- The record of what was last synced (this node's, in the staging folder) -----------------------
    def _read_record(self) -> dict[str, dict]:
        try:
            data = json.loads((self.local / RECORD).read_text())
        except (OSError, ValueError):
            return {}
        return data.get("files", {}) if data.get("uri") == self.uri else {}

    def _write_record(self, changed: dict[str, dict | None]) -> None:
        """Merge this operation's entries (None: forget) into the record on disk: another process
        may have recorded other files meanwhile. A lost entry costs a copy, never an update."""
        if not changed:
            return
        files = self._read_record()
        for rel, entry in changed.items():
            if entry is None:
                files.pop(rel, None)
            else:
                files[rel] = entry
        self.local.mkdir(parents=True, exist_ok=True)
        tmp = self.local / f"{RECORD}.{os.getpid()}-{threading.get_ident()}"
        tmp.write_text(json.dumps({"uri": self.uri, "files": files}, sort_keys=True))
        os.replace(tmp, self.local / RECORD)

    def _local_sha(self, rel: str, record: dict[str, dict]) -> str | None:
        """The local file's SHA-256 (from the record while its stat is unchanged), or None if absent."""
        stat = _local_stat(self.local / rel)
        if stat is None:
            return None
        entry = record.get(rel)
        if entry and entry.get("stat") == stat:
            return entry["sha256"]
        return _sha256(self.local / rel)

    def pull(self, skip: Sequence[str] = ()) -> list[str]:
        """Make the staging folder equal the store (see the class docstring): download each object
        that changed since it was last synced (each written under a temporary name, then renamed),
        delete each local file whose object was deleted since.

        Args:
            skip: ``fnmatch`` patterns of relative paths to leave alone (``runs/*/checkpoints/*``).
        Returns:
            The relative paths whose local content changed (downloaded or deleted).
        """
        record = self._read_record()
        remote = {rel for rel in self.remote_files() if not _skipped(rel, skip)}
        changed: dict[str, dict | None] = {}
        copied = []
        for rel in sorted(remote):
            etag = self.etag(rel)
            if etag is None:  # deleted since the listing
                continue
            entry = record.get(rel)
            if entry and entry.get("etag") == etag:
                continue  # unchanged in the store since it was synced: local edits are pending pushes
            dst = self.local / rel
            old = self._local_sha(rel, record)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.pull-{os.getpid()}")
            h = hashlib.sha256()
            try:
                with self.fs.open_input_stream(f"{self.root}/{rel}") as src, open(tmp, "wb") as f:
                    for chunk in iter(lambda src=src: src.read(_CHUNK), b""):
                        h.update(chunk)
                        f.write(chunk)
                if h.hexdigest() != old:
                    os.replace(tmp, dst)
                    copied.append(rel)
            finally:
                tmp.unlink(missing_ok=True)
            changed[rel] = {"sha256": h.hexdigest(), "etag": etag, "stat": _local_stat(dst)}
        for rel, entry in sorted(record.items()):
            if rel in remote or _skipped(rel, skip):
                continue
            if self._local_sha(rel, record) == entry.get("sha256"):
                (self.local / rel).unlink(missing_ok=True)  # deleted in the store; unchanged here
                copied.append(rel)
            changed[rel] = None
        self._write_record(changed)
        return copied

    def push(self, skip: Sequence[str] = (), only: Sequence[str] | None = None) -> list[str]:
        """Make the store equal the staging folder (see the class docstring): upload each file whose
        content changed since it was last synced (one object per file, written whole: readers never
        see half), delete each object whose local file was deleted since it was synced.

        Args:
            skip: ``fnmatch`` patterns of relative paths not to push (hidden files never are).
            only: when given, push only these relative paths (those that exist; those that do not
                are deleted in the store as above).
        Returns:
            The relative paths uploaded or deleted in the store.
        """
        record = self._read_record()
        if only is not None:
            rels = sorted(set(only))
        else:
            local = sorted(p.relative_to(self.local).as_posix() for p in self.local.rglob("*") if p.is_file()) \
                if self.local.is_dir() else []
            rels = sorted(set(local) | set(record))
        changed: dict[str, dict | None] = {}
        copied = []
        for rel in rels:
            if _skipped(rel, skip):
                continue
            src = self.local / rel
            try:
                sha = self._local_sha(rel, record)
                if sha is None:
                    if rel in record:
                        changed[rel] = None
                        if not _ray_state(rel) and self.etag(rel) == record[rel].get("etag"):
                            self.fs.delete_file(f"{self.root}/{rel}")  # deleted here since it was synced
                            copied.append(rel)
                    continue
                if record.get(rel, {}).get("sha256") == sha:
                    continue
                stat = _local_stat(src)
                h = hashlib.sha256()
                with open(src, "rb") as f, self.fs.open_output_stream(f"{self.root}/{rel}") as out:
                    for chunk in iter(lambda f=f: f.read(_CHUNK), b""):
                        h.update(chunk)
                        out.write(chunk)
            except FileNotFoundError:  # replaced or removed while we looked: the next push has it
                continue
            # What was uploaded is what was read (a file replaced meanwhile differs in stat or hash:
            # the next push sends it again).
            changed[rel] = {"sha256": h.hexdigest(), "etag": self.etag(rel),
                            "stat": stat if h.hexdigest() == sha else None}
            copied.append(rel)
        self._write_record(changed)
        return copied
