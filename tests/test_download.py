"""Downloads against a local HTTP server: verified files, clear failures, no valid-looking leftovers."""

import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import REPO, models_path
from llama import download as dl

WEIGHTS = os.urandom(300_000)
HTML = b"<!DOCTYPE html><html><body>Access denied</body></html>"
XML = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code></Error>'


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Serves server.routes[path] = (body, kind), with an ETag and If-Range as real servers do.

    kind: ok, 403, html (a web page's Content-Type), cut (half the body, then hang up), cut-once,
    endless (no Content-Length, never ends), trickle (a byte every 0.1 s).
    """

    def do_GET(self):
        path = urlsplit(self.path).path
        self.server.requests.append((path, self.headers.get("Range")))
        if path not in self.server.routes:
            return self.send_error(404)
        body, kind = self.server.routes[path]
        if kind == "403":
            return self.send_error(403, "Forbidden")
        etag = f'"{md5(body)}"'
        start = 0
        m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and self.headers.get("If-Range", etag) == etag:  # a changed file is sent whole
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Type", "text/html" if kind == "html-page" else "application/octet-stream")
        self.send_header("ETag", etag)
        if kind != "endless":
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if kind == "cut" or (kind == "cut-once" and not start):
            self.wfile.write(body[start : start + (len(body) - start) // 2])  # then hang up
            self.close_connection = True
        elif kind == "endless":
            try:
                for _ in range(10_000):  # 640 MB at most, far past any cap a test sets
                    self.wfile.write(b"x" * 65536)
            except ConnectionError:  # the client gave up, as it should
                pass
        elif kind == "trickle":
            for byte in body[start:]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.wfile.write(body[start:])

    def do_HEAD(self):
        path = urlsplit(self.path).path
        if path not in self.server.routes:
            return self.send_error(404)
        body, kind = self.server.routes[path]
        if kind == "403":
            return self.send_error(403, "Forbidden")
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if kind == "html-page" else "application/octet-stream")
        self.send_header("ETag", f'"{md5(body)}"')
        if kind != "endless":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def no_valid_looking_file(dest: Path) -> bool:
    return not dest.exists() and not any(p.name == dest.name for p in dest.parent.iterdir())


def test_good_file_arrives_verified(server, tmp_path):
    server.routes["/w.pth"] = (WEIGHTS, "ok")
    dest = tmp_path / "w.pth"
    dl.download_file(server.url + "/w.pth", str(dest), md5(WEIGHTS))
    assert dest.read_bytes() == WEIGHTS
    assert not (tmp_path / "w.pth.part").exists()
    # A second run finds the verified file and does not fetch it again.
    dl.download_file(server.url + "/w.pth", str(dest), md5(WEIGHTS))
    assert len(server.requests) == 1


@pytest.mark.parametrize("body, kind, message", [
    (WEIGHTS, "403", "HTTP 403.*request a new download URL"),
    (HTML, "html", "error page instead of the file.*request a new download URL"),
    (XML, "html", "error page instead of the file.*request a new download URL"),
    (WEIGHTS, "cut", r"closed after 150000 of 300000 bytes.*run the same command again to resume"),
    (WEIGHTS[:-1] + b"x", "ok", "md5 checksum mismatch.*deleted, run again"),
])
def test_failures_are_clear_and_leave_no_valid_file(server, tmp_path, body, kind, message):
    server.routes["/consolidated.00.pth"] = (body, kind)
    dest = tmp_path / "consolidated.00.pth"
    with pytest.raises(dl.DownloadError, match=message) as err:
        dl.download_file(server.url + "/consolidated.00.pth?Signature=secret", str(dest), md5(WEIGHTS), retries=0)
    assert "secret" not in str(err.value)  # a signed URL's query is a credential
    assert no_valid_looking_file(dest)
    if kind != "cut":
        assert not (tmp_path / "consolidated.00.pth.part").exists()


def test_interrupted_download_resumes(server, tmp_path):
    server.routes["/w.pth"] = (WEIGHTS, "cut-once")
    dest = tmp_path / "w.pth"
    with pytest.raises(dl.DownloadError, match="resume"):
        dl.download_file(server.url + "/w.pth", str(dest), md5(WEIGHTS), retries=0)
    assert (tmp_path / "w.pth.part").stat().st_size == len(WEIGHTS) // 2
    dl.download_file(server.url + "/w.pth", str(dest), md5(WEIGHTS), retries=0)
    assert dest.read_bytes() == WEIGHTS
    assert server.requests[-1] == ("/w.pth", f"bytes={len(WEIGHTS) // 2}-")


def test_retries_resume_within_one_call(server, tmp_path, monkeypatch):
    monkeypatch.setattr("llama.fetch.time.sleep", lambda s: None)
    server.routes["/w.pth"] = (WEIGHTS, "cut-once")
    dl.download_file(server.url + "/w.pth", str(tmp_path / "w.pth"), md5(WEIGHTS), retries=1)
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS
    assert [r for _, r in server.requests] == [None, f"bytes={len(WEIGHTS) // 2}-"]


def meta_release(server, shard=WEIGHTS, kind="ok"):
    tokenizer = Path(models_path("llama2-tokenizer", "tokenizer.model")).read_bytes()
    params = b'{"dim": 4096}'
    server.routes.update({
        "/LICENSE": (b"license", "ok"),
        "/USE_POLICY.md": (b"policy", "ok"),
        "/tokenizer.model": (tokenizer, "ok"),
        "/tokenizer_checklist.chk": (f"{md5(tokenizer)}  tokenizer.model\n".encode(), "ok"),
        "/llama-2-7b/checklist.chk": (
            f"{md5(WEIGHTS)}  consolidated.00.pth\n{md5(params)}  params.json\n".encode(), "ok"),
        "/llama-2-7b/consolidated.00.pth": (shard, kind),
        "/llama-2-7b/params.json": (params, "ok"),
    })
    return server.url + "/*?Policy=abc&Signature=def"


def test_meta_release_flow(server, tmp_path):
    url = meta_release(server)
    assert dl.download_meta(url, ["7B"], str(tmp_path)) == [str(tmp_path / "llama-2-7b")]
    assert (tmp_path / "llama-2-7b" / "consolidated.00.pth").read_bytes() == WEIGHTS
    assert (tmp_path / "tokenizer.model").stat().st_size > 400_000
    with pytest.raises(ValueError, match="unknown models"):
        dl.download_meta(url, ["8B"], str(tmp_path))
    with pytest.raises(ValueError, match="no '\\*'"):
        dl.download_meta(server.url + "/x", ["7B"], str(tmp_path))


def test_meta_release_expired_checklist(server, tmp_path):
    url = meta_release(server)
    server.routes["/llama-2-7b/checklist.chk"] = (HTML, "html")
    with pytest.raises(dl.DownloadError, match="request a new download URL"):
        dl.download_meta(url, ["7B"], str(tmp_path))
    assert not (tmp_path / "llama-2-7b" / "consolidated.00.pth").exists()


def test_stories_by_name(server, tmp_path):
    weights = Path(models_path("stories260K", "stories260K.bin")).read_bytes()
    server.routes["/stories260K/stories260K.bin"] = (weights, "ok")
    server.routes["/stories260K/tok512.model"] = (Path(models_path("stories260K", "tok512.model")).read_bytes(), "ok")
    server.routes["/tokenizer.model"] = (Path(models_path("llama2-tokenizer", "tokenizer.model")).read_bytes(), "ok")
    server.routes["/stories15M.bin"] = (WEIGHTS, "ok")
    folder = dl.download_stories("stories260K", str(tmp_path), base_url=server.url)
    assert sorted(os.listdir(folder)) == ["stories260K.bin", "tokenizer.model"]
    # The next command a user types finds the tokenizer beside the weights.
    from llama import Llama

    llama = Llama.build(os.path.join(folder, "stories260K.bin"), max_seq_len=32, max_batch_size=1, device="cpu")
    assert llama.tokenizer.n_words == 512
    folder = dl.download_stories("stories15M", str(tmp_path), base_url=server.url,
                                 tokenizer_url=server.url + "/tokenizer.model")
    assert sorted(os.listdir(folder)) == ["stories15M.bin", "tokenizer.model"]  # tokenizer sha256-verified
    server.routes["/bad-tokenizer.model"] = (HTML[:-1], "ok")
    with pytest.raises(dl.DownloadError):
        dl.download_stories("stories42M", str(tmp_path), base_url=server.url,
                            tokenizer_url=server.url + "/bad-tokenizer.model")


def run_download_sh(url, tmp_path, downloader, **env):
    return subprocess.run(["bash", str(REPO / "download.sh")], input=f"{url}\n7B\n", text=True,
                          capture_output=True, timeout=60,
                          env={**os.environ, "TARGET_FOLDER": str(tmp_path), "DOWNLOADER": downloader, **env})


@pytest.mark.parametrize("downloader", ["wget", "curl"])
def test_download_sh(server, tmp_path, downloader):
    if shutil.which(downloader) is None or shutil.which("md5sum") is None:
        pytest.skip(f"{downloader} or md5sum is not installed")
    url = meta_release(server)
    proc = run_download_sh(url, tmp_path, downloader)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "llama-2-7b" / "consolidated.00.pth").read_bytes() == WEIGHTS
    assert "7B: verified" in proc.stdout
    assert "Signature" not in proc.stdout + proc.stderr  # a signed URL's query is a credential
    # An expired URL: 403, or an error page served as the weights, stops with a clear message.
    os.remove(tmp_path / "llama-2-7b" / "consolidated.00.pth")
    for body, kind, message in [(WEIGHTS, "403", "403"), (XML, "html", "error page"),
                                (WEIGHTS[:-1] + b"x", "ok", "md5 mismatch")]:
        server.routes["/llama-2-7b/consolidated.00.pth"] = (body, kind)
        proc = run_download_sh(url, tmp_path, downloader)
        assert proc.returncode != 0
        assert message in proc.stderr and ("new URL" in proc.stderr or "run again" in proc.stderr)
        assert no_valid_looking_file(tmp_path / "llama-2-7b" / "consolidated.00.pth")


@pytest.mark.parametrize("downloader", ["wget", "curl"])
def test_download_sh_hostile_servers(server, tmp_path, downloader):
    """The cases of the Python downloader, through download.sh: no file under the final name but a
    verified one, a .part kept where resuming makes sense, one line saying what happened."""
    if shutil.which(downloader) is None or shutil.which("md5sum") is None:
        pytest.skip(f"{downloader} or md5sum is not installed")
    url = meta_release(server)
    shard = tmp_path / "llama-2-7b" / "consolidated.00.pth"
    part = tmp_path / "llama-2-7b" / "consolidated.00.pth.part"

    server.routes["/llama-2-7b/consolidated.00.pth"] = (WEIGHTS, "endless")
    proc = run_download_sh(url, tmp_path, downloader, MAX_BYTES="1000000")
    assert proc.returncode == 1 and "more than the 1000000 bytes" in proc.stderr, proc.stderr
    assert no_valid_looking_file(shard) and not part.exists()

    server.routes["/llama-2-7b/consolidated.00.pth"] = (WEIGHTS, "trickle")
    proc = run_download_sh(url, tmp_path, downloader, STALL_SECONDS="2", STALL_BYTES="1000")
    assert proc.returncode == 1 and "stalled" in proc.stderr, proc.stderr
    assert no_valid_looking_file(shard)

    part.write_bytes(os.urandom(1000))  # begun from a file that has changed since
    (tmp_path / "llama-2-7b" / "consolidated.00.pth.part.validator").write_text('"old"')
    server.routes["/llama-2-7b/consolidated.00.pth"] = (WEIGHTS, "ok")
    proc = run_download_sh(url, tmp_path, downloader)
    assert proc.returncode == 0, proc.stderr
    assert shard.read_bytes() == WEIGHTS and "starting over" in proc.stdout

    os.remove(shard)
    part.write_bytes(WEIGHTS[:1000])
    (tmp_path / "llama-2-7b" / "consolidated.00.pth.part.validator").write_text(f'"{md5(WEIGHTS)}"')
    server.routes["/llama-2-7b/consolidated.00.pth"] = (HTML, "html-page")
    proc = run_download_sh(url, tmp_path, downloader)
    assert proc.returncode == 1 and "web page" in proc.stderr, proc.stderr
    assert part.read_bytes() == WEIGHTS[:1000]  # a web page never deletes the partial download
    server.routes["/llama-2-7b/consolidated.00.pth"] = (WEIGHTS, "ok")
    proc = run_download_sh(url, tmp_path, downloader)
    assert proc.returncode == 0 and shard.read_bytes() == WEIGHTS, proc.stderr  # resumed, verified
    shard_gets = [r for p, r in server.requests if p == "/llama-2-7b/consolidated.00.pth"]
    assert shard_gets[-1] == "bytes=1000-", server.requests

    os.remove(shard)  # a .part longer than the file (the server would answer 416): never renamed
    part.write_bytes(WEIGHTS + b"extra")
    (tmp_path / "llama-2-7b" / "consolidated.00.pth.part.validator").write_text(f'"{md5(WEIGHTS)}"')
    proc = run_download_sh(url, tmp_path, downloader)
    assert proc.returncode == 1 and "run this script again" in proc.stderr, proc.stderr
    assert no_valid_looking_file(shard) and not part.exists()
    proc = run_download_sh(url, tmp_path, downloader)
    assert proc.returncode == 0 and shard.read_bytes() == WEIGHTS, proc.stderr


def test_llama_download_command(server, tmp_path, monkeypatch, capsys):
    from llama.cli import main

    server.routes["/stories260K/stories260K.bin"] = (WEIGHTS, "ok")
    server.routes["/stories260K/tok512.model"] = (b"tok", "ok")
    monkeypatch.setenv("LLAMA_TINYLLAMAS_URL", server.url)
    main(["download", "stories260K", "--target_folder", str(tmp_path)])
    assert (tmp_path / "stories260K" / "stories260K.bin").read_bytes() == WEIGHTS
    assert "stories260K: downloaded to" in capsys.readouterr().out
    url = meta_release(server, kind="403")
    with pytest.raises(SystemExit) as stop:
        main(["download", "7B", "--url", url, "--target_folder", str(tmp_path)])
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("error: consolidated.00.pth: the server refused")


def test_offline_is_one_clear_error_and_leaves_no_folder(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    start = time.time()
    with pytest.raises(dl.DownloadError, match="cannot reach 127.0.0.1.*check the network connection"):
        dl.download_stories("stories260K", str(tmp_path), base_url=closed)
    assert time.time() - start < 5  # no retries
    assert os.listdir(tmp_path) == []


def test_mistyped_model_name_lists_the_known_ones(tmp_path, capsys):
    from llama.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["download", "stories99M", "--target_folder", str(tmp_path)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "unknown model(s) stories99M" in err and "stories260K" in err and "7B-chat" in err


def test_endless_body_stops_at_the_cap_and_leaves_nothing(server, tmp_path):
    server.routes["/w.pth"] = (WEIGHTS, "endless")
    dest = tmp_path / "w.pth"
    with pytest.raises(dl.DownloadError, match="more than the 1000000 bytes"):
        dl.download_file(server.url + "/w.pth", str(dest), retries=0, limits=dl.Limits(max_bytes=1_000_000))
    assert os.listdir(tmp_path) == []


def test_trickle_is_a_stall(server, tmp_path):
    server.routes["/w.pth"] = (WEIGHTS, "trickle")
    start = time.time()
    with pytest.raises(dl.DownloadError, match="stalled .*run the same command again to resume"):
        dl.download_file(server.url + "/w.pth", str(tmp_path / "w.pth"), retries=0,
                         limits=dl.Limits(stall_seconds=1.0, stall_bytes=1000))
    assert time.time() - start < 10
    assert not (tmp_path / "w.pth").exists()


def _half_part(tmp_path, body):
    """A .part holding the first half of body, begun from a server that gave body's ETag."""
    (tmp_path / "w.pth.part").write_bytes(body[: len(body) // 2])
    (tmp_path / "w.pth.part.validator").write_text(f'"{md5(body)}"')


def test_changed_file_on_resume_starts_over(server, tmp_path):
    old = os.urandom(300_000)
    _half_part(tmp_path, old)
    server.routes["/w.pth"] = (WEIGHTS, "ok")  # the file changed since
    dl.download_file(server.url + "/w.pth", str(tmp_path / "w.pth"), md5(WEIGHTS), retries=0)
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS  # never half old, half new
    assert server.requests[-1] == ("/w.pth", f"bytes={len(old) // 2}-")  # asked to resume, was sent all


def test_416_on_resume_is_not_taken_as_complete(server, tmp_path, monkeypatch):
    monkeypatch.setattr("llama.fetch.time.sleep", lambda s: None)
    (tmp_path / "w.pth.part").write_bytes(WEIGHTS + b"extra")  # longer than the file
    (tmp_path / "w.pth.part.validator").write_text(f'"{md5(WEIGHTS)}"')
    server.routes["/w.pth"] = (WEIGHTS, "ok")
    dl.download_file(server.url + "/w.pth", str(tmp_path / "w.pth"), md5(WEIGHTS), retries=1)
    assert (tmp_path / "w.pth").read_bytes() == WEIGHTS


def test_web_page_on_resume_keeps_the_part(server, tmp_path):
    _half_part(tmp_path, WEIGHTS)
    server.routes["/w.pth"] = (HTML, "html-page")
    with pytest.raises(dl.DownloadError, match="web page instead of the file"):
        dl.download_file(server.url + "/w.pth", str(tmp_path / "w.pth"), md5(WEIGHTS), retries=0)
    assert (tmp_path / "w.pth.part").read_bytes() == WEIGHTS[: len(WEIGHTS) // 2]
    assert not (tmp_path / "w.pth").exists()


def llama3_release(server, model_folder="Llama-3.2-1B-Instruct", n_shards=1):
    """Meta's Llama 3.x layout (llama-models' download): everything, the tokenizer too, in the folder."""
    tokenizer = b"IQ== 0\n"
    params = b'{"dim": 2048, "use_scaled_rope": true}'
    files = {f"consolidated.{s:02d}.pth": WEIGHTS for s in range(n_shards)}
    files.update({"params.json": params, "tokenizer.model": tokenizer})
    checklist = "".join(f"{md5(body)}  {name}\n" for name, body in files.items()).encode()
    server.routes[f"/{model_folder}/checklist.chk"] = (checklist, "ok")
    for name, body in files.items():
        server.routes[f"/{model_folder}/{name}"] = (body, "ok")
    return server.url + "/*?Policy=abc&Signature=def"


def test_llama3_release_layout(server, tmp_path, capsys):
    url = llama3_release(server)
    folders = dl.download_meta(url, ["Llama3.2-1B-Instruct"], str(tmp_path))
    assert folders == [str(tmp_path / "Llama3.2-1B-Instruct")]
    assert sorted(os.listdir(folders[0])) == ["checklist.chk", "consolidated.00.pth", "params.json",
                                              "tokenizer.model"]
    assert (tmp_path / "Llama3.2-1B-Instruct" / "consolidated.00.pth").read_bytes() == WEIGHTS
    assert not (tmp_path / "LICENSE").exists()  # Llama 2's top-level files are not asked for
    assert all(path.startswith("/Llama-3.2-1B-Instruct/") for path, _ in server.requests)
    # A damaged file fails its md5 from the folder's checklist.
    server.routes["/Llama-3.2-1B-Instruct/params.json"] = (b"{}", "ok")
    os.remove(tmp_path / "Llama3.2-1B-Instruct" / "params.json")
    with pytest.raises(dl.DownloadError, match="params.json: md5 checksum mismatch"):
        dl.download_meta(url, ["Llama3.2-1B-Instruct"], str(tmp_path))
    # The command knows the names; a 405B name with ':' gets a folder without it.
    llama3_release(server, "Llama-3.1-405B-MP16", n_shards=16)
    from llama.cli import main

    main(["download", "Llama3.1-405B:bf16-mp16", "--url", url, "--target_folder", str(tmp_path)])
    assert "Llama3.1-405B:bf16-mp16: downloaded and verified" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "Llama3.1-405B-bf16-mp16")) == 16 + 3
