"""PII scrubbing: replace email addresses, IP addresses and phone numbers with placeholders.

The stage transforms and never drops: every document comes out, with ``pii_replacements`` (how many
spans were replaced) and per-kind totals in ``stats.extra`` (``pii_email``, ``pii_ip_address``,
``pii_phone``). The patterns favour precision on technical text, where most numbers are not phone
numbers and most dotted quads are not hosts:

- email: ``local@domain.tld``, also in ``mailto:`` links and URL query strings. Not an address:
  ``user@host:path`` (an scp/git remote such as ``git@github.com:org/repo.git``: a login, not a
  mailbox), the userinfo of a URL (``https://user:pw@host/``, ``ssh://git@host/``), systemd template
  units (``getty@tty1.service``), ``user@localhost``, ``@handles`` and Perl's ``@array``.
- IP: IPv4 dotted quads and IPv6 addresses that parse as addresses (``ipaddress``). Kept: addresses
  that are not globally routable (private, loopback, link-local and the RFC 5737 / RFC 3849
  documentation ranges: examples, not people), multicast and reserved ones (netmasks), the
  well-known public resolvers in ``keep_ips``, quads whose four parts are single digits (``4.2.1.3``
  is a section or version number far more often than a host) and section numbers ("see Section
  24.2.2.4", a line starting "12.6.2.1. "). Versions like ``3.11.2`` or ``1.2.3.4-1``, dates and
  times (``12:30:45``), MAC addresses and C++ ``std::`` never match.
- phone: ``+CC`` / ``00CC`` international numbers of 8-15 digits, ``(area) local`` numbers,
  ``555-123-4567`` style North-American numbers (one separator throughout), and national numbers
  with a leading trunk ``0`` (``030 1234567``) only after a word like "tel", "phone" or "fax".
  Years, ports, versions, IDs and numeric table columns do not match.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, Field, field_validator

from tasks.stage import Document, DocumentStage, StageStats

PiiKind = Literal["email", "ip_address", "phone"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "ip_address", "phone")

# Public DNS resolvers (Google, Cloudflare, Quad9, OpenDNS): configuration examples, not people.
DEFAULT_KEEP_IPS = [
    "8.8.8.8/32", "8.8.4.4/32", "1.1.1.1/32", "1.0.0.1/32", "9.9.9.9/32", "149.112.112.112/32",
    "208.67.222.222/32", "208.67.220.220/32",
    "2001:4860:4860::8888/128", "2001:4860:4860::8844/128", "2606:4700:4700::1111/128",
    "2606:4700:4700::1001/128", "2620:fe::fe/128",
]  # fmt: skip

_SYSTEMD_UNIT_SUFFIXES = "service|socket|timer|target|mount|automount|path|slice|scope|device|swap"

# Each pattern starts with a character class and checks the character before it with a two-character
# lookbehind: a pattern that starts with an assertion makes `re` try every position (3-5x slower).
_EMAIL = re.compile(
    rf"""
    [A-Za-z0-9._%+-]
    (?:(?<=mailto:.)|(?<![\w.+%/:@-].))   # start of a token; not a URL's userinfo (after / or :)
    [A-Za-z0-9._%+-]{{0,63}}              # rest of the local part (bounded: no quadratic backtracking)
    @
    (?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.){{1,8}}
    (?!(?:{_SYSTEMD_UNIT_SUFFIXES})\b)    # getty@tty1.service is a systemd unit
    [A-Za-z]{{2,63}}                      # top-level domain
    (?![\w-]|\.[A-Za-z0-9]|:[\w~/.])      # whole domain; user@host:path is an scp/git remote
    """,
    re.VERBOSE,
)
# Candidates only: ipaddress decides (octets up to 255, no leading zeros, valid IPv6 grouping).
# Not inside a longer dotted number (1.2.3.4.5), a word (v1.2.3.4) or a version (1.2.3.4-1).
_IPV4 = re.compile(r"\d(?<![\w.-]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w-]|\.\d)")
# Hex groups and colons (a colon within the first five characters), with an optional IPv4 tail.
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.].)[0-9A-Fa-f]{0,3}:[0-9A-Fa-f:]{1,37}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)"
)

# "see Section 24.2.2.4", "§ 4.1.2.1": documentation cross-references, not hosts.
_SECTION_WORD = re.compile(
    r"(?i)(?:\b(?:section|sect|chapter|chap|see|step|paragraph|abschnitt|kapitel|chapitre|cap[íi]tulo|"
    r"secci[óo]n|se[çc][ãa]o|sezione|rozdział|раздел|глава)|§|章|节|節)\W{0,3}$"
)

_SEP = r"[ \u00a0.-]"  # separators inside a phone number: never a newline or a tab
_PHONE = re.compile(
    rf"""
    [+(\d](?<![\w+.,/:-].)                # not inside a number, word, version, path or range
    (?:                                   # the first character is already matched: (?<=...) names it
        (?P<intl>(?:(?<=\+)|(?<=0)0)[1-9]\d{{0,2}}{_SEP}?(?:\(\d{{1,4}}\){_SEP}?)?\d{{1,5}}(?:{_SEP}?\d{{2,5}}){{1,5}})
      | (?P<area>(?<=\()\d{{2,5}}\){_SEP}?\d{{3,4}}{_SEP}?\d{{3,5}})
      | (?P<nanp>(?<=[2-9])\d\d(?P<nanp_sep>[.-])[2-9]\d\d(?P=nanp_sep)\d{{4}})
      | (?P<national>(?<=0)\d{{1,4}}(?:\ ?/\ ?|[ \u00a0-]|\)\ ?)\d{{2,4}}(?:[ \u00a0-]?\d{{2,4}}){{1,3}})
    )
    (?![\w]|[.,:/-]\d)                    # the whole number, not the start of a longer one
    """,
    re.VERBOSE,
)
# Words that announce a phone number, for the weakest pattern (national numbers): tel, phone, fax, ...
_PHONE_CONTEXT = re.compile(
    r"(?i)(?:\b(?:tel|tél|phone|telephone|téléphone|telefon|telefono|teléfono|telefone|fax|mobile|mobil|"
    r"cell|call|ruf|handy|gsm)\b|телефон|тел\.|電話|电话|☎|📞)[^\n\d]{0,12}$"
)
_PHONE_DIGITS = {"intl": (8, 15), "area": (9, 12), "nanp": (10, 10), "national": (8, 12)}


def _is_section_number(match: re.Match[str]) -> bool:
    """A dotted quad after "Section"/"see"/..., or heading a line as "12.2.1.1. Title"."""
    text, (start, end) = match.string, match.span()
    if _SECTION_WORD.search(text, max(0, start - 24), start):
        return True
    line_start = text.rfind("\n", 0, start) + 1
    heads_line = not text[line_start:start].strip()
    return heads_line and text.startswith((". ", ".\n"), end)


class PiiConfig(BaseModel):
    kinds: list[PiiKind] = Field(
        default_factory=lambda: list(PII_KINDS),
        description="Which kinds of PII to replace: email, ip_address, phone.",
    )
    email_placeholder: str = Field(default="<EMAIL>", description="Replaces each email address.")
    ip_address_placeholder: str = Field(
        default="<IP_ADDRESS>", description="Replaces each IPv4/IPv6 address that is not kept."
    )
    phone_placeholder: str = Field(default="<PHONE>", description="Replaces each phone number.")
    keep_non_global_ips: bool = Field(
        default=True,
        description=(
            "Keep IP addresses that are not globally routable: private (10/8, 192.168/16, ...), loopback, "
            "link-local and the documentation ranges (192.0.2.0/24, 2001:db8::/32, ...). They name no one."
        ),
    )
    keep_ips: list[str] = Field(
        default_factory=lambda: list(DEFAULT_KEEP_IPS),
        description="Public IP addresses or networks (CIDR) to keep, e.g. well-known DNS resolvers.",
    )

    @field_validator("kinds")
    @classmethod
    def _unique_kinds(cls, kinds: list[PiiKind]) -> list[PiiKind]:
        return [k for k in PII_KINDS if k in kinds]

    @field_validator("keep_ips")
    @classmethod
    def _check_networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as e:
                raise ValueError(f"keep_ips: {network!r} is not an IP address or network: {e}") from e
        return networks


class PiiScrubber:
    """Replaces the configured kinds of PII in a text; ``scrub`` returns the text and counts per kind."""

    def __init__(self, config: PiiConfig):
        self.config = config
        self.keep_networks = [ipaddress.ip_network(n, strict=False) for n in config.keep_ips]
        passes: dict[PiiKind, Callable[[str, Counter], str]] = {
            "email": self._scrub_emails,
            "ip_address": self._scrub_ips,
            "phone": self._scrub_phones,
        }
        self._passes = [passes[kind] for kind in config.kinds]

    def scrub(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        for scrub_pass in self._passes:
            text = scrub_pass(text, counts)
        return text, counts

    def _scrub_emails(self, text: str, counts: Counter) -> str:
        if "@" not in text:
            return text
        text, n = _EMAIL.subn(self.config.email_placeholder, text)
        if n:
            counts["email"] += n
        return text

    def _scrub_ips(self, text: str, counts: Counter) -> str:
        def replace(match: re.Match[str]) -> str:
            if self._keep_ip(match.group()) or _is_section_number(match):
                return match.group()
            counts["ip_address"] += 1
            return self.config.ip_address_placeholder

        # IPv6 first: an IPv4 tail (::ffff:192.0.2.1) belongs to the IPv6 address.
        if "::" in text or text.count(":") >= 7:
            text = _IPV6.sub(replace, text)
        if "." in text:
            text = _IPV4.sub(replace, text)
        return text

    def _keep_ip(self, candidate: str) -> bool:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            return True  # not an address after all: a time, a C++ scope, a MAC address
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped  # ::ffff:93.184.216.34 is that IPv4 host
        if address.version == 4 and all(len(part) == 1 for part in candidate.split(".")):
            return True  # 4.2.1.3: a section or version number
        if address.version == 6 and sum(bool(group) for group in candidate.split(":")) < 2:
            return True  # ::88b in ASCII art, ::1 (loopback anyway)
        if address.is_multicast or address.is_reserved or address.is_unspecified:
            return True  # not the address of a host
        if self.config.keep_non_global_ips and not address.is_global:
            return True
        return any(address in network for network in self.keep_networks)

    def _scrub_phones(self, text: str, counts: Counter) -> str:
        def replace(match: re.Match[str]) -> str:
            kind = match.lastgroup if match.lastgroup != "nanp_sep" else "nanp"
            low, high = _PHONE_DIGITS[kind]
            digits = sum(c.isdigit() for c in match.group())
            if not low <= digits <= high:
                return match.group()
            if kind == "national" and not _PHONE_CONTEXT.search(
                text, max(0, match.start() - 40), match.start()
            ):
                return match.group()
            counts["phone"] += 1
            return self.config.phone_placeholder

        return _PHONE.sub(replace, text)


class PiiStage(DocumentStage):
    name = "pii"
    output_fields: ClassVar[list[pa.Field]] = [pa.field("pii_replacements", pa.int32())]

    def __init__(self, config: PiiConfig | None = None):
        super().__init__(config or PiiConfig())
        self.config: PiiConfig
        self.scrubber = PiiScrubber(self.config)

    def process(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        totals: Counter = Counter()
        for doc in docs:
            text = doc.get("text")
            if not isinstance(text, str):
                stats.quarantine("text_missing", f"text is {type(text).__name__}, not a string", doc=doc)
                continue
            scrubbed, counts = self.scrubber.scrub(text)
            totals.update(counts)
            yield {**doc, "text": scrubbed, "pii_replacements": sum(counts.values())}
        for kind in self.config.kinds:
            key = f"pii_{kind}"
            stats.extra[key] = stats.extra.get(key, 0) + totals[kind]
