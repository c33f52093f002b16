"""The checkpoint's hash written into every image's metadata (A1111's short form: the first
characters of the file's SHA-256), computed off the main thread where the CLI can overlap it."""
import hashlib
import os
import re
from typing import Union

from ldm.background import InBackground

PathLike = Union[str, os.PathLike]
SHORT_HASH_LEN = 10


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces; of a diffusers pipeline folder,
    the SHA-256 of its weights files' names and digests, part by part."""
    from ldm.diffusers_layout import is_pipeline_folder, pipeline_files
    if is_pipeline_folder(path):
        listing = "".join(f"{file.relative_to(path)}:{file_sha256(file, chunk)}\n"
                          for files in pipeline_files(path).values() for file in files)
        return hashlib.sha256(listing.encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


class BackgroundShortHash(InBackground):
    """:func:`short_hash` of a file, computed in a daemon thread started at once: file reads and
    hashlib release the GIL, so hashing a 5 GB checkpoint (3.5 s) overlaps loading and sampling.
    :meth:`result` waits for it (and re-raises its error)."""

    def __init__(self, path: PathLike):
        super().__init__(short_hash, path, name="checkpoint-sha256")


_HEX64 = re.compile(r"[0-9a-f]{64}")


def short_hash(path_or_digest: Union[PathLike, str], chunk: int = 1 << 20) -> str:
    """First :data:`SHORT_HASH_LEN` hex chars of a file's SHA-256.

    Accepts a file path, or an already computed 64-char hex digest.
    """
    if (
        isinstance(path_or_digest, str)
        and _HEX64.fullmatch(path_or_digest)
        and not os.path.exists(path_or_digest)
    ):
        return path_or_digest[:SHORT_HASH_LEN]
    return file_sha256(path_or_digest, chunk)[:SHORT_HASH_LEN]
