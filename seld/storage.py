"""Object-store storage (``s3://bucket/prefix``, ``gs://bucket/prefix``) through ``pyarrow.fs``: a
folder of this node (the staging folder) mirrored to a folder of the store. Reads and writes files
of both; plain pyarrow, no Ray. Run folders and study folders are written with file I/O in their
staging folder and pushed (new or changed files, one object each, written whole) after every epoch
and at the end; a (re)started trial or study first pulls what the store holds.

The store is reached with the standard AWS variables (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for a non-AWS server, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` when set, else the
node's own credential chain, e.g. an instance role); Google Cloud Storage with its default
credentials. A :class:`Mirror` carries its filesystem object (and so any keys from the environment)
to the processes it is handed to, in memory: nothing is written to a file or a log.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
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
    # Hidden files are the atomic writers' temporaries (seld.runfolder.temp_path) and probes.
    return name.startswith(".") or name.endswith(".tmp") or any(fnmatch.fnmatch(rel, p) for p in skip)


@dataclass
class Mirror:
    """A staging folder (``local``, on this node) mirrored to a storage URI (``uri``).

    Picklable: handed to trials and Train workers, it carries its filesystem (endpoint, region and
    any keys from the environment where it was made) in memory.

    Attributes:
        local: the staging folder.
        uri: ``s3://bucket/prefix/...`` or ``gs://...``.
    """

    local: Path
    uri: str
    fs: object = field(default=None, repr=False)
    root: str = ""  # the uri as a path of ``fs`` (bucket/prefix)
    # relative path -> (size, mtime_ns) of the local file as last pulled or pushed by this process
    synced: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.local = Path(self.local)
        self.uri = check_uri(self.uri)
        if self.fs is None:
            self.fs, self.root = filesystem(self.uri)

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

    def pull(self, skip: Sequence[str] = ()) -> list[str]:
        """Copy to the staging folder every object that is missing there, of another size or newer
        than the local file (each written under a temporary name, then renamed).

        Args:
            skip: ``fnmatch`` patterns of relative paths to leave alone (``runs/*/checkpoints/*``).
        Returns:
            The relative paths copied.
        """
        copied = []
        for rel, (size, mtime) in sorted(self.remote_files().items()):
            if _skipped(rel, skip):
                continue
            dst = self.local / rel
            st = dst.stat() if dst.is_file() else None
            if st is not None and st.st_size == size and (not mtime or st.st_mtime >= mtime):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.pull-{os.getpid()}")
            try:
                with self.fs.open_input_stream(f"{self.root}/{rel}") as src, open(tmp, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
            st = dst.stat()
            self.synced[rel] = (st.st_size, st.st_mtime_ns)
            copied.append(rel)
        return copied

    def push(self, skip: Sequence[str] = (), only: Sequence[str] | None = None) -> list[str]:
        """Copy to the store every file of the staging folder that is new or changed since this
        mirror last pulled or pushed it (one object per file, written whole: readers never see half).

        Args:
            skip: ``fnmatch`` patterns of relative paths not to push (hidden files never are).
            only: when given, push only these relative paths (those that exist).
        Returns:
            The relative paths copied.
        """
        if only is not None:
            rels = [r for r in only if (self.local / r).is_file()]
        else:
            rels = sorted(str(p.relative_to(self.local).as_posix()) for p in self.local.rglob("*") if p.is_file()) \
                if self.local.is_dir() else []
        copied = []
        for rel in rels:
            if _skipped(rel, skip):
                continue
            src = self.local / rel
            try:
                st = src.stat()
                if self.synced.get(rel) == (st.st_size, st.st_mtime_ns):
                    continue
                with open(src, "rb") as f, self.fs.open_output_stream(f"{self.root}/{rel}") as out:
                    shutil.copyfileobj(f, out, _CHUNK)
            except FileNotFoundError:  # replaced or removed while we looked: the next push has it
                continue
            self.synced[rel] = (st.st_size, st.st_mtime_ns)
            copied.append(rel)
        return copied
