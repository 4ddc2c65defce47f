"""URL -> (filesystem, path) for every place a dataset or a run may live.

Local paths (a Colab Drive mount such as /content/drive/... is one), file://, memory://, gs://
(gcsfs; honours STORAGE_EMULATOR_HOST) and, with the `gdrive` extra, gdrive:// through PyDrive2.
Transient errors on gs:// are retried by gcsfs itself (6 tries with backoff); local filesystems
have no transient errors worth retrying. Before that, `check_reachable` answers in seconds whether a
gs:// URL can be reached at all (network, emulator, bucket, credentials), so a dead endpoint is one line
instead of a minute of retries. Roots cannot be escaped: `safe_component` checks a name used as one
path component (a run name), `join_under` refuses any result outside its root.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import fsspec

from ray_mmd.errors import UserError

_SCHEMES = ("file", "memory", "gs", "gcs", "gdrive")


def _prepare_gcs_env() -> None:
    # Against an emulator, current gcsfs probes the bucket type over gRPC and waits 60 s per call;
    # the switch is read when gcsfs is first imported, so set it before that.
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def split_url(url: str) -> tuple[str, str]:
    """Return (scheme, path) with scheme "file" for plain local paths."""
    url = os.fspath(url)
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise UserError(
            f"unsupported storage URL {url!r}: use a local path, file://, memory://, gs:// or gdrive://"
        )
    if scheme == "file":
        return "file", os.path.abspath(rest)
    if scheme == "gcs":
        scheme = "gs"
    return scheme, rest.rstrip("/") if scheme != "memory" else "/" + rest.strip("/")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Turn a URL or path into an fsspec filesystem and the path inside it."""
    scheme, path = split_url(url)
    if scheme == "file":
        return fsspec.filesystem("file", auto_mkdir=True), path
    if scheme == "memory":
        return fsspec.filesystem("memory"), path
    if scheme == "gs":
        _prepare_gcs_env()
        try:
            import gcsfs
        except ImportError as e:  # pragma: no cover - gcsfs is a core dependency
            raise UserError("gs:// needs gcsfs: pip install gcsfs") from e
        kw: dict[str, Any] = {}
        token = _gcs_token()
        if token is not None:
            kw["token"] = token
        return gcsfs.GCSFileSystem(**kw), path
    # gdrive://
    try:
        from pydrive2.fs import GDriveFileSystem
    except ImportError as e:
        raise UserError(
            f"{url!r} needs the optional gdrive extra: pip install 'ray-mmd[gdrive]' "
            "(on Colab, use the mounted path /content/drive/... instead)"
        ) from e
    root = path.split("/", 1)[0]
    return GDriveFileSystem(root), path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path, keeping its scheme."""
    url = os.fspath(url)
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts) if rest else f"{scheme}://" + "/".join(parts)
    return os.path.join(url, *parts)


def pyarrow_filesystem(url: str):
    """A pyarrow filesystem + path for Ray (RunConfig.storage_filesystem, read_parquet)."""
    import pyarrow.fs as pafs

    scheme, path = split_url(url)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(url: str) -> bool:
    """True if the URL names an existing file or directory; storage failures become a UserError."""
    check_reachable(url, need_bucket=False)  # seconds and one line, not a minute of gcsfs retries
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except Exception as e:
        raise UserError(
            f"cannot reach {url!r} ({type(e).__name__}: {e}); check the URL and credentials"
        ) from e


def require(url: str, what: str) -> None:
    """Raise a one-line UserError unless `url` exists (a missing gs:// bucket included)."""
    check_reachable(url, need_bucket=True, what=f"{what} URL")
    if not exists(url):
        raise UserError(f"{what} not found at {url!r}: check the path")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_jsonl(url: str) -> list[dict]:
    """The JSON objects of a JSON-lines file ([] if it does not exist); a line cut short by a kill is skipped."""
    if not exists(url):
        return []
    out = []
    for line in read_bytes(url).decode(errors="replace").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict):
            out.append(d)
    return out


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write so that readers see either nothing or the whole file (temp name, then rename).

    On gs:// an object upload is already atomic, so it is written in place.
    """
    fs, path = filesystem(url)
    scheme, _ = split_url(url)
    parent = posixpath.dirname(path)
    if parent and scheme != "gs":
        fs.makedirs(parent, exist_ok=True)
    if scheme == "gs":
        fs.pipe_file(path, data)
        return
    if fs.isdir(path):  # fs.mv would move the file *into* the directory under its temp name
        raise IsADirectoryError(f"{url!r} is a directory")
    tmp = f"{path}.tmp-{os.getpid()}"
    fs.pipe_file(tmp, data)
    if scheme == "file":
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.mv(tmp, path)


def remove(url: str) -> None:
    """Delete a file if it is there."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm_file(path)


# ---- roots that cannot be escaped --------------------------------------------------------------

_MAX_COMPONENT = 200


def safe_component(value: str, what: str = "run name") -> str:
    """Return `value` if it is one safe path component, else raise a one-line UserError.

    Refused: empty, "." and "..", "/" or "\\" anywhere, control characters, a leading or trailing
    space, and names over 200 characters. Anything else (letters, digits, "-", "_", inner dots) is a
    plain directory name on every filesystem we write to.
    """
    if not isinstance(value, str):
        raise UserError(f"{what} must be a string (got {value!r}): give a name such as 'stage1'")
    why = None
    if value in ("", ".", ".."):
        why = "is empty" if not value else "is a relative path, not a name"
    elif "/" in value or "\\" in value:
        why = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        why = "contains a control character"
    elif value != value.strip():
        why = "starts or ends with a space"
    elif len(value) > _MAX_COMPONENT:
        why = f"is longer than {_MAX_COMPONENT} characters"
    if why:
        raise UserError(
            f"{what} {value[:60]!r} {why}: use one plain name of letters, digits, '-', '_' or '.' (e.g. 'stage1')"
        )
    return value


def join_under(root: str, *parts: str, what: str = "path") -> str:
    """Join relative `parts` onto `root` like `join`, refusing any result outside `root`.

    Works the same for local paths, file://, memory:// and gs://: absolute parts, other URLs
    ("gs://other-bucket/x"), ".." that climbs out, backslashes and control characters are refused
    with a one-line UserError. The check is lexical (a symlink inside the root is followed as usual).
    """
    root = os.fspath(root)
    scheme, base = split_url(root)
    base = base.rstrip("/") or "/"
    rel: list[str] = []
    for part in parts:
        part = os.fspath(part)
        bad = None
        if not isinstance(part, str) or not part:
            bad = "is empty"
        elif "://" in part:
            bad = "is a URL, not a path inside the root"
        elif part.startswith("/") or part.startswith("~") or (len(part) > 1 and part[1] == ":"):
            bad = "is absolute"
        elif "\\" in part:
            bad = "contains a backslash"
        elif any(ord(c) < 32 or ord(c) == 127 for c in part):
            bad = "contains a control character"
        if bad:
            raise UserError(f"{what} {part!r} {bad}: it must be relative to {root!r} and stay inside it")
        rel.append(part)
    joined = posixpath.normpath(posixpath.join(base, *rel))
    if joined != base and not joined.startswith(base.rstrip("/") + "/"):
        raise UserError(
            f"{what} {posixpath.join(*rel)!r} leaves its root {root!r}: use a path inside the root "
            "(no '..' that climbs out)"
        )
    if "://" not in root:
        return joined  # a plain local path stays a plain (absolute) path
    if scheme == "file":
        return "file://" + joined
    return f"{root.split('://', 1)[0]}://{joined.lstrip('/')}"


# ---- gs:// reachability: seconds, one line --------------------------------------------------------

GCS_TIMEOUT_S = 10.0  # whole check; a healthy endpoint answers in well under a second
_GCS_ENDPOINT = "https://storage.googleapis.com"
_reachable: set[tuple[str, str]] = set()  # (endpoint, bucket) already checked in this process
_FIX_CREDS = (
    "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a key file) "
    "and make sure that account may read the bucket"
)


def _gcs_token() -> str | None:
    """The gcsfs `token` to use, found without network calls.

    gcsfs's own search pings the GCE metadata server twice; off GCE with no network that costs ~15 s
    before it falls back to anonymous access. The same order, decided from local facts: the emulator
    takes no credentials; a key file or gcloud's application-default file means google_default; a GCE
    (or GKE, Colab-on-GCE) machine means gcsfs's usual search (the metadata server answers there).
    """
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return "anon"
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return "google_default"
    try:
        from google.auth import _cloud_sdk
        from google.auth.compute_engine import _metadata

        if os.path.exists(_cloud_sdk.get_application_default_credentials_path()):
            return "google_default"
        if _metadata.detect_gce_residency_linux():
            return None
    except Exception:  # pragma: no cover - google-auth internals moved: let gcsfs search
        return None
    if os.path.exists(os.path.expanduser("~/.gcs_tokens")):
        return None  # gcsfs's browser-token cache
    return "anon"


def _gcs_endpoint() -> tuple[str, bool]:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return _GCS_ENDPOINT, False
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/"), True


def _where(endpoint: str, emulator: bool) -> str:
    return f"the GCS emulator at STORAGE_EMULATOR_HOST={endpoint}" if emulator else endpoint


def _unreachable(url: str, endpoint: str, emulator: bool, why: str) -> UserError:
    if emulator:
        fix = "start the emulator there, or fix (or unset, for real GCS) STORAGE_EMULATOR_HOST"
    else:
        fix = "check the network (or proxy) of this machine, or set STORAGE_EMULATOR_HOST for an emulator"
    return UserError(f"cannot reach {url!r}: {_where(endpoint, emulator)} {why}: {fix}")


def _connect(url: str, endpoint: str, emulator: bool, host: str, port: int, deadline: float) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise _unreachable(url, endpoint, emulator, f"does not resolve ({e.strerror}; no network?)") from None
    try:
        af, st, proto, _, addr = infos[0]
        with socket.socket(af, st, proto) as s:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.connect(addr)
    except TimeoutError:
        raise _unreachable(
            url, endpoint, emulator, "did not answer in time (firewall or no network?)"
        ) from None
    except OSError as e:
        raise _unreachable(url, endpoint, emulator, f"refused the connection ({e.strerror})") from None


def _probe_gcs(url: str, bucket: str, prefix: str, deadline: float) -> int:
    """One unretried list call; returns the HTTP status (200 ok, 404 no bucket) or raises UserError."""
    endpoint, emulator = _gcs_endpoint()
    parsed = urllib.parse.urlsplit(endpoint)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    # 1. name resolution + TCP: the usual failures (no network, dead emulator port) end here at once
    #    (skipped behind an HTTP(S) proxy: then only the proxy is reachable, and step 3 goes through it)
    proxied = parsed.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)
    if not proxied:
        _connect(url, endpoint, emulator, host, port, deadline)
    # 2. credentials, the way storage.filesystem will use them
    headers = {"User-Agent": "ray-mmd"}
    token = _gcs_token()
    if not emulator and token != "anon":
        try:
            from gcsfs.credentials import GoogleCredentials

            creds = GoogleCredentials(None, "read_only", token)
            creds.apply(headers)
        except Exception as e:
            raise UserError(
                f"no usable Google credentials for {url!r} ({type(e).__name__}: {e}): {_FIX_CREDS}"
            ) from None
    # 3. one list call, no retries
    q = urllib.parse.urlencode({"maxResults": 1, "prefix": prefix, "fields": "kind"})
    req = urllib.request.Request(
        f"{endpoint}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?{q}", headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=max(0.1, deadline - time.monotonic())) as r:
            body, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    except TimeoutError:
        raise _unreachable(
            url, endpoint, emulator, "accepted the connection but did not answer in time"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:  # e.g. not HTTP at all (wrong port)
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise _unreachable(url, endpoint, emulator, "did not answer in time") from None
        raise _unreachable(url, endpoint, emulator, f"does not speak the GCS API ({reason})") from None
    if status == 200:
        if _json_kind(body) == "storage#objects":
            return 200
        raise _unreachable(url, endpoint, emulator, "answers, but not as the GCS JSON API does")
    if status == 404:
        # GCS says why in JSON; the emulator sends an empty body, so ask it to list buckets: a
        # catch-all proxy or another web server on that port answers 404 to everything
        if _json_kind(body) == "error" or _api_kind(endpoint, headers, deadline) == "storage#buckets":
            return 404
        raise _unreachable(url, endpoint, emulator, "answers, but not as the GCS JSON API does")
    if status in (401, 403):
        who = "anonymously (no credentials found)" if token == "anon" else "with the credentials found"
        raise UserError(f"access to {url!r} denied ({status}) {who}: {_FIX_CREDS}")
    raise _unreachable(url, endpoint, emulator, f"answered HTTP {status}")


def _json_kind(body: bytes) -> str | None:
    try:
        d = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict):
        return None
    return "error" if "error" in d else d.get("kind")


def _api_kind(endpoint: str, headers: dict[str, str], deadline: float) -> str | None:
    req = urllib.request.Request(f"{endpoint}/storage/v1/b?project=_&maxResults=1", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=max(0.1, deadline - time.monotonic())) as r:
            return _json_kind(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def check_reachable(
    url: str, timeout: float = GCS_TIMEOUT_S, need_bucket: bool = True, what: str = "URL"
) -> None:
    """Raise a one-line UserError within about `timeout` s if a gs:// URL cannot be reached.

    Checks, in order, with no retries: the endpoint (real GCS or STORAGE_EMULATOR_HOST) resolves and
    accepts a connection; credentials are found; one list call on the bucket answers. A missing bucket
    is an error when `need_bucket`. Other schemes return at once. Call it on the driver before Ray
    starts; a success is remembered for this process.
    """
    scheme, path = split_url(url)
    if scheme != "gs":
        return
    bucket, _, prefix = path.partition("/")
    if not bucket:
        raise UserError(f"{url!r} names no bucket: use gs://BUCKET/path")
    endpoint, _ = _gcs_endpoint()
    if (endpoint, bucket) in _reachable:
        return
    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {}

    def probe() -> None:
        try:
            out["status"] = _probe_gcs(url, bucket, prefix, deadline)
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    # a thread bounds the whole check, credential refreshes included, whatever blocks inside
    t = threading.Thread(target=probe, name="gcs-probe", daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if t.is_alive():
        ep, emu = _gcs_endpoint()
        raise _unreachable(url, ep, emu, f"gave no answer within {timeout:.0f} s")
    if "error" in out:
        raise out["error"]
    if out["status"] == 404:
        if need_bucket:
            raise UserError(
                f"bucket gs://{bucket} does not exist: create it (gcloud storage buckets create "
                f"gs://{bucket}) or fix the {what} {url!r}"
            )
        return
    _reachable.add((endpoint, bucket))
