"""Verifying a bundle folder or zip: every file against the manifest, then the recorded answer again."""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from exporters.bundle.check import answer_check
from exporters.bundle.files import copy_stream, file_entries
from exporters.bundle.layout import BUNDLE_SCHEMA_VERSION, MANIFEST_FILE
from workbench.errors import WorkbenchError
from workbench.generation.runtime import user_errors
from workbench.jobs import Cancelled, Progress, never_cancelled, no_progress
from workbench.run.folders import load_versioned_json
from workbench.units import format_size


@dataclass(frozen=True)
class CheckResult:
    name: str  # files | answer
    ok: bool
    detail: str


@dataclass
class VerifyResult:
    bundle: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def verify_bundle(
    path: Path,
    *,
    provider: str = "cpu",
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> VerifyResult:
    """Check a bundle folder or zip against its manifest: files first, then the recorded answer.

    A zip is extracted into a temporary folder, refusing any entry that would land outside it.
    """
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"{path} does not exist. Give a bundle folder or a .zip made by `int4-workbench bundle`.")
    if path.is_dir():
        return _verify_folder(path, str(path), provider, progress, cancelled)
    if not zipfile.is_zipfile(path):
        raise WorkbenchError(f"{path} is neither a folder nor a zip file. Give a bundle made by `int4-workbench bundle`.")
    with tempfile.TemporaryDirectory(prefix="int4-verify-") as temporary:
        root = safe_extract(path, Path(temporary), progress)
        return _verify_folder(root, str(path), provider, progress, cancelled)


def safe_extract(archive_path: Path, dest: Path, progress: Progress = no_progress) -> Path:
    """Extract a zip into `dest` after checking every entry; return the folder holding the manifest."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = archive.infolist()
            for member in members:
                problem = unsafe_member(member)
                if problem:
                    raise WorkbenchError(
                        f"{archive_path.name} holds an unsafe entry {member.filename!r} ({problem}); nothing was "
                        "extracted. Do not use this file; get the bundle again from whoever made it."
                    )
            needed = sum(m.file_size for m in members)
            free = shutil.disk_usage(dest).free
            if needed > free:
                raise WorkbenchError(
                    f"Extracting {archive_path.name} needs {format_size(needed)}; {format_size(free)} are free in "
                    f"{dest}. Free some space, or unzip it yourself and verify the folder."
                )
            root = dest.resolve()
            for index, member in enumerate(members):
                target = (root / member.filename).resolve()
                if root not in target.parents:  # unsafe_member should have caught it; never write outside
                    raise WorkbenchError(f"{archive_path.name}: {member.filename!r} would land outside the folder.")
                progress(index / max(len(members), 1) * 0.2, f"unzipping {PurePosixPath(member.filename).name}")
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as reader, open(target, "wb") as writer:
                    copy_stream(reader, writer.write)
    except zipfile.BadZipFile as error:
        raise WorkbenchError(f"{archive_path.name} is a damaged zip file ({error}). Get the bundle again.") from error
    if (dest / MANIFEST_FILE).is_file():
        return dest
    tops = [p for p in dest.iterdir()]
    if len(tops) == 1 and (tops[0] / MANIFEST_FILE).is_file():
        return tops[0]
    raise WorkbenchError(f"{archive_path.name} holds no {MANIFEST_FILE}; it is not a bundle made by `int4-workbench bundle`.")


def unsafe_member(member: zipfile.ZipInfo) -> str | None:
    """Why extracting this entry could write outside the target folder; None when it cannot."""
    name = member.filename
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if "\\" in name:
        return "a backslash in the path"
    if ".." in PurePosixPath(name).parts:
        return "a path that climbs out with '..'"
    if stat.S_ISLNK(member.external_attr >> 16):
        return "a symbolic link"
    return None


def _verify_folder(root: Path, label: str, provider: str, progress: Progress, cancelled: Cancelled) -> VerifyResult:
    manifest = load_manifest(root)
    result = VerifyResult(label)
    result.checks.append(_check_files(root, manifest, progress, cancelled))
    if not result.checks[0].ok:
        result.checks.append(CheckResult("answer", False, "not run: the files do not match the manifest"))
        return result
    progress(0.8, "answering the check prompt")
    settings = json.loads((root / manifest["layout"]["runner_settings"]).read_text(encoding="utf-8"))
    recorded = manifest["check"]
    with user_errors():
        again = answer_check(root, settings, recorded["prompt"], recorded["max_new_tokens"], provider)
    result.checks.append(_compare_answers(recorded, again))
    progress(1.0, "done")
    return result


def load_manifest(root: Path) -> dict:
    path = root / MANIFEST_FILE
    manifest = load_versioned_json(
        path,
        BUNDLE_SCHEMA_VERSION,
        missing=f"{root} has no {MANIFEST_FILE}; it is not a bundle made by `int4-workbench bundle`.",
        remedy="get the bundle again",
        other_version="Verify it with the workbench version that made it.",
    )
    for entry in manifest["files"]:
        if PurePosixPath(entry["path"]).is_absolute() or ".." in PurePosixPath(entry["path"]).parts:
            raise WorkbenchError(f"{path} lists {entry['path']!r}, outside the bundle; do not use this bundle.")
    return manifest


def _check_files(root: Path, manifest: dict, progress: Progress, cancelled: Cancelled) -> CheckResult:
    listed = {e["path"]: e for e in manifest["files"]}
    found = {e["path"]: e for e in file_entries(root, lambda f, m: progress(0.2 + 0.6 * f, m), cancelled)}
    problems = [f"{p} is missing" for p in sorted(listed.keys() - found.keys())]
    problems += [f"{p} is not part of the bundle" for p in sorted(found.keys() - listed.keys())]
    for key in sorted(listed.keys() & found.keys()):
        if listed[key]["bytes"] != found[key]["bytes"]:
            problems.append(f"{key} has {found[key]['bytes']:,} bytes, the manifest says {listed[key]['bytes']:,}")
        elif listed[key]["sha256"] != found[key]["sha256"]:
            problems.append(f"{key} was changed (its SHA-256 differs from the manifest's)")
    if problems:
        return CheckResult(
            "files", False, "; ".join(problems) + ". Do not use this bundle: get it again from whoever made it."
        )
    return CheckResult("files", True, f"{len(listed)} files match their SHA-256 checksums")


def _compare_answers(recorded: dict, again: dict) -> CheckResult:
    if again["prompt_ids"] != recorded["prompt_ids"]:
        return CheckResult("answer", False, "the check prompt no longer gives the recorded token ids")
    expected, got = recorded["tokens"], again["tokens"]
    if got == expected:
        return CheckResult(
            "answer", True, f"{len(got)} greedy tokens equal the recorded answer ({again['provider']}): {again['text']!r}"
        )
    first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return CheckResult(
        "answer", False,
        f"the answer differs from the recorded one from token {first} on (recorded {recorded['text']!r} on "
        f"{recorded['provider']}, now {again['text']!r} on {again['provider']}). With every file intact this means "
        "another ONNX Runtime version or processor rounds differently: compare on the machine and provider that "
        "made the bundle.",
    )
