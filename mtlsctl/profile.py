"""The YAML site profile: pydantic v2 models, loading, and errors one line per problem.

Key names are a public contract (docs/profile.md). Unknown keys are errors everywhere; a partial
mapping keeps the defaults for what it leaves out; the built-in defaults are exactly the guide's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtlsctl import validate
from mtlsctl.errors import InputError, ProfileError

DEFAULT_PKI_DIR = "/etc/nginx/pki"



class _Strict(BaseModel):
    # strict: "365" (a string) or `true` are not days; extra: a typo is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class KeySpec(_Strict):
    """A key: RSA with `bits`, or EC on a named `curve`."""

    type: Literal["rsa", "ec"] = "rsa"
    bits: Optional[int] = Field(default=None, ge=2048, le=8192, description="RSA only: 2048..8192")
    curve: Optional[Literal["P-256", "P-384"]] = Field(default=None, description="EC only")

    @model_validator(mode="after")
    def _fits_type(self) -> KeySpec:
        if self.type == "rsa" and self.curve is not None:
            raise ValueError("curve is for type: ec; an rsa key takes bits")
        if self.type == "ec" and self.bits is not None:
            raise ValueError("bits is for type: rsa; an ec key takes curve (P-256 or P-384)")
        return self

    def resolved(self, default_bits: int, default_curve: str) -> KeySpec:
        """This spec with the context's default size filled in."""
        if self.type == "rsa":
            return KeySpec(type="rsa", bits=self.bits or default_bits)
        return KeySpec(type="ec", curve=self.curve or default_curve)  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"RSA {self.bits}-bit" if self.type == "rsa" else f"EC {self.curve}"


class Subject(_Strict):
    """The CA's distinguished name; every field but CN may be left out."""

    C: Optional[str] = Field(default=None, description="two-letter country code")
    ST: Optional[str] = None
    L: Optional[str] = None
    O: Optional[str] = None  # noqa: E741 - the DN attribute is called O
    OU: Optional[str] = None
    CN: str

    @field_validator("C")
    @classmethod
    def _country(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (len(v) != 2 or not v.isascii() or not v.isalpha() or not v.isupper()):
            raise ValueError("must be two capital letters, e.g. ES")
        return v

    @field_validator("ST", "L", "O", "OU", "CN")
    @classmethod
    def _safe(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if len(v) > 64:
            raise ValueError("at most 64 characters")
        try:
            validate.config_value(v, what="value")
        except InputError as exc:
            raise ValueError(exc.message.split(" contains ", 1)[-1] if " contains " in exc.message
                             else "empty or surrounded by spaces") from None
        return v

    def fields(self) -> list[tuple[str, str]]:
        """(attribute, value) pairs in DN order, skipping the ones left out."""
        return [(k, v) for k in ("C", "ST", "L", "O", "OU", "CN") if (v := getattr(self, k)) is not None]


GUIDE_SUBJECT = Subject(
    C="ES", ST="Valencia", L="Valencia", O="JMRP-IO-LAB", OU="Infrastructure Security", CN="JMRP-IO-LAB Root CA"
)


class CaProfile(_Strict):
    subject: Subject = GUIDE_SUBJECT
    key: KeySpec = KeySpec(type="rsa", bits=4096)
    days: int = Field(default=3650, ge=1, le=36500)

    @property
    def key_spec(self) -> KeySpec:
        return self.key.resolved(4096, "P-384")

    @property
    def digest(self) -> str:
        """Digest follows the key: sha384 for a P-384 CA (FIELD-NOTES: Keys), else sha256."""
        return "sha384" if self.key_spec.curve == "P-384" else "sha256"


class ClientsProfile(_Strict):
    key: KeySpec = KeySpec(type="rsa", bits=2048)
    days: int = Field(default=365, ge=1, le=3650)
    p12: Literal["compat", "modern", "legacy"] = "compat"

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


def _command_line(value: Optional[str]) -> Optional[str]:
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


class NginxProfile(_Strict):
    """nginx integration. The nginx issue adds the site settings."""

    test_command: Optional[str] = Field(default="nginx -t", description="run before every reload; null or empty: skip")
    reload_command: Optional[str] = Field(
        default="systemctl reload nginx", description="run after a CRL change when the test passes; null or empty: never reload"
    )

    @field_validator("test_command", "reload_command")
    @classmethod
    def _commands(cls, v: Optional[str]) -> Optional[str]:
        return _command_line(v)


class Profile(_Strict):
    pki_dir: Optional[str] = Field(default=None, description="where the PKI lives; default /etc/nginx/pki")
    ca: CaProfile = CaProfile()
    clients: ClientsProfile = ClientsProfile()
    crl: CrlProfile = CrlProfile()
    renew: RenewProfile = RenewProfile()
    nginx: NginxProfile = NginxProfile()

    @field_validator("pki_dir")
    @classmethod
    def _pki_dir(cls, v: Optional[str]) -> Optional[str]:
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
        data["clients"]["key"] = self.clients.key_spec.model_dump(mode="json", exclude_none=True)
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
            out.append(f"{path}: {err['input']!r} is not allowed: {msg[0].lower() + msg[1:]}")
    return out


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


def load_profile(path: Path) -> Profile:
    """Read and validate a YAML profile file."""
    import yaml  # imported here: only commands that read a profile pay for it

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"profile {path} does not exist", hint="check --profile / MTLSCTL_PROFILE") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"profile {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
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
