"""The commit of a checkpoint step: orbax's atomic rename, with a checksum manifest written
just before it, and the checks of a committed step against that manifest.

Orbax (0.12) has no checksums: a truncated or garbage file surfaces as an
obscure decoding error, or a hang, inside its reader. So the temporary
directory of each step gets a manifest, ``COMMIT`` (every file's size and
crc32), right before orbax renames it into place, and a restore checks each
listed file before orbax reads it. The fault hooks of the reliability tests
(`diffusers_unified.faults`) run at the same point.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from pathlib import Path

from orbax.checkpoint._src.path import atomicity

from diffusers_unified import faults

logger = logging.getLogger("diffusers_unified")

COMMIT_FILE = "COMMIT"
MANIFEST_FORMAT = "diffusers_unified.checkpoint/2"
# Orbax's commit rewrites its step metadata after the manifest is written, and writes
# its commit marker after it: neither can be in the manifest.
UNLISTED = ("_CHECKPOINT_METADATA", "commit_success.txt")
ORBAX_COMMITTED = ("_CHECKPOINT_METADATA", "commit_success.txt")

_CHUNK = 1 << 20


def is_step_name(name: str) -> bool:
    return name.isascii() and name.isdigit()


def file_digest(path: Path) -> tuple[int, str]:
    """(size, crc32 hex) of a file."""
    crc = size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def committed(path: Path) -> bool:
    """Whether a step directory carries a manifest or orbax's marks of a finished commit.

    An interrupted deletion or a stray directory with a step's name has neither.
    """
    return any((path / m).exists() for m in (COMMIT_FILE, *ORBAX_COMMITTED))


def write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class SaveContext:
    """What the commit of the save in flight needs (one save at a time per process)."""

    current: SaveContext | None = None
    errors: dict[str, BaseException] = {}  # final path -> error raised inside its commit
    lock = threading.Lock()

    def __init__(self, typed_keys: list):
        self.typed_keys = typed_keys
        self.faults = faults.SaveFaults()
        self.start = time.perf_counter()


class ManifestTemporaryPath(atomicity.AtomicRenameTemporaryPath):
    """Orbax's atomic-rename commit, with this package's manifest written just before it.

    Orbax finalizes each item's directory and then the step's; only the
    step's (whose final name is the step number) gets the manifest and the
    fault hooks.
    """

    async def finalize(self, *args, **kwargs):
        final, tmp = Path(self.get_final()), Path(self.get())
        context = SaveContext.current
        if not is_step_name(final.name) or context is None:
            return await super().finalize(*args, **kwargs)
        try:
            context.faults.maybe_raise(tmp / "state")
            nbytes = write_manifest(tmp, int(final.name), context.typed_keys)
            context.faults.at("before_commit")
            await super().finalize(*args, **kwargs)  # the commit point: orbax's rename
        except BaseException as err:
            with SaveContext.lock:
                SaveContext.errors[str(final)] = err
            raise
        logger.info(
            "saved checkpoint step %s to %s (%d bytes, %.2f s)",
            final.name,
            final,
            nbytes,
            time.perf_counter() - context.start,
        )
        context.faults.at("after_commit_before_cleanup")


def write_manifest(tmp: Path, step: int, typed_keys: list) -> int:
    files = {}
    for root, _dirs, names in os.walk(tmp):
        for name in sorted(names):
            path = Path(root, name)
            rel = path.relative_to(tmp).as_posix()
            if rel in UNLISTED:
                continue
            size, crc = file_digest(path)
            files[rel] = {"bytes": size, "crc32": crc}
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "created_unix": time.time(),
        "files": dict(sorted(files.items())),
        "typed_keys": typed_keys,
    }
    write_durably(tmp / COMMIT_FILE, json.dumps(manifest, indent=1))
    return sum(f["bytes"] for f in files.values())


class Corrupt(Exception):
    """A committed step whose files do not match its manifest."""

    def __init__(self, step: int, file: str, reason: str):
        super().__init__(f"file {file!r} {reason}")
        self.step, self.file, self.reason = step, file, reason


def read_manifest(step_dir: Path, step: int) -> dict | None:
    """The step's manifest; None for a step that plain orbax wrote (no manifest)."""
    path = step_dir / COMMIT_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise Corrupt(step, COMMIT_FILE, f"is unreadable ({err})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise Corrupt(step, COMMIT_FILE, f"is not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify_file(step_dir: Path, step: int, manifest: dict, rel: str) -> None:
    """Raises `Corrupt` unless file `rel` of the step has its manifest's size and crc32."""
    entry = manifest["files"].get(rel)
    if rel.startswith("/") or ".." in rel.split("/") or not isinstance(entry, dict):
        raise Corrupt(step, COMMIT_FILE, f"has an invalid entry for {rel!r}")
    try:
        size, crc = file_digest(step_dir / rel)
    except FileNotFoundError:
        raise Corrupt(step, rel, "is missing") from None
    except OSError as err:
        raise Corrupt(step, rel, f"cannot be read ({err})") from None
    if size != entry.get("bytes"):
        raise Corrupt(
            step, rel, f"has {size} bytes, expected {entry.get('bytes')} (truncated or altered)"
        )
    if crc != entry.get("crc32"):
        raise Corrupt(step, rel, f"fails its crc32 check ({crc}, expected {entry.get('crc32')})")
