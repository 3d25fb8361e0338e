"""Checks of an SSH authorized_keys text a user gives to `rockpool workspace start
--authorized-keys FILE`, before anything is written: a line sshd would skip locks the user
out of the workspace, and a private key handed over by mistake must never be stored."""

from __future__ import annotations

import base64
import itertools
import re
import struct

from rockpool.errors import InvalidInput

KEYS_LIMIT = 64 << 10  # bytes, the cap of a whole keys file
LINE_LIMIT = 16 << 10  # bytes, the cap of one line: a large certificate fits with room to spare
_SHOWN = 40  # characters of user text echoed in a message, so no blob gets repeated back

# The strings after the key type in each key blob (RFC 4253, RFC 5656, OpenSSH's PROTOCOL.u2f);
# an mpint is a string on the wire, so counting strings is enough to find the blob's end.
_KEY_STRINGS = {
    "ssh-ed25519": 1,  # public key
    "ssh-rsa": 2,  # e, n
    "ssh-dss": 4,  # p, q, g, y
    "ecdsa-sha2-nistp256": 2,  # curve name, point
    "ecdsa-sha2-nistp384": 2,
    "ecdsa-sha2-nistp521": 2,
    "sk-ssh-ed25519@openssh.com": 2,  # public key, application
    "sk-ecdsa-sha2-nistp256@openssh.com": 3,  # curve name, point, application
}
_CERT = "-cert-v01@openssh.com"


def _cert_type(plain: str) -> str:
    # OpenSSH puts the suffix before any @domain: sk-ssh-ed25519-cert-v01@openssh.com.
    return plain.removesuffix("@openssh.com") + _CERT


_CERT_TYPES = {_cert_type(plain): plain for plain in _KEY_STRINGS}
KEY_TYPES = frozenset(_KEY_STRINGS) | frozenset(_CERT_TYPES)

# A certificate after its nonce and key fields (PROTOCOL.certkeys): "s" a string,
# "4"/"8" a uint32/uint64. Serial, type, key id, principals, validity, critical options,
# extensions, reserved, signature key, signature.
_CERT_TAIL = "84ss88sssss"

# PEM and PKCS#8 ("-----BEGIN ... PRIVATE KEY-----"), the ssh.com format ("---- BEGIN SSH2
# ENCRYPTED PRIVATE KEY ----"), PuTTY, SSH1, and the body of an OpenSSH key whose BEGIN line
# was cut off (base64 of "openssh-key-v1\0").
_PRIVATE = re.compile(
    r"PRIVATE KEY ?-{4,}|PuTTY-User-Key-File-|SSH PRIVATE KEY FILE FORMAT"
    r"|^[ \t]*b3BlbnNzaC1rZXktdjEA",
    re.MULTILINE,
)
# Control characters other than tab, and lone surrogates (bytes that were not UTF-8).
_NOT_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
_BLANKS = re.compile(r"[ \t]+")  # the only separators sshd knows
# One option: a name, optionally ="value" where \" is the only escape. The atomic group keeps
# a backslash before the closing quote from being read as a plain character, as sshd reads it.
_OPTION = re.compile(r'[A-Za-z0-9-]+(?:="(?>(?:\\"|[^"])*)")?')

_HINT_PUBLIC = "give the public key (the .pub file), one per line"
_HINT_LINE = "copy the whole line of the .pub file (KEYTYPE AAAA... comment), one key per line"
_HINT_TYPES = (
    f"{_HINT_PUBLIC}; the key types accepted are {', '.join(_KEY_STRINGS)}"
    f" and their {_CERT} certificates"
)
_HINT_OPTIONS = (
    'options are comma-separated before the key type, e.g. no-pty,command="echo hi",'
    'from="10.0.0.1"; put values with spaces in double quotes and write a quote as \\"'
)


class _Short(Exception):
    """The blob ended inside a field."""


def _shown(text: str) -> str:
    return f"'{text}'" if len(text) <= _SHOWN else f"'{text[:_SHOWN]}...'"


def _utf8_len(text: str) -> int:
    # surrogatepass: a lone surrogate is refused later as "not text", with its line number.
    return len(text.encode("utf-8", "surrogatepass"))


def check_authorized_keys(text: str, source: str) -> str:
    """Return the keys normalised (each kept line stripped of trailing whitespace, joined by
    \\n, with a final \\n; blank lines and # comments dropped), or raise InvalidInput."""
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start another

    if _utf8_len(text) > KEYS_LIMIT:
        raise _over_limit(lines, source)

    # Before any other check, so a private key is never reported as a mere bad line, and its
    # material never reaches a message.
    private = _PRIVATE.search(text)
    if private:
        number = text.count("\n", 0, private.start()) + 1
        raise InvalidInput(
            f"{source}: line {number} is a PRIVATE key; it is refused and was not stored",
            hint=f"{_HINT_PUBLIC}; `ssh-keygen -y -f KEYFILE` prints the public half",
        )

    kept: list[str] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.removesuffix("\r")  # a file saved on Windows
        bad = _NOT_TEXT.search(line)
        if bad:
            raise InvalidInput(
                f"{source}: line {number} is not text: it holds the character "
                f"U+{ord(bad.group()):04X}",
                hint=_HINT_PUBLIC,
            )
        if _utf8_len(line) > LINE_LIMIT:
            raise InvalidInput(
                f"{source}: line {number} is longer than {LINE_LIMIT >> 10} KiB",
                hint=_HINT_PUBLIC,
            )
        line = line.rstrip()
        body = line.lstrip(" \t")
        if not body or body.startswith("#"):  # sshd skips these too
            continue
        problem = _entry_problem(body)
        if problem:
            message, hint = problem
            raise InvalidInput(f"{source}: line {number}: {message}", hint=hint)
        kept.append(line)

    if not kept:
        where = "line 1 is blank" if len(lines) == 1 else f"lines 1-{len(lines)} are"
        if len(lines) > 1:
            where += " all blank or # comments"
        raise InvalidInput(f"{source} holds no public key: {where}", hint=_HINT_PUBLIC)
    return "\n".join(kept) + "\n"


def _over_limit(lines: list[str], source: str) -> InvalidInput:
    total, number = 0, len(lines)
    for index, line in enumerate(lines, start=1):
        total += _utf8_len(line) + 1
        if total > KEYS_LIMIT:
            number = index
            break
    return InvalidInput(
        f"{source}: line {number}: the keys file is over the {KEYS_LIMIT >> 10} KiB cap",
        hint=f"{_HINT_PUBLIC}; a public key line is well under 1 KiB",
    )


def _entry_problem(body: str) -> tuple[str, str] | None:
    """(message, hint) for what is wrong with one non-blank, non-comment line, else None."""
    first, rest = _first_field(body)
    if first not in KEY_TYPES:
        if first.startswith("AAAA"):
            return "there is no key type before the key blob", _HINT_LINE
        following = _BLANKS.split(rest, maxsplit=1)[0] if rest else ""
        if following.startswith("AAAA") or first.startswith(("ssh-", "ecdsa-", "sk-")):
            # `first` sits where a key type goes: it is a misspelt or unsupported type.
            return f"unknown key type {_shown(first)}", _HINT_TYPES
        problem = _options_problem(first)
        if problem:
            return problem, _HINT_OPTIONS
        if not following:
            return "there is no key type after the options", _HINT_LINE
        if following not in KEY_TYPES:
            return f"unknown key type {_shown(following)}", _HINT_TYPES
        first, rest = following, rest[len(following) :].lstrip(" \t")
    blob = _BLANKS.split(rest, maxsplit=1)[0] if rest else ""
    if not blob:
        return f"there is no key blob after {first}", _HINT_LINE
    problem = _blob_problem(first, blob)
    return (problem, _HINT_LINE) if problem else None


def _unquoted(text: str, stops: str) -> tuple[list[int], bool]:
    """Where text has a character of stops outside double quotes (\\" is the only escape
    inside them), and whether a quote is left open at the end."""
    found: list[int] = []
    quoted, index = False, 0
    while index < len(text):
        char = text[index]
        if quoted and char == "\\" and text[index + 1 : index + 2] == '"':
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char in stops:
            found.append(index)
        index += 1
    return found, quoted


def _first_field(body: str) -> tuple[str, str]:
    """The leading field, ended by a blank outside double quotes (options may hold spaces),
    and the rest with its leading blanks removed. An unclosed quote runs to the end."""
    blanks, _ = _unquoted(body, " \t")
    end = blanks[0] if blanks else len(body)
    return body[:end], body[end:].lstrip(" \t")


def _options_problem(options: str) -> str | None:
    commas, left_open = _unquoted(options, ",")
    if left_open:
        return "the options field has a double quote that is never closed"
    bounds = [-1, *commas, len(options)]
    for start, end in itertools.pairwise(bounds):
        part = options[start + 1 : end]
        if not part:
            return "the options field has an empty option (two commas in a row, or one at an end)"
        if not _OPTION.fullmatch(part):
            return f"bad option {_shown(part)} in the options field"
    return None


def _blob_problem(key_type: str, blob: str) -> str | None:
    try:
        data = base64.b64decode(blob, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        return f"the {key_type} key blob is not valid base64 (is it cut short or mistyped?)"
    reader = _Reader(data)
    try:
        embedded = reader.string()
    except _Short:
        return f"the {key_type} key blob is cut short: it does not even hold its key type"
    if embedded != key_type.encode("ascii"):
        named = embedded.decode("ascii", "replace")
        if named.isprintable() and 0 < len(named) <= _SHOWN:
            return f"the line says {key_type} but its key blob holds a {named} key"
        return f"the line says {key_type} but its key blob does not hold a {key_type} key"
    plain = _CERT_TYPES.get(key_type, key_type)
    try:
        if plain != key_type:
            reader.string()  # the certificate's nonce
        fields = [reader.string() for _ in range(_KEY_STRINGS[plain])]
        if plain != key_type:
            for kind in _CERT_TAIL:
                if kind == "s":
                    reader.string()
                else:
                    reader.take(int(kind))
    except _Short:
        return f"the {key_type} key blob is cut short"
    if reader.left:
        return f"the {key_type} key blob has {reader.left} stray bytes after the key"
    if plain.startswith("ecdsa-") and fields[0] != plain.rsplit("-", 1)[1].encode():
        return f"the {key_type} key blob names another curve"
    if plain.startswith("sk-ecdsa-") and fields[0] != b"nistp256":
        return f"the {key_type} key blob names another curve"
    if "ed25519" in plain and len(fields[0]) != 32:
        return f"the {key_type} key blob holds a public key of {len(fields[0])} bytes, not 32"
    return None


class _Reader:
    """SSH wire format (RFC 4251 section 5) read front to back."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int) -> bytes:
        if size > self.left:
            raise _Short
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def string(self) -> bytes:
        (size,) = struct.unpack(">I", self.take(4))
        return self.take(size)
