"""
Writing files so that a crash, a kill or a full disk never leaves a half-written file under its
final name, and never leaves temporary files behind.

    from files import atomic_write, sweep_temp_files
    with atomic_write("checkpoints/0050000.pt") as f:   # f is open on checkpoints/0050000.pt.tmp<pid>
        torch.save(data, f)                             # renamed into place only once complete
    sweep_temp_files("checkpoints")                     # leftovers of a killed run
"""
import contextlib
import errno
import os
import re

# The temporary name of `path` is `path.tmp<pid>`: unique per process, and recognisable for sweeping.
_TEMP = re.compile(r"\.tmp(\d*)$")


class UserError(Exception):
    """Bad input (a flag, a file, a folder): a script prints the message as one line, never a traceback.
    Every module's own error (StoreError, CheckpointError, TrainError, ...) is one of these."""


class DiskFullError(OSError, UserError):
    """The disk filled up while writing; nothing was left under the final name."""

    def __str__(self):
        return self.strerror


def run_script(parse_args, main):
    """
    The one ending of every script: `if __name__ == "__main__": run_script(parse_args, main)`.
    parse_args() returns (parser, args) and reports bad flags itself; main(args) raises a UserError for
    bad input, which ends as `<prog>: error: <message>` with exit status 2 (1 for a full disk).
    """
    parser, args = parse_args()
    try:
        main(args)
    except DiskFullError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except UserError as e:
        parser.error(str(e))


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """
    Open a temporary file beside `path` for writing; when the block ends without an error the data is
    flushed to disk and the file renamed to `path` (atomic on POSIX), else the temporary file is
    removed and `path` is untouched. The temporary file is created new and never through a link, so a
    link planted at its name cannot redirect the write; a link at `path` is replaced, not written through.

    :raises DiskFullError: the disk filled up (the message names the file and the free space).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)  # a killed earlier process with this pid; a link is removed, not followed
    try:
        with open(tmp, mode, opener=_create_new) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {path} "
                                              f"({free_bytes(path) / 2**20:.0f} MiB free there); "
                                              f"nothing was written, free some space and rerun") from e
        raise


def _create_new(path, flags):
    """open()'s opener for a file that must not exist yet and is never reached through a link."""
    return os.open(path, flags | os.O_EXCL | os.O_NOFOLLOW, 0o666)


def free_bytes(path):
    """Bytes available to this user on the file system that holds path (or its folder)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_temp_files(folder):
    """
    Remove the temporary files that atomic_write leaves when its process is killed (those of a
    process still running on this machine stay). :return: the names removed.
    """
    if not os.path.isdir(folder):
        return []
    swept = []
    for name in sorted(os.listdir(folder)):
        m = _TEMP.search(name)
        if m is None or os.path.isdir(os.path.join(folder, name)):  # a folder's name is not atomic_write's
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid is None or pid == os.getpid() or not _alive(pid):
            swept.append(name)
    for name in swept:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    return swept
