"""cifar_utils.files: every writer's atomic write keeps what the user had."""

import os
import stat

import pytest

import cifar_utils as cu
from cifar_utils.files import atomic_path


def test_a_symlink_is_written_through_and_the_mode_kept(tmp_path):
    target = tmp_path / "docs" / "notes.json"
    target.parent.mkdir()
    target.write_text("{}")
    target.chmod(0o600)
    link = tmp_path / "notes.json"
    link.symlink_to(target)
    cu.write_json(link, {"a": 1})
    assert link.is_symlink() and link.resolve() == target  # the link stays
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # not widened to 0644


def test_a_folder_is_replaced_only_when_empty(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    with pytest.raises(OSError), atomic_path(out, folder=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "keep.txt").read_text() == "the user's"  # nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    (out / "keep.txt").unlink()
    with atomic_path(out, folder=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("appears", ["file", "link", "dangling link"])
def test_without_replace_not_even_what_appears_while_writing_is_replaced(tmp_path, appears):
    out, victim = tmp_path / "out.png", tmp_path / "victim.txt"
    victim.write_text("the user's")
    with atomic_path(out, replace=False) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    out.unlink()
    with pytest.raises(FileExistsError, match="exists: it is never replaced"):
        with atomic_path(out, replace=False) as tmp:
            tmp.write_bytes(b"new")
            if appears == "file":  # e.g. a second command writing the same name meanwhile
                out.write_text("the user's")
            else:
                out.symlink_to(victim if appears == "link" else tmp_path / "nowhere")
    assert victim.read_text() == "the user's" and not (tmp_path / "nowhere").exists()
    if appears == "file":
        assert out.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "victim.txt"]  # no temporary
    with pytest.raises(FileExistsError, match="exists: it is never replaced"):
        with atomic_path(out, replace=False):
            pytest.fail("refused before the caller writes")


def test_report_keeps_the_readme_line_ends_and_link(tmp_path):
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_bytes(
        b"# Title\r\n<!-- results:start -->\r\nold\r\n<!-- results:end -->\r\nEnd\r\n"
    )
    link = tmp_path / "README.md"
    link.symlink_to(readme)
    table = cu.update_readme_results(tmp_path / "no-results", link)
    text = readme.read_bytes()
    assert link.is_symlink() and text.startswith(b"# Title\r\n<!-- results:start -->\r\n")
    assert text.endswith(b"\r\n<!-- results:end -->\r\nEnd\r\n")
    assert b"\n" not in text.replace(b"\r\n", b"")  # every line end still CRLF
    assert table.splitlines()[0].encode() in text


def test_a_link_to_a_device_or_pipe_is_never_replaced(tmp_path):
    """``results/x.json -> /dev/null`` throws an output away; replacing the target with a file
    (as root: /dev/null itself) would not. A pipe stands in for the device here."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    link = tmp_path / "results.json"
    link.symlink_to(pipe)
    with pytest.raises(FileExistsError, match="is not a regular file"):
        cu.write_json(link, {"a": 1})
    assert stat.S_ISFIFO(pipe.stat().st_mode) and link.is_symlink()
