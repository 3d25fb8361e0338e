"""The authorized_keys check, against keys made by the real ssh-keygen."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from rockpool.errors import InvalidInput
from rockpool.keys import KEYS_LIMIT, LINE_LIMIT, check_authorized_keys

SOURCE = "my-keys.txt"


def keygen(directory: Path, *args: str) -> Path:
    """A fresh key pair from ssh-keygen; returns the private key's path (PATH.pub beside it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "k"
    subprocess.run(
        ["ssh-keygen", *args, "-N", "", "-C", "you@host", "-f", str(path), "-q"],
        check=True,
        capture_output=True,
    )
    return path


def pub_line(path: Path) -> str:
    return (path.parent / (path.name + ".pub")).read_text().strip()


def refused(text: str) -> str:
    with pytest.raises(InvalidInput) as caught:
        check_authorized_keys(text, SOURCE)
    message = str(caught.value)
    assert SOURCE in message
    assert caught.value.hint, "every refusal says how to fix it"
    return message


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("keys")
    return {
        "ed25519": keygen(base / "ed25519", "-t", "ed25519"),
        "rsa": keygen(base / "rsa", "-t", "rsa", "-b", "2048"),
        "ecdsa": keygen(base / "ecdsa", "-t", "ecdsa"),
    }


@pytest.fixture(scope="module")
def ed25519(keys: dict[str, Path]) -> str:
    return pub_line(keys["ed25519"])


def test_real_public_keys_pass_and_are_normalised(keys: dict[str, Path]) -> None:
    lines = [pub_line(path) for path in keys.values()]
    text = f"# my keys\n\n{lines[0]}   \n  # laptop\n{lines[1]}\t\n\n{lines[2]}"
    assert check_authorized_keys(text, SOURCE) == "\n".join(lines) + "\n"


def test_each_pub_file_passes_unchanged(keys: dict[str, Path]) -> None:
    for path in keys.values():
        text = (path.parent / (path.name + ".pub")).read_text()
        assert check_authorized_keys(text, SOURCE) == text


def test_options_and_comments_pass(ed25519: str) -> None:
    line = f'command="echo \\"hi there\\"",no-pty,from="10.0.0.1" {ed25519} and more words'
    assert check_authorized_keys(line + "\r\n", SOURCE) == line + "\n"


def test_certificate_passes(tmp_path: Path) -> None:
    ca = keygen(tmp_path / "ca", "-t", "ed25519")
    user = keygen(tmp_path / "user", "-t", "ecdsa")
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "id", "-n", "you", str(user) + ".pub"],
        check=True,
        capture_output=True,
    )
    cert = (tmp_path / "user" / "k-cert.pub").read_text().strip()
    assert cert.startswith("ecdsa-sha2-nistp256-cert-v01@openssh.com ")
    assert check_authorized_keys(cert, SOURCE) == cert + "\n"
    # Cut the certificate short at a base64 quantum, so only its structure shows the cut.
    key_type, blob, _ = cert.split(" ", 2)
    assert "cut short" in refused(f"{key_type} {blob[: len(blob) // 4 * 4 - 8]}")


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa", "rsa-pem"])
def test_private_key_is_refused_without_echoing_it(tmp_path: Path, kind: str) -> None:
    if kind == "rsa-pem":
        path = keygen(tmp_path, "-t", "rsa", "-b", "2048", "-m", "PEM")
    else:
        path = keygen(tmp_path, "-t", kind)
    secret = path.read_text()
    assert "PRIVATE KEY-----" in secret
    message = refused(secret)
    assert "line 1 is a PRIVATE key" in message
    assert "not stored" in message
    for line in secret.splitlines():
        if line.strip():
            assert line not in message


def test_private_key_after_a_public_one_is_refused(keys: dict[str, Path], ed25519: str) -> None:
    message = refused(f"{ed25519}\n{keys['ed25519'].read_text()}")
    assert "line 2 is a PRIVATE key" in message


def test_private_key_body_without_its_begin_line_is_refused(keys: dict[str, Path]) -> None:
    body = keys["ed25519"].read_text().splitlines()[1:-1]
    message = refused("\n".join(body))
    assert "line 1 is a PRIVATE key" in message
    assert not any(line in message for line in body)


def test_putty_key_is_refused() -> None:
    text = "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nPrivate-Lines: 1\nAAAAIE\n"
    assert "line 1 is a PRIVATE key" in refused(text)


def test_truncated_blob_is_refused(ed25519: str) -> None:
    key_type, blob, _ = ed25519.split(" ", 2)
    # Not a whole number of base64 quanta: base64 itself fails.
    message = refused(f"# a key\n{key_type} {blob[:-3]} you@host")
    assert "line 2" in message
    assert "base64" in message
    # Whole quanta, but the key inside stops early.
    message = refused(f"{key_type} {blob[:40]} you@host")
    assert "line 1" in message
    assert "cut short" in message
    assert blob[:40] not in message


def test_blob_with_stray_bytes_is_refused(ed25519: str) -> None:
    key_type, blob, _ = ed25519.split(" ", 2)
    padded = base64.b64encode(base64.b64decode(blob) + b"\0\0\0").decode()
    assert "3 stray bytes" in refused(f"{key_type} {padded}")


def test_blob_of_another_type_is_refused(ed25519: str) -> None:
    _, blob, _ = ed25519.split(" ", 2)
    message = refused(f"\nssh-rsa {blob} you@host")
    assert "line 2" in message
    assert "says ssh-rsa" in message
    assert "ssh-ed25519" in message
    assert blob not in message
    assert blob[:41] not in message


def test_unknown_key_type_is_refused(ed25519: str) -> None:
    _, blob, _ = ed25519.split(" ", 2)
    message = refused(f"ssh-ed448 {blob}")
    assert "line 1: unknown key type 'ssh-ed448'" in message
    message = refused(f"{ed25519}\nno-pty ssh-foo {blob}")
    assert "line 2: unknown key type 'ssh-foo'" in message


def test_blob_without_key_type_is_refused(ed25519: str) -> None:
    _, blob, _ = ed25519.split(" ", 2)
    message = refused(f"{blob} you@host")
    assert "line 1: there is no key type" in message
    assert blob not in message


def test_key_type_without_blob_is_refused() -> None:
    assert "line 1: there is no key blob after ssh-ed25519" in refused("ssh-ed25519\n")


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ('command="echo hi', "never closed"),
        ('command="echo \\"hi\\"', "never closed"),
        ("no-pty,,no-agent-forwarding", "empty option"),
        ("no-pty,", "empty option"),
        ("from=10.0.0.1,no-pty", "bad option 'from=10.0.0.1'"),
    ],
)
def test_bad_options_are_refused(ed25519: str, options: str, problem: str) -> None:
    message = refused(f"{options} {ed25519}")
    assert "line 1" in message
    assert problem in message


def test_binary_garbage_is_refused(ed25519: str) -> None:
    garbage = b"\x7fELF\x02\x01\x01\x00\x00\x00".decode("latin-1")
    message = refused(f"{ed25519}\n{garbage}\n")
    assert "line 2 is not text" in message
    assert "U+007F" in message
    assert "line 1 is not text" in refused("ssh-ed25519 AAAA\0AAAA\n")


def padded(head: str, size: int) -> str:
    """head and then comment lines, short so the line cap never fails, to size bytes."""
    filler = ("#" * 99 + "\n") * ((size - len(head)) // 100)
    return head + filler + "#" * (size - len(head) - len(filler))


def test_oversized_text_is_refused(ed25519: str) -> None:
    head = ed25519 + "\n"
    exact = padded(head, KEYS_LIMIT)
    assert len(exact.encode()) == KEYS_LIMIT
    assert check_authorized_keys(exact, SOURCE) == ed25519 + "\n"
    over = padded(head, KEYS_LIMIT + 1)
    assert len(over.encode()) == KEYS_LIMIT + 1
    message = refused(over)
    assert "64 KiB" in message
    assert f"line {over.count(chr(10)) + 1}" in message


def test_too_long_line_is_refused(ed25519: str) -> None:
    fits = ed25519 + " " + "x" * (LINE_LIMIT - len(ed25519) - 1)
    assert check_authorized_keys(fits, SOURCE) == fits + "\n"
    message = refused(f"# hi\n{fits}x\n")
    assert "line 2 is longer than 16 KiB" in message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("", "line 1 is blank"),
        ("\n", "line 1 is blank"),
        ("# just a comment\n\n   \n", "lines 1-3 are all blank or # comments"),
    ],
)
def test_no_keys_is_refused(text: str, where: str) -> None:
    message = refused(text)
    assert "holds no public key" in message
    assert where in message
