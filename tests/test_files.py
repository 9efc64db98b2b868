"""files.py: atomic writes that never write through a link, the temp-file sweep, and the scripts' one ending."""
import argparse
import errno
import os

import pytest

from files import DiskFullError, UserError, atomic_write, run_script, sweep_temp_files


def test_atomic_write_replaces_links_instead_of_writing_through_them(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    target = tmp_path / "store" / "meta.json"
    target.parent.mkdir()
    os.symlink(outside, f"{target}.tmp{os.getpid()}")  # planted at the temporary name
    os.symlink(outside, target)  # and at the final name
    with atomic_write(str(target), "w") as f:
        f.write("new")
    assert outside.read_text() == "keep"
    assert not target.is_symlink() and target.read_text() == "new"
    assert os.listdir(target.parent) == ["meta.json"]


def test_atomic_write_leaves_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(str(path), "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_sweep_removes_dead_processes_temp_files_only(tmp_path):
    (tmp_path / "0000010.pt.tmp999999999").write_text("dead")   # no such process
    (tmp_path / f"0000020.pt.tmp{os.getppid()}").write_text("alive")
    (tmp_path / "folder.tmp1").mkdir()  # a folder with a temp-like name is not touched (it was a traceback)
    assert sweep_temp_files(str(tmp_path)) == ["0000010.pt.tmp999999999"]
    assert sorted(os.listdir(tmp_path)) == sorted([f"0000020.pt.tmp{os.getppid()}", "folder.tmp1"])


@pytest.mark.parametrize("error, status", [(UserError("no such folder: x"), 2),
                                           (DiskFullError(errno.ENOSPC, "no space left for x"), 1)])
def test_run_script_turns_user_errors_into_one_line(capsys, error, status):
    parser = argparse.ArgumentParser(prog="tool.py")

    def main(args):
        raise error

    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: (parser, parser.parse_args([])), main)
    assert exit_.value.code == status
    assert capsys.readouterr().err.splitlines()[-1] == f"tool.py: error: {error}"
