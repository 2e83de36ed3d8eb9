"""Downloads against an http.server on 127.0.0.1 started inside each test: checksum, extraction, cut-off and
corrupted downloads, unsafe archive members, the offline message and exit status of main.py."""
import errno
import functools
import hashlib
import http.server
import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

import data

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www at the yielded base URL; /cut/<name> promises all of <name> but sends half, then hangs up."""
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if not self.path.startswith("/cut/"):
                return super().do_GET()
            body = (www / self.path[len("/cut/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True

        def log_message(self, *args):  # keep pytest's output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cifar_archive(tmp_path, cifar_dir, monkeypatch):
    """www/cifar-10-python.tar.gz of the tiny CIFAR-10 set; data.CIFAR10_MD5 set to its md5."""
    archive = shutil.make_archive(str(tmp_path / "www" / "cifar-10-python"), "gztar", cifar_dir, "cifar-10-batches-py")
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(Path(archive).read_bytes()).hexdigest())
    return Path(archive)


def unreachable_url():
    """An address on 127.0.0.1 where nothing listens: a port the OS just handed out and took back."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def test_cifar10_download_checks_and_extracts(server, cifar_archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR10_URL", f"{server}/cifar-10-python.tar.gz")
    monkeypatch.setattr(data, "PROGRESS_SECONDS", 0.0)  # show the progress line even for a tiny file
    x_train, y_train, x_test, y_test = data.load_cifar10(tmp_path / "data")
    assert x_train.shape == (20, 3, 32, 32) and y_test.shape == (4,)
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert "downloading cifar-10-python.tar.gz" in capsys.readouterr().err
    (tmp_path / "www" / "cifar-10-python.tar.gz").unlink()  # a second load must need neither server nor archive
    assert data.load_cifar10(tmp_path / "data")[0].shape == (20, 3, 32, 32)


def test_tinyimagenet_download_extracts_zip_and_builds_cache(server, tinyimagenet_dir, tmp_path, monkeypatch):
    archive = shutil.make_archive(str(tmp_path / "www" / "tiny-imagenet-200"), "zip", tinyimagenet_dir,
                                  "tiny-imagenet-200")
    monkeypatch.setattr(data, "TINYIMAGENET_MD5", hashlib.md5(Path(archive).read_bytes()).hexdigest())
    monkeypatch.setenv("TINYIMAGENET_URL", f"{server}/tiny-imagenet-200.zip")
    x_train, y_train, x_test, y_test = data.load_tinyimagenet(tmp_path / "data")
    assert x_train.shape == (6, 3, 64, 64) and x_test.shape == (3, 3, 64, 64)  # grayscale JPEGs included
    assert (tmp_path / "data" / "tiny-imagenet-200" / data.TINYIMAGENET_CACHE).exists()
    assert sorted(os.listdir(tmp_path / "data")) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]


def test_checksum_mismatch_deletes_the_download(server, cifar_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_URL", f"{server}/cifar-10-python.tar.gz")
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(data.DataError, match="checksum mismatch .* the downloaded file was deleted"):
        data.load_cifar10(tmp_path / "data")
    assert os.listdir(tmp_path / "data") == []


def test_cut_off_download_leaves_nothing_and_next_run_succeeds(server, cifar_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_URL", f"{server}/cut/cifar-10-python.tar.gz")
    with pytest.raises(data.DataError, match="was cut off after"):
        data.load_cifar10(tmp_path / "data")
    assert os.listdir(tmp_path / "data") == []
    monkeypatch.setenv("CIFAR10_URL", f"{server}/cifar-10-python.tar.gz")
    assert data.load_cifar10(tmp_path / "data")[0].shape == (20, 3, 32, 32)


def test_two_downloads_into_one_folder_do_not_collide(server, cifar_archive, tmp_path, monkeypatch):
    url = f"{server}/cifar-10-python.tar.gz"
    dest = tmp_path / "data" / "cifar-10-python.tar.gz"
    dest.parent.mkdir()
    stream = data._stream
    finished = []

    def stream_while_another_run_downloads(response, file, total, name):
        monkeypatch.setattr(data, "_stream", stream)
        data.download(url, dest, data.CIFAR10_MD5)  # the other run starts later and finishes first
        finished.append(os.stat(dest).st_ino)
        return stream(response, file, total, name)
    monkeypatch.setattr(data, "_stream", stream_while_another_run_downloads)
    data.download(url, dest, data.CIFAR10_MD5)
    assert dest.read_bytes() == cifar_archive.read_bytes() and os.listdir(dest.parent) == [dest.name]
    assert finished == [os.stat(dest).st_ino]  # the archive the other run published is kept, not replaced


def test_run_that_loses_the_race_to_extract_uses_the_winners_folder(cifar_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_URL", unreachable_url())
    (tmp_path / "data").mkdir()
    shutil.copy(cifar_archive, tmp_path / "data" / "cifar-10-python.tar.gz")
    extract = data.safe_extract

    def extract_while_another_run_finishes(archive, dest):
        extract(archive, dest)
        extract(archive, tmp_path / "data")  # the other run's folder lands before this one's
    monkeypatch.setattr(data, "safe_extract", extract_while_another_run_finishes)
    assert data.load_cifar10(tmp_path / "data")[0].shape == (20, 3, 32, 32)
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_read_only_data_folder_says_how_to_extract_the_archive(cifar_archive, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copy(cifar_archive, tmp_path / "data" / "cifar-10-python.tar.gz")

    def refuse_to_create(*args, **kwargs):  # what mkdtemp does in a read-only folder (root ignores chmod)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr("tempfile.mkdtemp", refuse_to_create)
    with pytest.raises(data.DataError, match=r"cannot extract cifar-10-python.tar.gz into \S*data \(Permission denied\)"
                                             r"; make that folder writable, or extract the archive there by hand"):
        data.load_cifar10(tmp_path / "data")


def test_disk_full_while_downloading_is_named(server, cifar_archive, tmp_path, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    mkstemp = tempfile.mkstemp

    def create_on_a_full_disk(**kwargs):  # the download's file writes go to /dev/full: each fails with ENOSPC
        handle, name = mkstemp(**kwargs)
        os.close(handle)
        return os.open("/dev/full", os.O_WRONLY), name
    monkeypatch.setattr(tempfile, "mkstemp", create_on_a_full_disk)
    monkeypatch.setenv("CIFAR10_URL", f"{server}/cifar-10-python.tar.gz")
    with pytest.raises(data.DataError, match=r"the disk holding \S*data filled up while downloading cifar-10-python"):
        data.load_cifar10(tmp_path / "data")
    assert os.listdir(tmp_path / "data") == []


def test_disk_full_while_extracting_is_named(cifar_archive, tmp_path, monkeypatch):
    def fill_the_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(tarfile.TarFile, "extractall", fill_the_disk)
    with pytest.raises(data.DataError, match=r"cannot extract \S*cifar-10-python.tar.gz \(No space left on device\)"):
        data.safe_extract(cifar_archive, tmp_path / "dest")


def test_tar_extracts_on_pythons_without_extraction_filters(cifar_archive, tmp_path, monkeypatch):
    extractall = tarfile.TarFile.extractall

    def extractall_before_3_11_4(self, path=".", members=None, *, numeric_owner=False):  # no `filter` argument
        return extractall(self, path, members, numeric_owner=numeric_owner)
    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall_before_3_11_4)
    data.safe_extract(cifar_archive, tmp_path / "dest")
    assert len(os.listdir(tmp_path / "dest" / "cifar-10-batches-py")) == 6


def write_unsafe_archive(path, kind, member):
    """A tar or zip holding one harmless file plus `member`: a path, or "symlink" for a link to /etc/passwd."""
    if kind == "tar":
        with tarfile.open(path, "w") as tar:
            for name in ("folder/ok.txt", "folder/link" if member == "symlink" else member):
                info = tarfile.TarInfo(name)
                if name == "folder/link":
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info, io.BytesIO(b""))
    else:
        with zipfile.ZipFile(path, "w") as zipped:
            zipped.writestr("folder/ok.txt", b"")
            info = zipfile.ZipInfo("folder/link" if member == "symlink" else member)
            if member == "symlink":
                info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16  # how zip stores links
            zipped.writestr(info, "/etc/passwd" if member == "symlink" else "")


@pytest.mark.parametrize("kind, member", [("tar", "../evil.txt"), ("tar", "/evil.txt"), ("tar", "symlink"),
                                          ("zip", "folder/../../evil.txt"), ("zip", "symlink")])
def test_safe_extract_refuses_escaping_members_and_links(tmp_path, kind, member):
    archive, dest = tmp_path / f"archive.{kind}", tmp_path / "dest"
    write_unsafe_archive(archive, kind, member)
    dest.mkdir()
    with pytest.raises(data.DataError, match="refusing to extract .* (outside the target folder|link or a device)"):
        data.safe_extract(archive, dest)
    assert os.listdir(dest) == [] and not (tmp_path / "evil.txt").exists()


def test_archive_placed_by_hand_is_used_without_downloading(cifar_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_URL", unreachable_url())
    (tmp_path / "data").mkdir()
    shutil.copy(cifar_archive, tmp_path / "data" / "cifar-10-python.tar.gz")
    assert data.load_cifar10(tmp_path / "data")[0].shape == (20, 3, 32, 32)


def test_unreachable_server_message_names_address_and_folders(tmp_path, monkeypatch):
    url = unreachable_url()
    monkeypatch.setenv("CIFAR10_URL", url)
    with pytest.raises(data.DataError) as error:
        data.load_cifar10(tmp_path / "data")
    for part in (url, tmp_path / "data" / "cifar-10-python.tar.gz", tmp_path / "data" / "cifar-10-batches-py",
                 "CIFAR10_URL"):
        assert str(part) in str(error.value)
    assert os.listdir(tmp_path / "data") == []


def test_main_exits_2_with_the_message_when_offline(tmp_path):
    if not (REPOSITORY / "main.py").exists():
        pytest.skip("main.py is not written yet")
    url = unreachable_url()
    result = subprocess.run([sys.executable, "main.py", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                             "--out", str(tmp_path / "out")], cwd=REPOSITORY, capture_output=True, text=True,
                            env={**os.environ, "CIFAR10_URL": url}, timeout=120)
    assert result.returncode == 2
    assert url in result.stderr and str(tmp_path / "data" / "cifar-10-batches-py") in result.stderr
    assert "Traceback" not in result.stderr
