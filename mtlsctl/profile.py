"""The YAML site profile: pydantic v2 models, loading, and errors one line per problem.

Key names are a public contract (docs/profile.md). Unknown keys are errors everywhere; a partial
mapping keeps the defaults for what it leaves out; the built-in defaults are exactly the guide's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtlsctl import validate
from mtlsctl.errors import InputError, ProfileError
from mtlsctl.pki import DEFAULT_PKI_DIR as DEFAULT_PKI_DIR  # where the PKI lives unless told

_M = TypeVar("_M", bound=BaseModel)



# A refusal names the character. repr() alone is unreadable for quotes ("'" is an apostrophe inside double
# quotes) and for control characters, so those are named in words as well.
_CHAR_NAMES = {"'": "the apostrophe (')", '"': 'the double quote (")', "`": "the backtick (`)", " ": "a space (' ')",
               "\t": "a tab ('\\t')", "\n": "a line break ('\\n')", "\r": "a carriage return ('\\r')"}
# What openssl.cnf makes of each character config_unsafe() refuses (anything else there is a control character).
_CNF_MEANING = {"'": "a quote", '"': "a quote", "`": "a quote it silently drops", "$": "a variable",
                "#": "the start of a comment", "\\": "an escape", "\n": "the end of the line", "\r": "the end of the line"}


def show_char(c: str) -> str:
    """One character as a refusal shows it: '#', '$' as written; quotes, blanks and control characters in words."""
    if c in _CHAR_NAMES:
        return _CHAR_NAMES[c]
    if not c.isprintable():
        return f"the control character {c!r} (U+{ord(c):04X})"
    return repr(c)


class _Strict(BaseModel):
    # strict: "365" (a string) or `true` are not days; extra: a typo is an error, not a silent default.
    # defer_build: pydantic builds a model's validator on its first validation, not at import. A run whose
    # profile comes from the cache (load_profile) or is the built-in default never builds one (start-up).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)


class KeySpec(_Strict):
    """A key: RSA with `bits`, or EC on a named `curve`."""

    type: Literal["rsa", "ec"] = Field(default="rsa", description="rsa or ec")
    bits: int | None = Field(default=None, ge=2048, le=8192, description="RSA only: 2048..8192")
    curve: Literal["P-256", "P-384"] | None = Field(default=None, description="EC only")
    encrypt: bool = Field(default=False, description="ca.key only: AES-256-encrypt private/ca.key; every signing asks for its passphrase")

    @model_validator(mode="after")
    def _fits_type(self) -> KeySpec:
        if self.type == "rsa" and self.curve is not None:
            raise ValueError("curve is for type: ec; an rsa key takes bits")
        if self.type == "ec" and self.bits is not None:
            raise ValueError("bits is for type: rsa; an ec key takes curve (P-256 or P-384)")
        return self

    def resolved(self, default_bits: int, default_curve: str) -> KeySpec:
        """This spec with the context's default size filled in."""
        # Built without validation: every value comes from this validated spec or the caller's default size.
        if self.type == "rsa":
            return KeySpec.model_construct(type="rsa", bits=self.bits or default_bits, curve=None, encrypt=self.encrypt)
        return KeySpec.model_construct(type="ec", bits=None, curve=self.curve or default_curve, encrypt=self.encrypt)

    def describe(self) -> str:
        return f"RSA {self.bits}-bit" if self.type == "rsa" else f"EC {self.curve}"


class Subject(_Strict):
    """The CA's distinguished name; every field but CN may be left out."""

    C: str | None = Field(default=None, description="two-letter country code")
    ST: str | None = Field(default=None, description="state or province")
    L: str | None = Field(default=None, description="locality (city)")
    O: str | None = Field(default=None, description="organisation")  # noqa: E741 - the DN attribute is called O
    OU: str | None = Field(default=None, description="organisational unit")
    CN: str = Field(description="common name, e.g. JMRP-IO-LAB Root CA")

    @field_validator("C")
    @classmethod
    def _country(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 2 or not v.isascii() or not v.isalpha() or not v.isupper()):
            raise ValueError("must be two capital letters, e.g. ES")
        return v

    @field_validator("ST", "L", "O", "OU", "CN")
    @classmethod
    def _safe(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if len(v) > 64:
            raise ValueError("at most 64 characters")
        bad = validate.config_unsafe(v)
        if bad:
            raise ValueError("contains " + ", ".join(
                f"{show_char(c)} at position {v.index(c) + 1} (openssl.cnf "
                + (f"reads it as {_CNF_MEANING[c]})" if c in _CNF_MEANING else "cannot hold it)")
                for c in sorted(bad, key=v.index)) + (": remove it" if len(bad) == 1 else ": remove them"))
        if v != v.strip() or not v:
            raise ValueError("empty or surrounded by spaces")
        return v

    def fields(self) -> list[tuple[str, str]]:
        """(attribute, value) pairs in DN order, skipping the ones left out."""
        return [(k, v) for k in ("C", "ST", "L", "O", "OU", "CN") if (v := getattr(self, k)) is not None]


# The built-in defaults are built without validation (model_construct: importing this module validates
# nothing); tests/test_profile_cache.py validates every one of them.
GUIDE_SUBJECT = Subject.model_construct(
    C="ES", ST="Valencia", L="Valencia", O="JMRP-IO-LAB", OU="Infrastructure Security", CN="JMRP-IO-LAB Root CA"
)


def _plain_key(v: KeySpec, why: str) -> KeySpec:
    if v.encrypt:
        raise ValueError(why)
    return v


class IntermediateProfile(_Strict):
    """An issuing CA under the root: clients are signed by it; the root key can then go offline."""

    subject: Subject = Field(description="the intermediate's DN (CN required)")
    key: KeySpec = KeySpec.model_construct(type="rsa", bits=4096)
    days: int = Field(default=1825, ge=1, le=36500, description="validity of the intermediate certificate")
    root_crl_days: int = Field(default=365, ge=1, le=3650, description="nextUpdate of the root's CRL (refreshed with the root key)")

    @field_validator("key")
    @classmethod
    def _no_own_encrypt(cls, v: KeySpec) -> KeySpec:
        return _plain_key(v, "encrypt is set once, in ca.key.encrypt: it applies to the root and the issuing CA key")

    @property
    def key_spec(self) -> KeySpec:
        return self.key.resolved(4096, "P-384")


class CaProfile(_Strict):
    subject: Subject = Field(default=GUIDE_SUBJECT, description="the CA's DN; the guide's by default; taken whole when given")
    key: KeySpec = Field(default=KeySpec.model_construct(type="rsa", bits=4096), description="RSA 4096 by default (EC: P-384)")
    days: int = Field(default=3650, ge=1, le=36500, description="validity of the CA certificate")
    intermediate: IntermediateProfile | None = Field(
        default=None, description="off unless set: a root and an issuing CA (docs/intermediate.md)")

    @model_validator(mode="after")
    def _intermediate_inside_root(self) -> CaProfile:
        if self.intermediate is not None and self.intermediate.days >= self.days:
            raise ValueError(f"intermediate.days ({self.intermediate.days}) must be less than the root's days ({self.days})")
        return self

    @property
    def key_spec(self) -> KeySpec:
        return self.key.resolved(4096, "P-384")

    @property
    def digest(self) -> str:
        """Digest follows the signing key: sha384 for a P-384 CA (FIELD-NOTES: Keys), else sha256."""
        signing = self.intermediate.key_spec if self.intermediate is not None else self.key_spec
        return "sha384" if signing.curve == "P-384" else "sha256"

    @property
    def root_digest(self) -> str:
        return "sha384" if self.key_spec.curve == "P-384" else "sha256"


class ClientsProfile(_Strict):
    key: KeySpec = Field(default=KeySpec.model_construct(type="rsa", bits=2048),
                         description="RSA 2048 by default (EC: P-256); --key-type overrides")

    @field_validator("key")
    @classmethod
    def _no_encrypt(cls, v: KeySpec) -> KeySpec:
        return _plain_key(v, "encrypt is for ca.key; client keys are protected by their PKCS#12 password")

    days: int = Field(default=365, ge=1, le=3650, description="validity of client certificates; --days overrides")
    p12: Literal["compat", "modern", "legacy"] = Field(default="compat", description="PKCS#12 profile; --p12 overrides (docs/clients.md)")

    @property
    def key_spec(self) -> KeySpec:
        return self.key.resolved(2048, "P-256")


class CrlProfile(_Strict):
    days: int = Field(default=30, ge=1, le=3650, description="nextUpdate of each CRL, in days from its generation")
    refresh_within_days: int = Field(
        default=7, ge=0, le=3649,
        description="`crl --if-due` and `renew` regenerate the CRL when its nextUpdate is this close (must be < crl.days)",
    )

    @model_validator(mode="after")
    def _refresh_before_expiry(self) -> CrlProfile:
        if self.refresh_within_days >= self.days:
            raise ValueError(f"refresh_within_days ({self.refresh_within_days}) must be less than days ({self.days})")
        return self


class RenewProfile(_Strict):
    within_days: int = Field(default=30, ge=1, le=3650, description="renew certificates that expire within this many days")
    days: int = Field(default=365, ge=1, le=3650, description="validity of a renewed certificate")
    revoke_superseded: bool = Field(default=True, description="revoke the old certificate (reason superseded) once the new one is issued")


def _command_line(value: str | None) -> str | None:
    """A command split like a shell would, run without one; empty or null means "do not run"."""
    if value is None or value.strip() == "":
        return None
    import shlex

    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"cannot be split into arguments ({exc})") from None
    if any(c in value for c in "\n\r\0"):
        raise ValueError("must be one line")
    if not argv:
        return None
    return value


# nginx syntax: ; ends a directive, braces open and close blocks, quotes and \ quote and escape, $ starts a
# variable, # a comment (after a space). Control characters and line breaks are refused with them.
_NGINX_UNSAFE = set(";{}\"'`$\\#")
# Patterns below are used with fullmatch: `^...$` with match() lets a trailing newline through.
_TIME_RE = re.compile(r"[0-9]+(ms|s|m|h|d)?")
_RATE_RE = re.compile(r"[1-9][0-9]*r/[sm]")
_LISTEN_RE = re.compile(r"(?P<port>[0-9]{1,5})|(?P<v4>[0-9.]+):(?P<p4>[0-9]{1,5})|\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<p6>[0-9]{1,5})")
_UPSTREAM_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/%-]*)?|unix:/[A-Za-z0-9._/-]+")
_OCSP_URL_RE = re.compile(r"http://(\[[0-9A-Fa-f:.]+\]|[0-9.]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?")


def nginx_safe(value: str, what: str = "value", allow_space: bool = False) -> str:
    """Refuse what would inject nginx syntax: ; { } quotes $ \\ # backticks, control characters."""
    bad = sorted({c for c in value if c in _NGINX_UNSAFE or not c.isprintable() or (c.isspace() and not allow_space)})
    if bad:
        raise ValueError(f"{what} contains {', '.join(show_char(c) for c in bad)}, which nginx would read as syntax")
    if not value:
        raise ValueError(f"{what} is empty")
    return value


# Allowlist entries are rendered inside a double-quoted nginx string. In it, nginx turns `\\` into one
# backslash (and \" \' into quotes) before PCRE sees the regex, so a regex using them would not be the
# one checked here; `#`, `;`, braces, quotes, `$` and backticks are refused like everywhere else in nginx files.
_ALLOW_UNSAFE = set(";{}\"'`$#")
# PCRE metacharacters a DN can contain (a backslash, braces and $ are refused). A backslash before a non-alphanumeric
# character is always a literal in PCRE (and in Python's re, which checks the result).
_PCRE_META = re.compile(r"([.^|?*+()\[\]])")


# Escapes both engines read the same way; others (\\Q…\\E, \\K, \\R, \\x{…}, backreferences) are refused.
_SAFE_ESCAPES = set(".-_=,+*?|()[]^$/:@ dDwWsS")


def _pcre_divergence(pattern: str) -> str | None:
    """Why Python's `re` (which checks the pattern here) and nginx's PCRE could parse it differently, or None.

    The anchoring wrapper `^(?:PATTERN)$` is only as good as the agreement of the two parsers on where the
    pattern's groups begin and end: PCRE reads `[[:digit:](]` as one bracket holding a POSIX class, Python
    as a nested set, so a `)|(` that Python counts as literal closes nginx's wrapper early.
    """
    for seq, what in (("[:", "a POSIX class [:...:]"), ("[=", "a POSIX equivalence class [=...=]"),
                      ("[.", "a POSIX collating element [. .]"), ("[[", "a nested set [["), ("(*", "a PCRE verb (*...)")):
        if seq in pattern:
            return what
    for i, c in enumerate(pattern):
        if c == "\\" and (i + 1 >= len(pattern) or pattern[i + 1] not in _SAFE_ESCAPES):
            return f"the escape \\{pattern[i + 1:i + 2]}"
        if c == "(" and pattern[i + 1:i + 2] == "?" and pattern[i + 2:i + 3] != ":":
            return "an extension group (?...) other than (?:...)"
    return None


def allow_regex(entry: str) -> str:
    """The regex nginx runs for one `nginx.allow` entry, anchored as a whole: `^(?:PATTERN)$`.

    `~PATTERN` is the user's regex (a leading ^ and trailing $ are dropped, then the whole is anchored, so
    `~CN=alice|CN=bob` cannot match `CN=alice.evil`: `~^a|b$` anchors only a and b, FIELD-NOTES). A DN
    entry becomes the same regex with every metacharacter escaped: an exact, case-sensitive match, where a
    plain map string key would compare without case (`CN=admin` would admit `CN=ADMIN`, FIELD-NOTES).

    Raises:
        ValueError: the entry holds nginx syntax, is not a DN, or is a regex that does not compile.
    """
    regex = entry.startswith("~")
    body = entry[1:].removeprefix("^").removesuffix("$") if regex else entry  # we anchor it ourselves
    bad = sorted({c for c in body if c in _ALLOW_UNSAFE or not c.isprintable()})
    if bad:
        raise ValueError(f"entry {entry!r} contains {', '.join(show_char(c) for c in bad)}, which nginx would read as syntax")
    if entry.startswith("~*"):
        raise ValueError(f"regex {entry!r} uses ~* (case-insensitive); entries match case-sensitively, write ~REGEX")
    if regex:
        pattern = body
        if not pattern:
            raise ValueError(f"regex {entry!r} is empty")
        if "\\\\" in pattern:
            raise ValueError(f"regex {entry!r} contains a double backslash (\\\\), which nginx turns into one before the regex runs")
        why = _pcre_divergence(pattern)
        if why:
            raise ValueError(f"regex {entry!r} uses {why}; allowlist regexes are limited to the syntax Python and "
                             "nginx's PCRE read alike (literals, ., [...] sets, * + ?, |, (...), (?:...), escapes such as \\. \\d \\w)")
        anchored = f"^(?:{pattern})$"
        try:
            re.compile(pattern)  # on its own first: an unbalanced `a)|(b` must not fit the wrapper
            re.compile(anchored)
        except re.error as exc:
            raise ValueError(f"regex {entry!r} does not compile: {exc}") from None
        return anchored
    if "\\" in entry:
        raise ValueError(f"DN {entry!r} contains '\\\\', which nginx would read as an escape")
    if "=" not in entry:
        raise ValueError(f"DN {entry!r} is not a DN such as CN=iphone-jmrp (or start it with ~ for a regex)")
    return "^" + _PCRE_META.sub(r"\\\1", entry) + "$"


class RateLimit(_Strict):
    rate: str = Field(description="requests per second or minute for clients that are not verified, e.g. 5r/s")
    burst: int = Field(default=10, ge=0, le=100000, description="requests queued above the rate before 429")

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str) -> str:
        if not _RATE_RE.fullmatch(v):
            raise ValueError("must look like 5r/s or 300r/m")
        return v


class NginxProfile(_Strict):
    """The mTLS site nginx serves (`mtlsctl nginx render`) and how mtlsctl tests and reloads nginx."""

    server_name: str = Field(default="secure.example.com", description="nginx server_name")
    listen: str = Field(default="443", description='PORT, as a number (443) or a string ("443"): IPv4 and [::]; '
                        'or "ADDR:PORT" / "[V6]:PORT"')
    http2: bool = Field(default=True, description="HTTP/2 on the listen socket (`listen ... ssl http2`, nginx 1.22 syntax)")
    server_cert: str = Field(default="/etc/ssl/certs/secure.example.com.crt", description="ssl_certificate")
    server_key: str = Field(default="/etc/ssl/private/secure.example.com.key", description="ssl_certificate_key")
    verify_client: Literal["on", "optional"] = Field(
        default="on", description="ssl_verify_client; optional_no_ca is refused (it admits self-signed certificates)")
    verify_depth: int = Field(default=2, ge=1, le=10, description="ssl_verify_depth")
    crl: bool = Field(default=True, description="ssl_crl <pki>/crl/ca.crl")
    session_timeout: str = Field(default="10m", description="ssl_session_timeout: how long a revoked client can resume a session")
    upstream: str = Field(default="http://127.0.0.1:8080", description="proxy_pass target")
    allow: list[str] = Field(default_factory=list, description='exact DNs ("CN=iphone-jmrp", case-sensitive) or "~REGEX" '
                             '(anchored as a whole, ^(?:REGEX)$); empty: any valid certificate')
    rate_limit: RateLimit | None = Field(
        default=None, description="limit clients that are not verified (and allowlisted); verified ones bypass it")
    access_log: str = Field(
        default="/var/log/nginx/secure.access.log", description="access log, with the client DN, serial and verify result")
    error_log: str = Field(
        default="/var/log/nginx/secure.error.log", description="error log at level info (verify failures are logged only at info)")
    test_command: str | None = Field(default="nginx -t", description="run before every reload; null or empty: skip")
    reload_command: str | None = Field(
        default="systemctl reload nginx", description="run after a CRL change when the test passes; null or empty: never reload")
    pid_file: str = Field(default="/run/nginx.pid", description="nginx master's pid file, to confirm a reload started new workers")
    site_file: str | None = Field(
        default=None, description="where you put the rendered site (nginx render --out); doctor checks it is current")

    @field_validator("test_command", "reload_command")
    @classmethod
    def _commands(cls, v: str | None) -> str | None:
        return _command_line(v)

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, v: str) -> str:
        nginx_safe(v, "server_name", allow_space=True)
        if v != v.strip():
            raise ValueError("has leading or trailing spaces")
        return v

    @field_validator("server_cert", "server_key", "access_log", "error_log", "pid_file", "site_file")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        nginx_safe(v, "path")
        if not v.startswith("/"):
            raise ValueError("must be an absolute path")
        if "/../" in v + "/":
            raise ValueError("must not contain '..'")
        return v

    @field_validator("listen", mode="before")
    @classmethod
    def _listen_number(cls, v: object) -> object:
        # `listen: 443` in YAML is an int; a port is the one number that means the same as its string.
        # (Not bool: YAML's `yes` is a bool and no port.)
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        m = _LISTEN_RE.fullmatch(v)
        if not m:
            raise ValueError('must be "PORT", "ADDR:PORT" or "[IPV6]:PORT"')
        port = int(m.group("port") or m.group("p4") or m.group("p6"))
        if not 1 <= port <= 65535:
            raise ValueError("port must be 1..65535")
        import ipaddress

        addr = m.group("v4") or m.group("v6")
        if addr:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"{addr!r} is not an IP address") from None
        return v

    @field_validator("session_timeout")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _TIME_RE.fullmatch(v):
            raise ValueError("must be an nginx time such as 10m, 300s or 1h")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        nginx_safe(v, "upstream")
        if not _UPSTREAM_RE.fullmatch(v):
            raise ValueError("must be http://HOST[:PORT][/PATH], https://... or unix:/PATH")
        return v

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        for entry in v:
            if not isinstance(entry, str) or not entry:
                raise ValueError("entries must be non-empty strings")
            allow_regex(entry)
        return v


class OcspProfile(_Strict):
    """An OCSP responder for client certificates (`mtlsctl ocsp serve`) and nginx's ssl_ocsp."""

    url: str = Field(description="responder URL put in client certificates and nginx: http://IP:PORT "
                                 "(an IP literal: nginx then needs no resolver)")
    port: int = Field(ge=1, le=65535, description="port `ocsp serve` listens on (all interfaces: openssl's -port takes no address)")
    nmin: int = Field(default=5, ge=1, le=1440, description="minutes until an answer's nextUpdate: how long nginx may cache a 'good'")
    signer_days: int = Field(default=90, ge=2, le=3650, description="validity of the OCSP signing certificate (renewed by `renew`)")
    cache: bool = Field(default=True, description="render ssl_ocsp_cache (answers cached until nextUpdate) in the nginx site")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        import ipaddress

        m = _OCSP_URL_RE.fullmatch(v)
        if not m:
            raise ValueError("must be http://IP[:PORT][/PATH] with an IP literal (nginx would need a resolver for a name)")
        try:
            ipaddress.ip_address(m.group(1).strip("[]"))
        except ValueError:
            raise ValueError(f"{m.group(1)} is not an IP address") from None
        return v


class PublishProfile(_Strict):
    """A command run after every CRL or chain change, to copy them to the nginx hosts."""

    command: str = Field(description="split like a shell, run without one (rsync, ansible-playbook, ...); "
                                     "$MTLSCTL_SITE_CA and $MTLSCTL_SITE_CRL name what the rendered site reads (ca/chain.pem and "
                                     "crl/chain.crl in a two-tier PKI); also $PKI_DIR, $MTLSCTL_CA, $MTLSCTL_CRL, $MTLSCTL_CHAIN, "
                                     "$MTLSCTL_CHAIN_CRL, $MTLSCTL_ROOT_CA, $MTLSCTL_ROOT_CRL (docs/fleet.md)")
    timeout: int = Field(default=600, ge=1, le=86400, description="seconds before the command is stopped and reported failed")

    @field_validator("command")
    @classmethod
    def _command(cls, v: str) -> str:
        if _command_line(v) is None:
            raise ValueError("is empty; remove the publish: section instead")
        return v


# ------------------------------------------------------------------ deliver and mobileconfig (issue 15)

DURATION_MIN_SECONDS = 10  # a person needs time to scan a QR code and tap through the prompts
DURATION_MAX_SECONDS = 24 * 3600  # a one-time link is for now, not for tomorrow
_DURATION_RE = re.compile(r"([1-9][0-9]{0,5})(s|m|h)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
# A reverse-DNS identifier: two or more DNS labels (com.example.mtls); each label letters, digits and inner hyphens.
_IDENTIFIER_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")
IDENTIFIER_PREFIX_MAX = 200


def parse_duration(text: str) -> int:
    """A duration as people write it ("90s", "10m", "1h") in seconds, within DURATION_MIN_SECONDS..DURATION_MAX_SECONDS.

    Raises:
        ValueError: not such a duration, or out of range.
    """
    m = _DURATION_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration such as 90s, 10m or 1h")
    seconds = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not DURATION_MIN_SECONDS <= seconds <= DURATION_MAX_SECONDS:
        raise ValueError(f"{text!r} is out of range: from {DURATION_MIN_SECONDS}s to {DURATION_MAX_SECONDS // 3600}h")
    return seconds


def listen_address(text: str, *, explicit: bool) -> str:
    """An IP literal to listen on, in its canonical form. An unspecified address (every interface: 0.0.0.0, ::,
    ::0.0.0.0 and the other spellings of ::) only when `explicit` (typed as --bind on the command line), never
    from a profile. An IPv4-mapped IPv6 address (::ffff:a.b.c.d) never: Linux listens on the IPv4 address it maps
    (::ffff:0.0.0.0 on every IPv4 interface, though Python 3.11 does not call it unspecified); give the IPv4 form.
    Raises ValueError."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (a name is not accepted: say which interface, e.g. 192.0.2.10)") from None
    if getattr(addr, "scope_id", None):
        raise ValueError(f"{text!r} has a zone (%{getattr(addr, 'scope_id', '')}); give a global or private address")
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    if mapped is not None:
        every = " (every IPv4 interface)" if mapped.is_unspecified else ""
        raise ValueError(f"{text} is an IPv4-mapped IPv6 address{every}; give its IPv4 form, {mapped}"
                         + (" (accepted only as --bind on the command line)" if mapped.is_unspecified else ""))
    if addr.is_unspecified and not explicit:
        raise ValueError(f"{text} listens on every interface; that is accepted only as --bind {addr} on the command line")
    return str(addr)


def _profile_path(v: str | None) -> str | None:
    """A file the profile names: absolute, or relative to the PKI directory; one printable line."""
    if v is None:
        return v
    if not v or not all(c.isprintable() for c in v):
        raise ValueError("must be a non-empty path without control characters")
    if v.startswith("-"):
        raise ValueError("must not start with '-' (write ./ before it)")
    return v


class DeliverProfile(_Strict):
    """`mtlsctl deliver`: the one-time HTTPS link that hands a bundle to a device (docs/clients.md)."""

    bind: str | None = Field(default=None, description="IP address deliver listens on; none by default (--bind or this "
                             "is required); 0.0.0.0 and :: (every interface) are refused here and accepted only as "
                             "--bind; IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are refused: give the IPv4 form")
    port: int = Field(default=8443, ge=1, le=65535, description="TCP port deliver listens on; --port overrides")
    valid_for: str = Field(default="10m", description="how long a link stays open unused: 90s, 10m, 1h (10s..24h); --for overrides")

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str | None) -> str | None:
        return None if v is None else listen_address(v, explicit=False)

    @field_validator("valid_for")
    @classmethod
    def _valid_for(cls, v: str) -> str:
        parse_duration(v)
        return v


class MobileconfigProfile(_Strict):
    """Apple configuration profiles (`export`/`deliver --format mobileconfig`): identifiers and the signer."""

    identifier_prefix: str | None = Field(
        default=None, description="reverse-DNS prefix of the PayloadIdentifiers (PREFIX.NAME); default: nginx.server_name "
        "reversed + .mtlsctl (com.example.secure.mtlsctl)")
    organization: str | None = Field(default=None, description="PayloadOrganization shown on the device; default: the CA's O, else its CN")
    signer_cert: str | None = Field(default=None, description="certificate that signs profiles (absolute or PKI-relative path); "
                                    "unset: profiles are unsigned and iOS shows them as Not Verified")
    signer_key: str | None = Field(default=None, description="its private key (PEM); required with signer_cert")
    signer_chain: str | None = Field(default=None, description="intermediate certificates sent with the signature (PEM); "
                                     "default: the PKI's CA chain when this PKI issued the signer")
    signer_passphrase_file: str | None = Field(
        default=None, description="file whose first line is the passphrase of an encrypted signer_key (handed to openssl on a pipe)")

    @field_validator("identifier_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > IDENTIFIER_PREFIX_MAX or not _IDENTIFIER_RE.fullmatch(v)):
            raise ValueError("must be reverse-DNS such as com.example.mtls (letters, digits, '-', dot-separated, "
                             f"two labels or more, at most {IDENTIFIER_PREFIX_MAX} characters)")
        return v

    @field_validator("organization")
    @classmethod
    def _organization(cls, v: str | None) -> str | None:
        if v is not None and (not v or len(v) > 128 or v != v.strip() or not all(c.isprintable() for c in v)):
            raise ValueError("must be 1..128 printable characters without leading or trailing spaces")
        return v

    @field_validator("signer_cert", "signer_key", "signer_chain", "signer_passphrase_file")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return _profile_path(v)

    @model_validator(mode="after")
    def _signer_complete(self) -> MobileconfigProfile:
        if (self.signer_cert is None) != (self.signer_key is None):
            raise ValueError("signer_cert and signer_key go together: set both to sign profiles, or neither")
        if self.signer_cert is None and (self.signer_chain is not None or self.signer_passphrase_file is not None):
            raise ValueError("signer_chain and signer_passphrase_file need signer_cert and signer_key")
        return self


class MetricsProfile(_Strict):
    """`mtlsctl metrics`: Prometheus text for node_exporter's textfile collector (docs/operations.md)."""

    textfile: str | None = Field(
        default=None, description="absolute path of a .prom file in node_exporter's --collector.textfile.directory; when set, "
        "renew, revoke and crl rewrite it (atomically) after their change")

    @field_validator("textfile")
    @classmethod
    def _textfile(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/") or not all(c.isprintable() for c in v) or "/../" in v + "/":
            raise ValueError("must be an absolute path without control characters or '..' "
                             "(e.g. /var/lib/prometheus/node-exporter/mtlsctl.prom)")
        if not v.endswith(".prom") or v.endswith("/.prom"):
            raise ValueError("must end in .prom: node_exporter's textfile collector reads only *.prom files")
        return v


class Profile(_Strict):
    pki_dir: str | None = Field(default=None, description="where the PKI lives; default /etc/nginx/pki")
    ca: CaProfile = Field(default=CaProfile.model_construct(), description="the Certificate Authority")
    clients: ClientsProfile = Field(default=ClientsProfile.model_construct(), description="defaults for add-client")
    crl: CrlProfile = Field(default=CrlProfile.model_construct(), description="the certificate revocation list")
    renew: RenewProfile = Field(default=RenewProfile.model_construct(), description="mtlsctl renew (the guide's mtls-renew.sh)")
    nginx: NginxProfile = Field(default=NginxProfile.model_construct(), description="the mTLS site and how nginx is tested and reloaded")
    ocsp: OcspProfile | None = Field(default=None, description="off unless set: see docs/ocsp.md")
    publish: PublishProfile | None = Field(default=None, description="off unless set: see docs/fleet.md")
    metrics: MetricsProfile | None = Field(default=None, description="off unless set: `mtlsctl metrics` textfile (docs/operations.md)")
    deliver: DeliverProfile = Field(default=DeliverProfile.model_construct(),
                                    description="mtlsctl deliver: the one-time HTTPS link for a bundle (docs/clients.md)")
    mobileconfig: MobileconfigProfile = Field(default=MobileconfigProfile.model_construct(),
                                              description="Apple configuration profiles: identifiers, signer (docs/clients.md)")

    @model_validator(mode="after")
    def _signer_outlives_renewal(self) -> Profile:
        if self.ocsp is not None and self.ocsp.signer_days <= self.renew.within_days:
            raise ValueError(f"ocsp.signer_days ({self.ocsp.signer_days}) must be more than renew.within_days "
                             f"({self.renew.within_days}), or every renew would replace the OCSP signer")
        return self

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """`nginx:` with nothing under it is YAML null: read it as an empty section, as a person means it."""
        if isinstance(data, dict):
            sections = ("ca", "clients", "crl", "renew", "nginx", "deliver", "mobileconfig")
            return {k: ({} if v is None and k in sections else v) for k, v in data.items()}
        return data

    @field_validator("pki_dir")
    @classmethod
    def _pki_dir(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                validate.config_value(v, what="path")
            except InputError as exc:
                raise ValueError(exc.message.replace("path ", "", 1)) from None
        return v

    def to_yaml_dict(self, pki_dir: Path) -> dict[str, Any]:
        """The resolved profile as saved in <pki>/mtls.yaml: every default written out."""
        data = self.model_dump(mode="json")
        data["pki_dir"] = str(pki_dir)
        data["ca"]["key"] = self.ca.key_spec.model_dump(mode="json", exclude_none=True)
        data["clients"]["key"] = self.clients.key_spec.model_dump(mode="json", exclude_none=True, exclude={"encrypt"})
        data["ca"]["subject"] = dict(self.ca.subject.fields())
        return data


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at a location (for "unknown key" messages)."""
    model: Any = Profile
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            out.append(f"{path}: unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
        elif err["type"] == "missing":
            out.append(f"{path}: required and missing")
        else:
            out.append(f"{path}: {_excerpt(err['input'])} is not allowed: {_excerpt(msg[0].lower() + msg[1:], 300, quote=False)}")
    return out


def _excerpt(value: Any, limit: int = 60, quote: bool = True) -> str:
    """A value as an error message shows it: its repr, cut to `limit` characters (a profile can be hostile)."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_profile(data: Any, source: str) -> Profile:
    """Validate already-parsed YAML data; raise ProfileError with one line per problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(source, [f"the top level must be a mapping of keys, not {type(data).__name__}"])
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(source, _problems(exc)) from None


# A profile is a few dozen keys. Aliases that expand to more nodes than this are an attack (a "billion
# laughs" document of 436 bytes produced a 76 MB error message), never a site profile.
PROFILE_MAX_NODES = 10_000


def _read_profile_bytes(path: Path) -> bytes:
    """The profile's bytes: a regular file, at most 256 KiB (mtlsctl/profile_file.py)."""
    from mtlsctl.profile_file import read_bytes

    return read_bytes(path)


def _decode(raw: bytes, path: Path) -> str:
    from mtlsctl.profile_file import decode

    return decode(raw, path)


def _read_profile_text(path: Path) -> str:
    """The profile's text (see _read_profile_bytes), UTF-8."""
    return _decode(_read_profile_bytes(path), path)


def _safe_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, but duplicate keys are errors (not silently last-wins) and alias expansion is bounded."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                raise ProfileError(source, [f"line {key_node.start_mark.line + 1}: a mapping key must be a plain value"]) from None
            if first is not None:
                raise ProfileError(source, [f"duplicate key {_excerpt(key)} at line {key_node.start_mark.line + 1} "
                                            f"(first at line {first}): remove one of them"])
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        # Count the nodes as the document expands them (an alias is counted every time it is used).
        count, stack = 0, [node]
        while stack:
            current = stack.pop()
            count += 1
            if count > PROFILE_MAX_NODES:
                raise ProfileError(source, [f"the document expands to more than {PROFILE_MAX_NODES} values "
                                            "(nested YAML aliases?); a site profile needs a few dozen"])
            if isinstance(current, yaml.MappingNode):
                for k, v in current.value:
                    stack.extend((k, v))
            elif isinstance(current, yaml.SequenceNode):
                stack.extend(current.value)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_profile(path: Path) -> Profile:
    """Read and validate a YAML profile file (a regular file of at most 256 KiB, no duplicate keys).

    The file is read and hashed on every call. When the same bytes were validated before by this very code
    (mtlsctl/profile_file.py, mtlsctl/cache.py: a private per-user entry keyed by the content and the
    validating code), the validated result is rebuilt from that entry without parsing or validating again;
    otherwise it is validated and stored. The result is the same either way (tests/test_profile_cache.py).
    """
    from mtlsctl.profile_file import open_profile

    return open_profile(path).profile


def validate_text(text: str, path: Path) -> Profile:
    """Parse and validate a profile's text (from the file at path): the one place a profile file is validated."""
    return _load_profile_text(text, path)


def _load_profile_text(text: str, path: Path) -> Profile:
    import yaml  # imported here: only commands that validate a profile pay for it

    try:
        data = _safe_yaml(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ProfileError(str(path), [f"YAML syntax error{where}: {problem}"]) from None
    return parse_profile(data, str(path))


def dump_profile(profile: Profile, pki_dir: Path) -> str:
    import yaml

    header = "# mtlsctl site profile (generated by mtlsctl init; see docs/profile.md)\n"
    return header + yaml.safe_dump(profile.to_yaml_dict(pki_dir), sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------ the validated profile, cached by content

CACHE_KIND = "profile"


def default_profile() -> Profile:
    """The built-in defaults (the guide's values), as Profile() gives them, without building a validator."""
    return Profile.model_construct()


def rebuild(dump: Any) -> Profile:
    """A validated Profile back from its model_dump(mode="json") without validating again (see _rebuild)."""
    return _rebuild(Profile, dump)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds (KeySpec, or RateLimit in `RateLimit | None`), or None."""
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _rebuild(model: type[_M], data: Any) -> _M:
    """A validated model back from its model_dump(mode="json"), without validating again (the entry is the dump
    of a model this code validated from the same bytes). Anything that does not have the model's shape is
    refused (ValueError), and the caller validates the file instead."""
    if not isinstance(data, dict) or set(data) != set(model.model_fields):
        raise ValueError("not the shape of " + model.__name__)
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        value = data[name]
        inner = _model_in(field.annotation)
        if inner is not None and value is not None:
            value = _rebuild(inner, value)
        elif isinstance(value, (dict, list)) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"unexpected value for {model.__name__}.{name}")
        values[name] = value
    return model.model_construct(**values)

