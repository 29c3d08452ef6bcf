"""Generated artifacts are readable by other users (issue 17, item 7): builds, checkpoints
and Triton model repositories get the modes a plain ``open``/``mkdir`` would give under the
process umask (0644 files, 0755 directories under umask 022), never mkstemp's 0600 or
mkdtemp's 0700, so a Triton container running as another user can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from onetrans_trt.io import atomic_directory, atomic_path, atomic_write_text, current_umask


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        if not p.is_symlink():
            out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def _wrong(root: Path, umask: int) -> dict[str, str]:
    """Entries whose mode is not the umask's default (files 0666 & ~umask, dirs 0777 & ~umask)."""
    bad = {}
    for rel, mode in _modes(root).items():
        want = (0o777 if (root / rel).is_dir() else 0o666) & ~umask
        if mode != want:
            bad[rel] = f"{mode:04o} (want {want:04o})"
    return bad


def test_current_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_helpers_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir()
            atomic_write_text(tmp / "sub" / "f.txt", "y")
        with atomic_directory(tmp_path / "d", force=True) as tmp:  # the replacing path too
            atomic_write_text(tmp / "g.txt", "z")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o666 & ~umask
    assert _wrong(tmp_path / "d", umask) == {}


def test_checkpoint_build_and_repository_are_readable(tiny_ckpt, tiny_build, tmp_path):
    """A real export build and checkpoint (the session's, written under the process umask)
    and a checkpoint and serve-repo output written here under umask 022: every file and
    directory has the umask's default mode (before the fix: 0600 files, 0700 directories)."""
    from onetrans_trt.models.checkpoint import load_checkpoint, save_checkpoint
    from onetrans_trt.runtime.triton_repo import write_repository

    for root in (tiny_ckpt, tiny_build):
        assert _wrong(root, current_umask()) == {}, root
    ck, repo = tmp_path / "ck", tmp_path / "repo"
    old = os.umask(0o022)
    try:
        save_checkpoint(load_checkpoint(tiny_ckpt), ck)
        write_repository(tiny_build, repo)
    finally:
        os.umask(old)
    for root in (ck, repo):
        assert _wrong(root, 0o022) == {}, root.name
    assert stat.S_IMODE((ck / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((repo / "lineage.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(repo.stat().st_mode) == 0o755


def test_a_library_writing_0600_inside_a_directory_is_made_readable(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            fd = os.open(tmp / "secret.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors does
            os.close(fd)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)  # execute bits are kept, read bits added
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d" / "secret.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d" / "run.sh").stat().st_mode) == 0o755
