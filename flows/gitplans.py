"""The plan catalog as it was at a git revision: what `billrun impact` compares the working tree with.

git runs as a subprocess with an argument list (never a shell string), in the plans folder, and only
reads: `rev-parse` finds the repository, the folder's place in it and the commit the revision names;
`ls-tree` and `cat-file` read the folder's plan files at that commit. The files are parsed from
memory with the same checks as `load_catalog`, and named `REV:plans/api-v1.yaml` in errors. Nothing
here imports Prefect, so the command line checks a revision before anything slow starts.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from transforms.errors import InputError
from transforms.inputs.plans import Catalog, PlanError, parse_plan

PLAN_SUFFIXES = (".yaml", ".yml")
"""The files `load_catalog` reads (top level of the folder only)."""


@dataclass(frozen=True)
class Revision:
    """A revision of the plans folder: as given (`origin/main`), the commit it names, and the
    folder's path inside the repository (`plans/`; empty when the folder is the repository)."""

    given: str
    commit: str
    folder: str
    repository: Path

    @property
    def short(self) -> str:
        return self.commit[:12]


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise InputError("git is not installed (impact reads the base plans from git)") from None


def _first_line(process: subprocess.CompletedProcess) -> str:
    lines = process.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[0] if lines else f"git exited with {process.returncode}"


def revision(plans: str, rev: str) -> Revision:
    """The commit `rev` names in the repository holding the plans folder; refused, one line, when
    the folder is not in a git working tree or the repository has no such revision."""
    folder = Path(plans)
    if not folder.is_dir():
        raise InputError(f"--plans {plans}: no such folder (pass --plans with the folder of plan files, *.yaml)")
    if not rev or rev.startswith("-") or any(c in rev for c in "\n\r\0"):
        raise InputError(f"--base {rev!r} is not a revision (a branch, tag or commit, e.g. origin/main)")
    inside = _git(["rev-parse", "--is-inside-work-tree"], folder)
    if inside.returncode != 0 or inside.stdout.strip() != b"true":
        # git's own reason when it is not the plain one (a repository owned by another user, say)
        why = _first_line(inside) if inside.returncode != 0 else ""
        detail = f" ({why})" if why and "not a git repository" not in why else ""
        raise InputError(f"--plans {plans}: not inside a git working tree{detail}, so there is no --base {rev} to "
                         f"compare with (impact compares the plans at a git revision with the folder as it is)")
    top = _git(["rev-parse", "--show-toplevel"], folder)
    prefix = _git(["rev-parse", "--show-prefix"], folder)
    commit = _git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], folder)
    if commit.returncode != 0:
        shallow = _git(["rev-parse", "--is-shallow-repository"], folder).stdout.strip() == b"true"
        hint = ("the clone is shallow: fetch the history (git fetch --unshallow, or fetch-depth: 0 in CI)"
                if shallow else "fetch it first, e.g. git fetch origin main")
        raise InputError(f"--base {rev}: no such revision in {top.stdout.decode().strip()} ({hint})")
    return Revision(rev, commit.stdout.decode().strip(), prefix.stdout.decode().strip(),
                    Path(top.stdout.decode().strip()))


def catalog_at(plans: str, rev: Revision) -> Catalog:
    """The plan files of the folder at the revision, checked alone and together as `load_catalog`
    checks a folder."""
    where = f"{rev.given}:{rev.folder}"
    listing = _git(["ls-tree", "-z", "--full-tree", "--end-of-options", f"{rev.commit}:{rev.folder}"], Path(plans))
    if listing.returncode != 0:
        raise InputError(f"--base {rev.given}: the plans folder {rev.folder or './'} does not exist at {rev.given} "
                         f"({rev.short}); nothing to compare with")
    files = []
    for entry in sorted(e for e in listing.stdout.split(b"\0") if e):
        meta, _, name_bytes = entry.partition(b"\t")
        mode, kind, obj = meta.decode().split()
        name = name_bytes.decode("utf-8", "replace")
        # regular files only: a symlink's target or a submodule is not a plan file of this commit
        if kind != "blob" or mode not in ("100644", "100755") or not name.endswith(PLAN_SUFFIXES):
            continue
        blob = _git(["cat-file", "blob", obj], Path(plans))
        if blob.returncode != 0:
            raise InputError(f"--base {rev.given}: cannot read {where}{name} ({_first_line(blob)})")
        try:
            text = blob.stdout.decode("utf-8")
        except UnicodeDecodeError:
            raise PlanError(f"{where}{name}: not UTF-8 text") from None
        files.append(parse_plan(text, f"{where}{name}"))
    if not files:
        raise PlanError(f"{where}: no plan files (*.yaml) at {rev.given} ({rev.short})")
    return Catalog.from_files(files)
