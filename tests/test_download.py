"""Downloading the Omniglot archives into the cache, against a local HTTP server serving synthetic archives."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedmeta.data import omniglot
from fedmeta.errors import FedmetaError

from conftest import REPO, write_archive

NAME = "images_background_small1.zip"


class Mirror:
    """An HTTP server on 127.0.0.1 serving `files` (name → bytes), counting the requests it answers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                mirror.requests.append(self.path)
                body = mirror.files.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/omniglot/python"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture()
def mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    m = Mirror()
    m.thread.start()
    monkeypatch.setenv(omniglot.URL_ENV, m.url)
    yield m
    m.server.shutdown()
    m.server.server_close()
    m.thread.join(timeout=10)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("served") / NAME
    return write_archive(path, "images_background_small1", {"Alpha": 3}, drawings=2).read_bytes()


def md5_of(data: bytes) -> dict[str, str]:
    return {NAME: hashlib.md5(data).hexdigest()}


def test_a_good_download_is_accepted_cached_and_readable(mirror: Mirror, archive: bytes, tmp_path: Path) -> None:
    mirror.files[NAME] = archive
    cache = tmp_path / "data/raw/omniglot"
    (path,) = omniglot.fetch_archives("download", [NAME], cache, md5=md5_of(archive))
    assert path == cache / NAME and path.read_bytes() == archive
    assert mirror.requests == [f"/omniglot/python/{NAME}"]
    assert sorted(p.name for p in cache.iterdir()) == [NAME]  # no temporary file left beside it
    assert len(omniglot.load_omniglot([path], rotations=False).class_names) == 3
    omniglot.fetch_archives("download", [NAME], cache, md5=md5_of(archive))
    assert len(mirror.requests) == 1  # the second time the cache answers


def test_a_corrupted_download_is_refused_by_its_checksum_and_nothing_is_kept(
    mirror: Mirror, archive: bytes, tmp_path: Path
) -> None:
    mirror.files[NAME] = archive[:-100] + bytes(100)
    cache = tmp_path / "cache"
    with pytest.raises(FedmetaError) as err:
        omniglot.fetch_archives("download", [NAME], cache, md5=md5_of(archive))
    message = str(err.value)
    assert "\n" not in message and NAME in message and "MD5" in message and md5_of(archive)[NAME] in message
    assert list(cache.iterdir()) == []


def test_a_missing_file_on_the_server_names_the_url_and_the_offline_remedy(mirror: Mirror, tmp_path: Path) -> None:
    with pytest.raises(FedmetaError) as err:
        omniglot.fetch_archives("download", [NAME], tmp_path / "cache")
    message = str(err.value)
    assert (
        "\n" not in message
        and mirror.url in message
        and "HTTPError" in message
        and "copy or link the archives" in message
    )
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_archive_placed_in_the_cache_is_used_without_a_download(
    mirror: Mirror, archive: bytes, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "elsewhere.zip").write_bytes(archive)
    (cache / NAME).symlink_to(tmp_path / "elsewhere.zip")
    assert omniglot.fetch_archives("download", [NAME], cache, md5=md5_of(archive)) == [cache / NAME]
    assert mirror.requests == []


def test_a_wrong_archive_in_the_cache_is_refused_not_replaced(mirror: Mirror, archive: bytes, tmp_path: Path) -> None:
    mirror.files[NAME] = archive
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / NAME).write_bytes(b"not the archive")
    with pytest.raises(
        FedmetaError, match=r"MD5 .* differs from the public archive's .*delete it to download it again"
    ):
        omniglot.fetch_archives("download", [NAME], cache, md5=md5_of(archive))
    assert (cache / NAME).read_bytes() == b"not the archive" and mirror.requests == []


def test_a_download_larger_than_any_archive_is_refused(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(omniglot, "MAX_DOWNLOAD_BYTES", 1000)
    mirror.files[NAME] = bytes(5000)
    with pytest.raises(FedmetaError, match="larger than 1000 bytes"):
        omniglot.fetch_archives("download", [NAME], tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_fresh_clone_downloads_by_default_with_the_public_checksums() -> None:
    """No edit needed: params.yaml downloads; the defaults are the public files' MD5s (checked against a local
    copy of the small archives where one sits beside the repository)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["omniglot"]["source"] == "download"
    assert set(raw["omniglot"]["archives"]) <= set(omniglot.ARCHIVE_MD5)
    local = REPO.parent / "shared/data/omniglot"
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        if (local / name).is_file():
            assert omniglot.file_md5(local / name) == omniglot.ARCHIVE_MD5[name]
