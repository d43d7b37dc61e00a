from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tasks import dataset as ds
from tasks.pii import PiiConfig, PiiScrubber, PiiStage
from tasks.stage import StageStats, run_stage, run_stage_on_dataset
from tests.test_langid import make_dataset

SCRUB = PiiScrubber(PiiConfig())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # email
        ("Write to jane.doe+lists@mail.example.org today.", "Write to <EMAIL> today."),
        ("Translator: Jean Dupont <jdupont@free.fr>", "Translator: Jean Dupont <<EMAIL>>"),
        ('<a href="mailto:bob@example.com">', '<a href="mailto:<EMAIL>">'),
        (
            "https://example.com/unsubscribe?email=ann@example.co.uk&id=3",
            "https://example.com/unsubscribe?email=<EMAIL>&id=3",
        ),
        ("Reach Me@Example.COM: I answer fast.", "Reach <EMAIL>: I answer fast."),
        ("bugs go to request@bugs.debian.org.", "bugs go to <EMAIL>."),
        # IPv4 / IPv6
        (
            "Failed password for root from 93.184.216.34 port 22 ssh2",
            "Failed password for root from <IP_ADDRESS> port 22 ssh2",
        ),
        ("curl http://52.14.201.7:8080/api", "curl http://<IP_ADDRESS>:8080/api"),
        (
            "PING mirror (2603:400a:ffff:bb8::801f:3e): 56 data bytes",
            "PING mirror (<IP_ADDRESS>): 56 data bytes",
        ),
        ("listen [2a00:1450:4001:82a::200e]:443;", "listen [<IP_ADDRESS>]:443;"),
        ("mapped ::ffff:93.184.216.34 too", "mapped <IP_ADDRESS> too"),
        ("Client 2001:4860:4860:0:0:0:0:8889 said", "Client <IP_ADDRESS> said"),
        # phone
        ("Call us: +44 20 7946 0958.", "Call us: <PHONE>."),
        ("US: +1 (202) 555-0143, DE: +49 30 901820", "US: <PHONE>, DE: <PHONE>"),
        ("Mobil +4915112345678 oder 0049 30 12345678", "Mobil <PHONE> oder <PHONE>"),
        ("Office (212) 555-0188 or 202-555-0143 or 202.555.0143", "Office <PHONE> or <PHONE> or <PHONE>"),
        ("Tel.: 030 1234567, Fax: 089 / 123 456 78", "Tel.: <PHONE>, Fax: <PHONE>"),
        ("Téléphone : 01 23 45 67 89", "Téléphone : <PHONE>"),
        ("电话：010-6552-9988", "电话：<PHONE>"),
    ],
)
def test_replaces_pii(text: str, expected: str) -> None:
    assert SCRUB.scrub(text)[0] == expected


@pytest.mark.parametrize(
    "text",
    [
        # not email addresses
        "git clone git@github.com:pretrain/factory.git",
        "ssh://git@github.com/pretrain/factory.git and https://user:s3cret@example.com/x",
        "systemctl enable getty@tty1.service openvpn@client.service",
        "log in as root@localhost, follow https://medium.com/@someone/post, cc @team",
        'my @list = (1, 2); print "$@"; $obj->method(@args); @property',
        # not IP addresses (or not personal ones)
        "Python 3.11.2 (2023-02-08), Debian 12.4, package 1.2.3.4-1, build 10.0.19041.1, v1.2.3.4",
        "see Section 24.2.2.4 for details; § 4.1.2.1 explains quoting",
        "intro\n12.6.2.1. Compiling and installing\ntext",
        "section numbering 4.2.1.3 and 9.9.9.9 (Quad9), nameserver 8.8.8.8",
        "servers 10.0.0.1, 192.168.1.10, 127.0.1.1, 203.0.113.5, 198.51.100.7, 2001:db8::1, ::1, fe80::1",
        "netmask 255.255.240.0, multicast 224.0.0.251 and ff02::fb, 999.1.2.3, 01.02.03.04",
        "std::vector<int> v; Foo::bar(); at 12:30:45; MAC 00:1a:2b:3c:4d:5e; rule ::= expr",
        # not phone numbers
        "Released in 1999, 2000, 2001 and 2002; listen on port 8080 or 443.",
        "Timestamp 1700000000, ISBN 978-3-16-148410-0, SSN-like 123-45-6789, range 100-200-3000",
        "table 12 345 678 | 90 123 456\n 044 36 24 $ | 045 37 25 %",
        "x = 3.14159 + 2.71828 * 1,234,567.89 - 0.0001",
        "2024-01-15 10:30:00 +0100, Boston, MA 02110-1301 USA",
        "@@ -1,30 +1,31 @@ diff hunk, C++ 11, score +12",
        "in 030 1234567 rows",  # a national-looking number without tel/phone/fax context
    ],
)
def test_leaves_non_pii_alone(text: str) -> None:
    assert SCRUB.scrub(text) == (text, {})


def test_counts_per_kind_and_idempotence() -> None:
    text = "a@example.com b@example.org 93.184.216.34 +44 20 7946 0958"
    scrubbed, counts = SCRUB.scrub(text)
    assert counts == {"email": 2, "ip_address": 1, "phone": 1}
    assert SCRUB.scrub(scrubbed) == (scrubbed, {})  # placeholders never match again


def test_kinds_and_placeholders_are_configurable() -> None:
    text = "mail a@example.com from 93.184.216.34, call +44 20 7946 0958"
    only_email = PiiScrubber(PiiConfig(kinds=["email"], email_placeholder="[email]"))
    assert only_email.scrub(text)[0] == "mail [email] from 93.184.216.34, call +44 20 7946 0958"
    no_email = PiiScrubber(
        PiiConfig(kinds=["phone", "ip_address"], phone_placeholder="", ip_address_placeholder="IP")
    )
    assert no_email.scrub(text)[0] == "mail a@example.com from IP, call "
    assert PiiScrubber(PiiConfig(kinds=[])).scrub(text) == (text, {})
    with pytest.raises(ValidationError):
        PiiConfig(kinds=["credit_card"])


def test_ip_allow_lists() -> None:
    text = "dns 208.67.222.222, lan 10.0.0.1, docs 192.0.2.1, host 93.184.216.34"
    assert SCRUB.scrub(text)[0] == "dns 208.67.222.222, lan 10.0.0.1, docs 192.0.2.1, host <IP_ADDRESS>"
    strict = PiiScrubber(PiiConfig(keep_non_global_ips=False, keep_ips=[]))
    assert strict.scrub(text)[0] == "dns <IP_ADDRESS>, lan <IP_ADDRESS>, docs <IP_ADDRESS>, host <IP_ADDRESS>"
    own = PiiScrubber(PiiConfig(keep_ips=["93.184.216.0/24"]))
    assert own.scrub(text)[0] == "dns <IP_ADDRESS>, lan 10.0.0.1, docs 192.0.2.1, host 93.184.216.34"
    with pytest.raises(ValidationError, match="not an IP address or network"):
        PiiConfig(keep_ips=["8.8.8.x"])


def test_long_inputs_stay_linear() -> None:
    # Unbounded local parts or digit groups would backtrack quadratically on these.
    texts = ["a" * 200_000 + "@", "1." * 100_000, "1 " * 100_000, "a:" * 100_000 + "::", "+1" * 100_000]
    start = time.perf_counter()
    for text in texts:
        SCRUB.scrub(text)
    assert time.perf_counter() - start < 5.0


def test_stage_transforms_counts_and_quarantines_bad_input() -> None:
    docs = [
        {"doc_id": "a", "text": "Contact ops@example.com or +44 20 7946 0958."},
        {"doc_id": "b", "text": "Python 3.11.2 on 10.0.0.1"},
        {"doc_id": "c", "text": None},
        {"doc_id": "d", "text": ""},
    ]
    stats = StageStats("pii")
    out = list(run_stage(PiiStage(), docs, stats))
    stats.check_accounting()
    assert [(d["doc_id"], d["text"], d["pii_replacements"]) for d in out] == [
        ("a", "Contact <EMAIL> or <PHONE>.", 2),
        ("b", "Python 3.11.2 on 10.0.0.1", 0),
        ("d", "", 0),
    ]
    assert dict(stats.quarantined) == {"text_missing": 1} and not stats.dropped
    assert stats.extra == {"pii_email": 1, "pii_ip_address": 0, "pii_phone": 1}


def test_run_stage_on_dataset_with_real_documents(corpus: Path, tmp_path: Path) -> None:
    with open(corpus / "neardup-dev.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(600), strict=False)]
    docs = [{"doc_id": r["id"], "text": r["text"]} for r in rows]
    source = make_dataset(tmp_path / "in", docs)

    manifest = run_stage_on_dataset(PiiStage(), source, tmp_path / "out")

    stats = manifest.stats
    assert stats["docs_in"] == stats["kept"] == len(docs)
    assert not stats["dropped"] and not stats["quarantined"]
    assert stats["extra"]["pii_email"] > 50  # man-page translator and author credits
    table = pq.read_table(ds.shard_paths(tmp_path / "out"))
    assert str(table.schema.field("pii_replacements").type) == "int32"
    assert sum(table.column("pii_replacements").to_pylist()) == sum(
        stats["extra"][f"pii_{kind}"] for kind in ("email", "ip_address", "phone")
    )
    counts = dict(
        zip(table.column("doc_id").to_pylist(), table.column("pii_replacements").to_pylist(), strict=True)
    )
    scrubbed = dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True))
    bracketed_address = re.compile(r"<[\w.+-]+@[\w-]+(?:\.[\w-]+)+>")
    for doc in docs:
        text = scrubbed[doc["doc_id"]]
        assert not bracketed_address.search(text), doc["doc_id"]
        # Only the counted spans changed: the original is the scrubbed text with each placeholder
        # standing for some replaced span.
        pieces = re.split(r"<EMAIL>|<IP_ADDRESS>|<PHONE>", text)
        assert len(pieces) - 1 == counts[doc["doc_id"]]
        assert re.fullmatch("(.+?)".join(map(re.escape, pieces)), doc["text"], re.DOTALL), doc["doc_id"]
