"""What to download: Meta's signed-URL releases (Llama 2, Llama 3.x) and the tinyllamas stories models, by name.

Each file goes through `llama.fetch.download_file` (resumed, capped, verified, renamed only
when complete).
"""

import logging
import os
import re

from llama.fetch import NEW_URL_HINT, DownloadError, Limits, check_digest, discard, download_file

__all__ = ["DownloadError", "Limits", "check_digest", "download_file", "download_meta", "download_stories"]

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
    discard(os.path.join(target_folder, local or path))
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
