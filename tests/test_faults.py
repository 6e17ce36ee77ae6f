"""Operating-system faults and bad names through the real `pope` command: one line on stderr, exit status 2, and
nothing lost (no half-written DIR, no leftover temporary folder, an existing finished DIR untouched, a folder the
program did not write never deleted)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import small_tmpfs
from data_prep.contract import DONE, read_manifest
from launch.cli import main as pope_main

ROOT = Path(__file__).resolve().parent.parent
INDIRECT = ["prep", "indirect", "--val", "10", "--test", "10", "--workers", "1", "--no-progress"]


def pope(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`pope ARGS...` as a user runs it: a fresh process of `python -m launch.cli`."""
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def as_unprivileged(*args: str, preload: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """`pope ARGS...` in a fresh process that runs as `nobody` when the tests run as root.

    The interpreter lives where only root may enter (/root/.pyenv here), so the process starts as root, imports
    what the command needs, drops to nobody (groups, gid, uid: no way back), then runs the real `pope` main.
    """
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        drop = f"os.setgroups([]); os.setgid({user.pw_gid}); os.setuid({user.pw_uid}); assert os.geteuid() != 0"
    else:
        drop = "pass"  # already unprivileged: permissions apply as they are
    code = textwrap.dedent(f"""
        import os, sys
        import launch.cli, data_prep.indirect, data_prep.parallel, data_prep.shards, data_prep.mds
        {preload}
        data_prep.mds.import_streaming()
        {drop}
        sys.exit(launch.cli.main({list(args)!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "POPE_DEBUG": ""})


def one_line_error(proc_or_err: subprocess.CompletedProcess | str, returncode: int | None = 2) -> str:
    """The single `pope: error: ...` line (asserts there is exactly one line and no traceback)."""
    if isinstance(proc_or_err, str):
        err = proc_or_err
    else:
        assert proc_or_err.returncode == returncode, (proc_or_err.returncode, proc_or_err.stderr)
        err = proc_or_err.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pope: error: "), err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Path:
    """A 1 MiB tmpfs: a real file system that fills up."""
    with small_tmpfs(tmp_path / "fs", "1m") as mount:
        yield mount


def test_disk_full_is_one_line_and_keeps_the_finished_output(tiny_fs, capsys):
    out = tiny_fs / "ind"
    assert pope_main([*INDIRECT, "--train", "100", "--out", str(out)]) == 0
    before = snapshot(tiny_fs)
    # ~1.6 MB of samples into 1 MiB: the shard writer meets ENOSPC. A fresh process, exactly as a user runs it.
    proc = pope(*INDIRECT, "--train", "20000", "--out", str(out), "--overwrite")
    assert one_line_error(proc) == f"pope: error: no space left on device while writing {out}"
    assert snapshot(tiny_fs) == before  # the finished DIR untouched, the temporary folder gone
    fresh = tiny_fs / "fresh"
    capsys.readouterr()
    assert pope_main([*INDIRECT, "--train", "20000", "--workers", "2", "--out", str(fresh)]) == 2
    assert one_line_error(capsys.readouterr().err) == f"pope: error: no space left on device while writing {fresh}"
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["ind"]


def test_disk_full_during_merge_is_one_line(tiny_fs, tmp_path, capsys):
    parts = []
    for index in range(2):  # prepared on the big disk; the merge copies them onto the full one
        parts.append(tmp_path / f"part{index}")
        assert pope_main([*INDIRECT, "--train", "20000", "--num-shards", "2", "--shard-index", str(index),
                          "--out", str(parts[-1])]) == 0
    out = tiny_fs / "merged"
    capsys.readouterr()
    assert pope_main(["prep", "merge", "--out", str(out), *map(str, parts)]) == 2
    assert one_line_error(capsys.readouterr().err) == f"pope: error: no space left on device while writing {out}"
    assert list(tiny_fs.iterdir()) == [] and all((p / DONE).is_file() for p in parts)


def test_an_output_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    for extra in ([], ["--overwrite"]):
        assert pope_main([*INDIRECT, "--train", "50", "--out", str(target), *extra]) == 2
        assert "is a file, not a folder" in one_line_error(capsys.readouterr().err)
    assert pope_main([*INDIRECT, "--train", "50", "--out", str(target / "sub")]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        f"pope: error: cannot create the output {target / 'sub'}: {target} is a file, not a folder")
    assert target.read_text() == "keep me\n" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_only_a_prep_output(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text("{}")  # a manifest.json, but not one `pope prep` wrote
    (fake / "DONE").write_text("{}")
    for folder in (mine, fake):
        before = snapshot(folder)
        for extra in ([], ["--overwrite"]):
            assert pope_main([*INDIRECT, "--train", "50", "--out", str(folder), *extra]) == 2
            line = one_line_error(capsys.readouterr().err)
            assert str(folder) in line and "not a prep output" in line and "refusing" in line
        assert snapshot(folder) == before
    out = tmp_path / "prep"
    assert pope_main([*INDIRECT, "--train", "50", "--out", str(out)]) == 0
    assert pope_main([*INDIRECT, "--train", "60", "--out", str(out), "--overwrite"]) == 0  # a prep output: replaced
    assert read_manifest(out)["splits"]["train"]["samples"] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "mine", "prep"]


@pytest.fixture
def shared_dir() -> Path:
    """A folder every user may enter (pytest's tmp_path lies in a folder private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="pope-faults-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_folder_without_write_permission_is_one_line(shared_dir):
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o755)  # others may read and enter it, not write in it
    proc = as_unprivileged(*INDIRECT, "--train", "50", "--out", str(locked / "out"))
    assert one_line_error(proc) == f"pope: error: cannot write the output {locked / 'out'}: no write permission in " \
                                   f"{locked}"
    assert list(locked.iterdir()) == []


def test_os_errors_of_any_subcommand_are_one_line_naming_the_path(shared_dir):
    secret = shared_dir / "secret.yaml"
    secret.write_text("name: x\n")
    secret.chmod(0o600)  # readable by its owner only
    proc = as_unprivileged("config", str(secret), preload="import torch, pipeline.model")
    assert one_line_error(proc) == f"pope: error: permission denied: {secret}"


def test_real_faults_keep_their_traceback(shared_dir, tmp_path):
    # EIO is not the user's to fix: a failing disk, or a bug. Reading /proc/self/mem at offset 0 gives it for real.
    proc = pope("config", "/proc/self/mem")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "Input/output error" in proc.stderr
    # POPE_DEBUG=1 shows the traceback of a user error too
    target = tmp_path / "file"
    target.write_text("")
    proc = pope(*INDIRECT, "--train", "50", "--out", str(target), env={"POPE_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "is a file, not a folder" in proc.stderr


def test_missing_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    missing = tmp_path / "missing"
    fasta = tmp_path / "g.fa"
    fasta.write_text(">chr1\nACGT\n")
    out = ["--out", str(tmp_path / "out"), "--no-progress", "--workers", "1"]
    for args, fragment in [
        (["prep", "text", "--input", str(missing)], f"input {missing} does not exist"),
        (["prep", "genome", "--fasta", str(missing), "--val-chroms", "chr1"], f"no such file or folder: {missing}"),
        (["prep", "genome", "--fasta", str(fasta), "--bed", str(missing)], f"no such file or folder: {missing}"),
        (["prep", "jsb", "--input", str(missing)], f"{missing} does not exist"),
        (["prep", "midi", "--input", str(missing)], f"{missing} does not exist"),
    ]:
        assert pope_main(args + out) == 2, args
        assert fragment in one_line_error(capsys.readouterr().err)
    assert pope_main(["prep", "merge", "--out", str(tmp_path / "out"), str(missing)]) == 2
    assert f"{missing} does not exist" in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.fa"]


def test_a_non_utf8_file_name_in_a_text_folder_is_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}." * 3 for i in range(30)]
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(doc)
    bad = os.path.join(os.fsencode(folder), b"caf\xe9.txt")  # Latin-1 bytes: not a UTF-8 name
    with open(bad, "wb") as handle:
        handle.write(b"a document nobody can name\n")
    out = tmp_path / "out"
    base = ["prep", "text", "--input", str(folder), "--out", str(out), "--vocab-size", "300", "--seq-len", "32",
            "--val-fraction", "0", "--workers", "1", "--no-progress"]
    assert pope_main(base) == 2  # 1 of 31 inputs is more than the default 1%
    assert "1 of 31 inputs are bad" in one_line_error(capsys.readouterr().err) and not out.exists()
    assert pope_main(base + ["--max-skip-fraction", "0.1"]) == 0
    manifest = read_manifest(out)
    assert manifest["skipped"] == [{"file": "caf\\xe9.txt", "reason": "file name is not valid UTF-8 (rename it to "
                                                                      "include it)"}]
    assert manifest["items"] == 31
    from data_prep.tokenizers import load_tokenizer
    from data_prep.mds import read_split
    import numpy as np

    tokenizer = load_tokenizer(out)
    stream = np.concatenate([s.astype(np.int64) for s in read_split(out / "train")])
    cuts = np.flatnonzero(stream == tokenizer.info.eos)
    assert [tokenizer.decode(p[:-1]) for p in np.split(stream, cuts + 1)[:-1]] == docs
    # a shard other than the first does not list it again, so merged parts list it once
    model = out / "tokenizer" / "spm.model"
    part = tmp_path / "part1"
    assert pope_main(["prep", "text", "--input", str(folder), "--out", str(part), "--tokenizer-model", str(model),
                      "--num-shards", "2", "--shard-index", "1", "--max-skip-fraction", "0.1", "--seq-len", "32",
                      "--workers", "1", "--no-progress"]) == 0
    assert read_manifest(part)["skipped"] == []
    json.dumps(manifest)  # the manifest stays plain JSON
