"""Checked HTTP downloads of one file: written to NAME.part, resumed with an HTTP Range request
(If-Range) after an interruption, checked (size, HTML error pages, md5 or sha256) and only then
renamed to NAME, so a name without `.part` always holds a complete, verified file.
"""

import dataclasses
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from llama.progress import progress

log = logging.getLogger(__name__)

NEW_URL_HINT = "request a new download URL at https://llama.meta.com/llama-downloads and run again"
_HTML_START = re.compile(rb"^\s*(<!doctype html|<html|<\?xml[^>]*>\s*<error)", re.I)


class DownloadError(OSError):
    """A download that cannot complete as it is; the message says what to do."""


def _where(url: str) -> str:
    """Host and path of a URL, without the query (a signed URL's query is a credential)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.netloc}{parts.path}"


def file_digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_digest(path: str, name: str, checksum: str) -> None:
    """Raise DownloadError unless the file's md5 (32 hex digits) or sha256 (64) is `checksum`."""
    algorithm = {32: "md5", 64: "sha256"}.get(len(checksum))
    if algorithm is None:
        raise ValueError(f"checksum {checksum!r} for {name} is neither an md5 nor a sha256 hex digest")
    actual = file_digest(path, algorithm)
    if actual != checksum.lower():
        raise DownloadError(f"{name}: {algorithm} checksum mismatch (expected {checksum}, got {actual})")


@dataclasses.dataclass
class Limits:
    """When a download gives up: a per-read timeout, a stall (fewer than stall_bytes in
    stall_seconds), an overall deadline, and a byte cap where the server does not say the size."""

    timeout: float = 60.0
    stall_seconds: float = 120.0
    stall_bytes: int = 64 * 1024
    deadline: float = 24 * 3600.0
    max_bytes: int = 64 * 2**30  # bigger than any Llama shard; small files get SMALL_FILE_BYTES


SMALL_FILE_BYTES = 16 * 2**20
SMALL_FILES = (".chk", ".json", ".md", "LICENSE")


def download_file(url: str, dest: str, checksum: str | None = None, retries: int = 3,
                  limits: Limits | None = None) -> str:
    """Fetch url to dest through dest.part, resuming and verifying; returns dest.

    An existing dest is kept when it matches `checksum` (or when there is none to check). A .part
    is resumed only when the server confirms it still serves the same file (If-Range with the
    ETag or Last-Modified it first gave); otherwise the download starts over. dest appears only
    once the file has its announced size and, with a checksum, that checksum.
    """
    limits = limits or Limits()
    name = os.path.basename(dest)
    if name.endswith(SMALL_FILES):
        limits = dataclasses.replace(limits, max_bytes=min(limits.max_bytes, SMALL_FILE_BYTES))
    if os.path.exists(dest):
        if checksum is None:
            log.info("%s is already there", dest)
            return dest
        try:
            check_digest(dest, name, checksum)
            log.info("%s is already there and verified", dest)
            return dest
        except DownloadError:
            log.warning("%s does not match its checksum; downloading it again", dest)
    part = dest + ".part"
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, name, limits, start + limits.deadline)
            break
        except _Interrupted as e:
            if attempt == retries:
                raise DownloadError(f"{name}: {e}; run the same command again to resume") from None
            log.warning("%s: %s; resuming (attempt %d of %d)", name, e, attempt + 2, retries + 1)
            time.sleep(min(2**attempt, 10))
    if checksum is not None:
        try:
            check_digest(part, name, checksum)
        except DownloadError as e:
            discard(part)
            raise DownloadError(f"{e}; the download was deleted, run again to fetch it afresh") from None
    os.replace(part, dest)
    discard(part)  # its validator
    log.info("downloaded %s", dest)
    return dest


class _Interrupted(Exception):
    """The connection ended early; the .part file is kept for resuming."""


def _request(url: str, part: str, have: int) -> urllib.request.Request:
    headers = {"User-Agent": "llama-download"}
    validator = _read(part + ".validator") if have else None
    if validator:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = validator  # the server sends the whole file if it changed
    return urllib.request.Request(url, headers=headers)


def _fetch(url: str, part: str, name: str, limits: Limits, deadline: float) -> None:
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        response = urllib.request.urlopen(_request(url, part, have), timeout=limits.timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what we have: complete only if the sizes agree
            m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:
                return
            discard(part)
            raise _Interrupted("the server would not resume the partial file; starting over") from None
        if e.code in (401, 403):
            raise DownloadError(f"{name}: the server refused the download (HTTP {e.code}); the signed "
                                f"URL has expired or was not copied whole; {NEW_URL_HINT}") from None
        raise DownloadError(f"{name}: HTTP {e.code} {e.reason} from {_where(url)}") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
        # Not an interruption to retry: the host cannot be reached at all (offline, a wrong name).
        kept = f"; {part} is kept to resume" if have else ""
        raise DownloadError(f"{name}: cannot reach {urllib.parse.urlsplit(url).netloc} "
                            f"({getattr(e, 'reason', e)}); check the network connection{kept}") from None
    with response:
        if "html" in response.headers.get("Content-Type", "").lower():  # the .part stays as it is
            raise DownloadError(f"{name}: the server sent a web page instead of the file (the URL has "
                                f"probably expired); {NEW_URL_HINT}")
        if response.status == 206:
            start = int(re.match(r"bytes (\d+)-", response.headers.get("Content-Range", "bytes 0-")).group(1))
            if start != have:
                raise DownloadError(f"{name}: the server resumed at byte {start}, not {have}; "
                                    f"delete {part} and run again")
        else:  # the whole file: new, changed since the .part began, or no resuming there
            have = 0
            _write(part + ".validator", response.headers.get("ETag") or response.headers.get("Last-Modified"))
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if total is not None and total > limits.max_bytes:
            raise DownloadError(f"{name}: the server announces {total} bytes, more than the "
                                f"{limits.max_bytes} such a file can have; check the URL")
        _write_body(response, part, name, have, total, limits, deadline)


def _write_body(response, part: str, name: str, have: int, total: int | None, limits: Limits,
                deadline: float) -> None:
    got, cap = have, total if total is not None else limits.max_bytes
    window_start, window_got = time.monotonic(), got
    bar = progress(total=total, initial=have, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                   show=(total or 0) > 10 * 2**20)
    with bar, open(part, "ab" if have else "wb") as f:
        while True:
            try:
                block = response.read1(1 << 20)
            except (TimeoutError, http.client.IncompleteRead, ConnectionError) as e:
                raise _Interrupted(f"the connection broke after {got} of {total or '?'} bytes "
                                   f"({type(e).__name__})") from None
            if not block:
                break
            if got == 0 and _HTML_START.match(block[:512]):
                f.close()
                discard(part)  # only the error page was written
                raise DownloadError(f"{name}: the server sent an error page instead of the file (the URL "
                                    f"has probably expired); {NEW_URL_HINT}")
            if got + len(block) > cap:
                f.close()
                discard(part)
                raise DownloadError(f"{name}: the server sent more than the {cap} bytes this file can have; "
                                    "the download was deleted, check the URL")
            f.write(block)
            got += len(block)
            bar.update(len(block))
            now = time.monotonic()
            if now > deadline:
                raise DownloadError(f"{name}: not finished within {limits.deadline:.0f} s ({got} bytes so far); "
                                    "run the same command again to resume")
            if now - window_start > limits.stall_seconds:
                if got - window_got < limits.stall_bytes:
                    raise _Interrupted(f"the download stalled ({got - window_got} bytes in "
                                       f"{now - window_start:.0f} s)")
                window_start, window_got = now, got
    if total is not None and got < total:
        raise _Interrupted(f"the connection closed after {got} of {total} bytes")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _write(path: str, text: str | None) -> None:
    if text:
        with open(path, "w") as f:
            f.write(text)
    else:
        discard(path)


def discard(path: str) -> None:
    """Remove path (and, for a .part, the validator that came with it)."""
    for name in (path, path + ".validator") if path.endswith(".part") else (path,):
        if os.path.exists(name):
            os.remove(name)
