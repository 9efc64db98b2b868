"""
Verified downloads, for the released DiT checkpoints (checkpoints.py) and the Inception weights
(evaluate.py) alike: a file is fetched once into pretrained_models/, kept only when it is complete and
its owner's check accepts it, and checked again each time it is found there.

    from downloads import fetch, sha256_in_name
    path = fetch("https://host/files/", "weights-6726825d.pth", "pretrained_models",
                 sha256_in_name("weights-6726825d.pth"))   # its sha256 must start with 6726825d

A check (`verify`) is a callable(path) that raises DownloadError saying what the file is instead
("is not a torch checkpoint", "has sha256 ..."). This module needs neither torch nor the network at
import.
"""
import hashlib
import http.client
import os
import re
import urllib.request

from tqdm.auto import tqdm

from files import UserError, atomic_write

PRETRAINED_DIR = "pretrained_models"


class DownloadError(UserError, RuntimeError):
    """A file could not be downloaded completely, or what came back (or sits in the cache) is not what
    was asked for."""


def first_line(e):
    """The first line of an exception's message, or its type when it has none (torch's EOFError)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def sha256(path):
    """The hex sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_in_name(name):
    """
    The check for a file whose name carries the start of its sha256 (torch.hub's convention,
    `name-<hex>.ext`, as pytorch-fid's Inception weights are named).

    :return: verify(path), raising DownloadError unless the file's sha256 starts with that hex.
    """
    m = re.search(r"-([0-9a-f]{8,})\.[a-z]+$", name)
    assert m, f"{name} carries no digest to verify a download against"
    expected = m.group(1)

    def verify(path):
        found = sha256(path)
        if not found.startswith(expected):
            raise DownloadError(f"has sha256 {found[:16]}..., where its name promises {expected}")

    return verify


def download(url, dest, verify=None, timeout=60):
    """
    Download url to dest, atomically: the bytes go to a temporary file beside dest that becomes dest
    only once it is complete (its size equals the server's Content-Length) and `verify` accepts it,
    so neither an interrupted transfer nor a wrong file (an HTML error page, an empty body) is ever
    left where a later run would trust it.

    :param verify: callable(path) that raises DownloadError when the file is not what it claims to be.
    :return: dest.
    :raises DownloadError: on a network error, a short transfer or a rejected file (saying what came back).
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    try:
        with atomic_write(dest) as f, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            if expected is None:
                raise DownloadError(f"{url} sent no Content-Length: a complete download cannot be told apart")
            expected, received = int(expected), 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(dest)}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if received != expected:
                raise DownloadError(f"{url}: the transfer stopped after {received:,} of {expected:,} bytes")
            if verify is not None:
                f.flush()
                try:
                    verify(f.name)
                except DownloadError as e:
                    kind = response.headers.get("Content-Type", "unknown type")
                    raise DownloadError(f"{url} did not send {os.path.basename(dest)}: got {received:,} bytes "
                                        f"of {kind}, which {e}; nothing was kept") from e
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
        raise DownloadError(f"cannot download {url}: {e!r}") from e
    return dest


def fetch(base_url, name, dest_dir, verify):
    """
    dest_dir/name, downloaded from base_url/name the first time. A file already there is checked with
    verify as a download is (one copied in by hand, or damaged since, is not used).

    :return: the path of the file.
    :raises DownloadError: the download failed or was rejected, or the cached file is rejected (the
                           message gives the rm that lets the next run fetch it again).
    """
    dest = os.path.join(dest_dir, name)
    if not os.path.isfile(dest):
        return download(base_url.rstrip("/") + "/" + name, dest, verify)
    try:
        verify(dest)
    except DownloadError as e:
        raise DownloadError(f"{dest} {e}: delete it to fetch it again: rm {dest}") from e
    return dest
