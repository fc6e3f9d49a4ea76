"""Checked downloads: Meta's signed-URL releases (Llama 2, Llama 3.x) and the tinyllamas stories models.

A file is written to `NAME.part`, resumed with an HTTP Range request after an interruption,
checked (size, HTML error pages, md5 or sha256) and only then renamed to NAME, so a name
without `.part` always holds a complete, verified file.
"""

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

# Meta's model names -> (folder, number of consolidated.NN.pth shards), as in Meta's download.sh.
META_MODELS = {
    "7B": ("llama-2-7b", 1),
    "13B": ("llama-2-13b", 2),
    "70B": ("llama-2-70b", 8),
    "7B-chat": ("llama-2-7b-chat", 1),
    "13B-chat": ("llama-2-13b-chat", 2),
    "70B-chat": ("llama-2-70b-chat", 8),
}
# Meta's Llama 3.x model ids (llama-models' names) -> (folder on Meta's server, shards). Each server
# folder holds checklist.chk, tokenizer.model, params.json and consolidated.NN.pth; they are saved
# into a folder named after the model id (':' written '-'), as llama-models' download does.
LLAMA3_MODELS = {
    "Llama-3-8B": ("Llama-3-8B", 1),
    "Llama-3-8B-Instruct": ("Llama-3-8B-Instruct", 1),
    "Llama-3-70B": ("Llama-3-70B", 8),
    "Llama-3-70B-Instruct": ("Llama-3-70B-Instruct", 8),
    "Llama3.1-8B": ("Llama-3.1-8B", 1),
    "Llama3.1-8B-Instruct": ("Llama-3.1-8B-Instruct", 1),
    "Llama3.1-70B": ("Llama-3.1-70B", 8),
    "Llama3.1-70B-Instruct": ("Llama-3.1-70B-Instruct", 8),
    "Llama3.1-405B:bf16-mp8": ("Llama-3.1-405B-MP8", 8),
    "Llama3.1-405B:bf16-mp16": ("Llama-3.1-405B-MP16", 16),
    "Llama3.1-405B-Instruct:bf16-mp8": ("Llama-3.1-405B-Instruct-MP8", 8),
    "Llama3.1-405B-Instruct:bf16-mp16": ("Llama-3.1-405B-Instruct-MP16", 16),
    "Llama3.2-1B": ("Llama-3.2-1B", 1),
    "Llama3.2-1B-Instruct": ("Llama-3.2-1B-Instruct", 1),
    "Llama3.2-3B": ("Llama-3.2-3B", 1),
    "Llama3.2-3B-Instruct": ("Llama-3.2-3B-Instruct", 1),
    "Llama3.3-70B-Instruct": ("Llama-3.3-70B-Instruct", 8),
}
NEW_URL_HINT = "request a new download URL at https://llama.meta.com/llama-downloads and run again"

TINYLLAMAS_URL = "https://huggingface.co/karpathy/tinyllamas/resolve/main"
LLAMA2_TOKENIZER_URL = "https://github.com/karpathy/llama2.c/raw/master/tokenizer.model"
LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
# Stories models -> [(file name, path under TINYLLAMAS_URL or None for the Llama 2 tokenizer)].
STORIES = {
    "stories15M": [("stories15M.bin", "stories15M.bin"), ("tokenizer.model", None)],
    "stories42M": [("stories42M.bin", "stories42M.bin"), ("tokenizer.model", None)],
    "stories110M": [("stories110M.bin", "stories110M.bin"), ("tokenizer.model", None)],
    # Saved as tokenizer.model, the name Llama.build looks for beside a checkpoint.
    "stories260K": [("stories260K.bin", "stories260K/stories260K.bin"),
                    ("tokenizer.model", "stories260K/tok512.model")],
}

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


def download_file(url: str, dest: str, checksum: str | None = None, retries: int = 3,
                  timeout: float = 60.0) -> str:
    """Fetch url to dest through dest.part, resuming and verifying; returns dest.

    An existing dest is kept when it matches `checksum` (or when there is none to check).
    """
    name = os.path.basename(dest)
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
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, name, timeout)
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
            os.remove(part)
            raise DownloadError(f"{e}; the download was deleted, run again to fetch it afresh") from None
    os.replace(part, dest)
    log.info("downloaded %s", dest)
    return dest


class _Interrupted(Exception):
    """The connection ended early; the .part file is kept for resuming."""


def _fetch(url: str, part: str, name: str, timeout: float) -> None:
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "llama-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what we have: the .part is complete
            return
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
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "bytes 0-")
            start = int(re.match(r"bytes (\d+)-", content_range).group(1))
            if start != have:
                raise DownloadError(f"{name}: the server resumed at byte {start}, not {have}; "
                                    f"delete {part} and run again")
        else:
            have = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if "html" in response.headers.get("Content-Type", "").lower():
            _discard(part)
            raise DownloadError(f"{name}: the server sent a web page instead of the file (the URL has "
                                f"probably expired); {NEW_URL_HINT}")
        _write_body(response, part, name, have, total)


def _write_body(response, part: str, name: str, have: int, total: int | None) -> None:
    got = have
    bar = progress(total=total, initial=have, desc=name, unit="B", unit_scale=True,
                   unit_divisor=1024, show=(total or 0) > 10 * 2**20)
    with bar, open(part, "ab" if have else "wb") as f:
        first = True
        while True:
            try:
                block = response.read(1 << 20)
            except (TimeoutError, http.client.IncompleteRead, ConnectionError) as e:
                raise _Interrupted(f"the connection broke after {got} of {total or '?'} bytes "
                                   f"({type(e).__name__})") from None
            if not block:
                break
            if first and not have and _HTML_START.match(block[:512]):
                f.close()
                _discard(part)
                raise DownloadError(f"{name}: the server sent an error page instead of the file (the URL "
                                    f"has probably expired); {NEW_URL_HINT}")
            first = False
            f.write(block)
            got += len(block)
            bar.update(len(block))
    if total is not None and got < total:
        raise _Interrupted(f"the connection closed after {got} of {total} bytes")


def _discard(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def read_checklist(path: str) -> dict[str, str]:
    """{file name: md5} from an md5sum-style checklist (`HASH  NAME` lines)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    sums = {}
    for line in text.splitlines():
        m = re.match(r"^([0-9a-fA-F]{32})\s+\*?(.+?)\s*$", line)
        if m:
            sums[os.path.basename(m.group(2))] = m.group(1).lower()
    if not sums:
        raise DownloadError(f"{path} has no md5 lines (it is probably an error page); {NEW_URL_HINT}")
    return sums


def signed_url(url: str, path: str) -> str:
    """Meta's URL with its '*' replaced by the file's path."""
    return url.replace("*", path, 1)


def download_meta(url: str, models: list[str], target_folder: str = ".") -> list[str]:
    """Meta's release for `models` (names of META_MODELS or LLAMA3_MODELS) into target_folder,
    md5-verified. Returns the model folders.
    """
    if "*" not in url:
        raise ValueError("the URL has no '*' in it; paste the whole URL from Meta's email")
    unknown = [m for m in models if m not in META_MODELS and m not in LLAMA3_MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose among {', '.join([*META_MODELS, *LLAMA3_MODELS])}")
    os.makedirs(target_folder, exist_ok=True)

    def get(path: str, checksum: str | None = None, local: str | None = None) -> str:
        dest = os.path.join(target_folder, local or path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        return download_file(signed_url(url, path), dest, checksum)

    if any(m in META_MODELS for m in models):  # Llama 2: license and tokenizer beside the folders
        for path in ("LICENSE", "USE_POLICY.md"):
            get(path)
        sums = read_checklist(_fresh(get, "tokenizer_checklist.chk", target_folder))
        get("tokenizer.model", sums.get("tokenizer.model"))
    folders = []
    for model in models:
        if model in META_MODELS:
            folder, n_shards = META_MODELS[model]
            local, extra = folder, []
        else:  # Llama 3.x: the tokenizer is in each model's folder
            (folder, n_shards), local = LLAMA3_MODELS[model], model.replace(":", "-")
            extra = ["tokenizer.model"]
        sums = read_checklist(_fresh(get, f"{folder}/checklist.chk", target_folder, f"{local}/checklist.chk"))
        for path in [f"consolidated.{s:02d}.pth" for s in range(n_shards)] + ["params.json", *extra]:
            if path not in sums:
                log.warning("%s/checklist.chk has no md5 for %s; it is not verified", local, path)
            get(f"{folder}/{path}", sums.get(path), f"{local}/{path}")
        folders.append(os.path.join(target_folder, local))
    return folders


def _fresh(get, path: str, target_folder: str, local: str | None = None) -> str:
    """Download a checklist again each time: an old one may be an error page."""
    _discard(os.path.join(target_folder, local or path))
    return get(path, None, local)


def download_stories(name: str, target_folder: str = ".", base_url: str | None = None,
                     tokenizer_url: str | None = None) -> str:
    """Karpathy's tinyllamas `name` (llama2.c format) and its tokenizer into target_folder/name.

    Returns the folder. The tokenizer is sha256-checked; the model files are checked for size.
    """
    if name not in STORIES:
        raise ValueError(f"unknown stories model {name!r}; choose among {', '.join(STORIES)}")
    base_url = (base_url or os.environ.get("LLAMA_TINYLLAMAS_URL") or TINYLLAMAS_URL).rstrip("/")
    tokenizer_url = tokenizer_url or os.environ.get("LLAMA_TOKENIZER_URL") or LLAMA2_TOKENIZER_URL
    folder = os.path.join(target_folder, name)
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        for file_name, path in STORIES[name]:
            if path is None:
                download_file(tokenizer_url, os.path.join(folder, file_name), LLAMA2_TOKENIZER_SHA256)
            else:
                download_file(f"{base_url}/{path}", os.path.join(folder, file_name))
    except BaseException:
        if made and not os.listdir(folder):
            os.rmdir(folder)  # leave no empty folder behind
        raise
    return folder
