"""The repository stands on its own: no file sends the reader outside it.

A clone holds only what git tracks. A pointer to a sibling checkout, to a folder on the machine
the project was developed on, or to developer notes that are not in the repository is a dead end
for a user; the facts such pointers stood for live in ``docs/`` (methods.md, evaluation.md,
install.md, CLUSTER.md, FAILURES.md). Every tracked text file is read; each offending line is
named as ``path:line``. Pointers to ``docs/*.md`` must name files that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Spelled in parts, so that this file does not match itself.
OUTSIDE_PATHS = ("../" + "shared", "/work/" + "shared")
NOTE_NAMES = tuple(
    stem + ".md"
    for stem in (
        "METHODS",
        "DESIGN",
        "EVALUATION",
        "ENVIRONMENT",
        "STYLE",
        "MISSION",
        "OFFICIAL_" + "AUDIT",
    )
)
# A repository-relative link into docs/ (not part of a longer path or a URL).
DOCS_LINK = re.compile(r"(?<![\w/.-])docs/[\w/.-]*\w\.md\b")
# Outside git (an unpacked archive): walk the tree, skipping what .gitignore keeps out of git.
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "results"}
SKIP_DIRS |= {"outputs", "multirun", "mlruns"}


def tracked_files(root: Path) -> list[Path]:
    """Files git tracks plus untracked ones it does not ignore (new files before their commit);
    outside a git checkout, every file under ``root`` except build and run outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return [Path(n) for n in sorted(set(names)) if (root / n).is_file()]


def text_lines(path: Path) -> list[str]:
    """The lines of a text file; nothing for a binary one (a NUL byte in its first 8 KiB)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return []
    return data.decode("utf-8", errors="replace").splitlines()


def outside_references(root: Path, files: list[Path]) -> list[str]:
    """``path:line: text`` for every line of ``files`` that points outside the repository. A
    note's name is allowed once a file of that name is part of the repository."""
    present = {f.name for f in files}
    names = [n for n in NOTE_NAMES if n not in present]
    note = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")") if names else None
    found = []
    for f in files:
        for i, line in enumerate(text_lines(root / f), start=1):
            if any(p in line for p in OUTSIDE_PATHS) or (note and note.search(line)):
                found.append(f"{f.as_posix()}:{i}: {line.strip()[:120]}")
    return found


def missing_doc_links(root: Path, files: list[Path]) -> list[str]:
    """``path:line: link`` for every link into ``docs/`` whose file does not exist."""
    found = []
    for f in files:
        for i, line in enumerate(text_lines(root / f), start=1):
            for link in DOCS_LINK.findall(line):
                if not (root / link).is_file():
                    found.append(f"{f.as_posix()}:{i}: {link}")
    return found


def test_no_file_points_outside_the_repository():
    files = tracked_files(ROOT)
    assert len(files) > 50, f"found only {len(files)} files under {ROOT}"
    found = outside_references(ROOT, files)
    assert not found, (
        f"{len(found)} line(s) point outside the repository (a clone does not have what they "
        "name; put the fact into docs/ and point there):\n" + "\n".join(found)
    )


def test_every_link_into_docs_names_a_file_that_exists():
    found = missing_doc_links(ROOT, tracked_files(ROOT))
    assert not found, f"{len(found)} link(s) into docs/ name no file:\n" + "\n".join(found)


def test_the_scan_names_each_offending_file_and_line(tmp_path):
    """The checks above can fail: planted references are found, and only those."""
    note, other = NOTE_NAMES[0], NOTE_NAMES[1]
    ours, gone = "docs" + "/methods.md", "docs" + "/gone.md"  # in parts: see DOCS_LINK
    (tmp_path / "docs").mkdir()
    (tmp_path / ours).write_text("# our own doc\n")
    (tmp_path / "a.py").write_text(f"x = 1\n# see {OUTSIDE_PATHS[0]}/notes\n# {ours}\n")
    (tmp_path / "b.yaml").write_text(f"# from {note}\nk: 1  # {OUTSIDE_PATHS[1]}/y\n")
    (tmp_path / "c.md").write_text(f"{other.lower()} and NOT{note} and {gone}\n")
    (tmp_path / "d.pt").write_bytes(b"\0binary " + OUTSIDE_PATHS[0].encode())
    files = [Path(n) for n in ("a.py", "b.yaml", "c.md", "d.pt", ours)]

    found = [line.split(": ", 1)[0] for line in outside_references(tmp_path, files)]
    assert found == ["a.py:2", "b.yaml:1", "b.yaml:2"]
    # Once the repository holds a file of that name, pointing to it is fine.
    (tmp_path / note).write_text("# tracked here\n")
    found = [line.split(": ", 1)[0] for line in outside_references(tmp_path, [*files, Path(note)])]
    assert found == ["a.py:2", "b.yaml:2"]

    assert missing_doc_links(tmp_path, files) == [f"c.md:1: {gone}"]
