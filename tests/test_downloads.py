"""downloads.py and its two users (checkpoints.fetch_released, evaluate.fetch_inception) against
conftest's local HTTP server: nothing incomplete or wrong is ever kept, a cached file is checked
again, and every failure is a DownloadError saying what came back."""
import hashlib
import os
import socket
import subprocess
import sys

import pytest

import checkpoints
import downloads
import evaluate
from conftest import REPO, released_like, small_state_dict, torch_bytes
from downloads import DownloadError

RELEASED = "DiT-XL-2-256x256.pt"


def serve(server, data):
    """Routes for the released name: `good` the file, `cut` half of it under the full Content-Length,
    `html` an error page as a 200, `empty` a 200 with no body."""
    server.routes.update({f"good/{RELEASED}": (data, "application/octet-stream", None),
                          f"cut/{RELEASED}": (data[: len(data) // 2], "application/octet-stream", len(data)),
                          f"html/{RELEASED}": (b"<html><body>rate limit exceeded</body></html>", "text/html", None),
                          f"empty/{RELEASED}": (b"", "application/octet-stream", None)})


def test_download_interrupted_then_complete_and_cached(file_server, tmp_path, monkeypatch):
    base, server = file_server
    serve(server, released_like(256))
    dest = tmp_path / "pretrained_models"
    with pytest.raises(DownloadError, match="256x256.*stopped after"):
        checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest), base_url=base + "/cut")
    assert os.listdir(dest) == []  # nothing half-written is left, under any name
    monkeypatch.setenv(checkpoints.DOWNLOAD_URL_ENV, base + "/good")  # the override the docs mention
    ckpt = checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest))
    assert os.listdir(dest) == [RELEASED] and (dest / RELEASED).read_bytes() == released_like(256)
    assert (ckpt.path, ckpt.config["model"]) == (str(dest / RELEASED), "DiT-XL/2")
    monkeypatch.setenv(checkpoints.DOWNLOAD_URL_ENV, base + "/cut")  # present now: no second download
    asked = len(server.requests)
    assert checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest)).config["image_size"] == 256
    assert len(server.requests) == asked


@pytest.mark.parametrize("mode, what", [("html", r"got 45 bytes of text/html.*not a torch checkpoint"),
                                        ("empty", r"got 0 bytes of application/octet-stream"),
                                        ("wrong", r"got .* bytes of application/octet-stream.*does not have the "
                                                  r"released DiT-XL/2 keys and shapes")])
def test_a_wrong_download_is_not_kept(file_server, tmp_path, mode, what):
    base, server = file_server
    serve(server, torch_bytes(small_state_dict()))  # "wrong": a real checkpoint, but of another model
    dest = tmp_path / "pretrained_models"
    with pytest.raises(DownloadError, match=what + ".*nothing was kept"):
        checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest), base_url=base + ("/good" if mode == "wrong"
                                                                                        else f"/{mode}"))
    assert os.listdir(dest) == []
    serve(server, released_like(256))  # the mirror is fixed: the next run fetches the real file
    ckpt = checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest), base_url=base + "/good")
    assert ckpt.config["image_size"] == 256


def test_a_wrong_cached_released_file_says_how_to_refetch(file_server, tmp_path):
    base, server = file_server
    dest = tmp_path / "pretrained_models"
    dest.mkdir()
    (dest / RELEASED).write_bytes(torch_bytes(small_state_dict()))
    with pytest.raises(DownloadError, match=rf"{RELEASED} does not have the released DiT-XL/2 keys and shapes .*"
                                            rf"delete it to fetch it again: rm {dest / RELEASED}$"):
        checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest), base_url=base)
    assert server.requests == []  # the cache is never silently replaced


def test_weights_are_kept_only_when_their_digest_matches_their_name(file_server, tmp_path, monkeypatch):
    server, files = file_server
    data = os.urandom(5000)
    good = f"weights-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    files.routes.update({good: (data, "application/octet-stream", None),
                         "weights-0badc0de.pth": (data, "application/octet-stream", None),
                         evaluate.INCEPTION_NAME: (b"<html>moved</html>", "text/html", None)})

    path = evaluate.fetch_inception(good, str(tmp_path), base_url=server)
    assert open(path, "rb").read() == data and downloads.sha256(path) == hashlib.sha256(data).hexdigest()
    asked = len(files.requests)
    assert evaluate.fetch_inception(good, str(tmp_path), base_url=server) == path and len(files.requests) == asked

    with pytest.raises(DownloadError, match="where its name promises 0badc0de"):
        evaluate.fetch_inception("weights-0badc0de.pth", str(tmp_path), base_url=server)
    monkeypatch.setenv(evaluate.INCEPTION_URL_ENV, server)  # the mirror variable is where the default comes from
    with pytest.raises(DownloadError, match=f"{server}/{evaluate.INCEPTION_NAME}"):
        evaluate.fetch_inception(dest_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [good]  # nothing else kept, no temporary files
    with open(path, "r+b") as f:  # damaged in the cache: reported with the command that refetches it
        f.write(b"x")
    with pytest.raises(DownloadError, match=f"where its name promises .*: delete it to fetch it again: rm {path}"):
        evaluate.fetch_inception(good, str(tmp_path), base_url=server)


def test_no_server_and_no_content_length_are_download_errors(file_server, tmp_path):
    base, server = file_server
    server.routes.update({"unsized": (b"some bytes", "application/octet-stream", False),
                          "nonsense": (b"some bytes", "application/octet-stream", "ten")})
    with pytest.raises(DownloadError, match=f"{base}/unsized sent no Content-Length"):
        downloads.download(f"{base}/unsized", str(tmp_path / "unsized"))
    with pytest.raises(DownloadError, match=f"cannot download {base}/nonsense: ValueError"):
        downloads.download(f"{base}/nonsense", str(tmp_path / "nonsense"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=f"cannot download http://127.0.0.1:{port}/x: .*refused"):
        downloads.fetch(f"http://127.0.0.1:{port}", "x", str(tmp_path), verify=lambda path: None)
    assert os.listdir(tmp_path) == []


def test_downloads_imports_no_torch():
    code = "import sys, downloads; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
