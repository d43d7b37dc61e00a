"""Per-language filter thresholds derived from data, by quantile matching to a reference language.

FineWeb-2 ships per-language filter settings but not how they were made. Ours are made by this
procedure, deterministic for given datasets and config (``pretrain thresholds derive``):

1. Measure. For every document of the input datasets (what the quality stage reads: documents with
   ``lang``), each threshold's statistic (``statistics``: the value its rule compares with the
   threshold), for every rule independently of the rule order: the distribution of what a rule
   would see, not only of what reaches it. A language's statistics are measured under its own
   current config (its overrides, e.g. the shorter short-line length of ja/zh).
2. Match. For the reference language (default en) and each threshold t_ref, the share p of its
   documents the threshold alone drops (statistic < t_ref for a rule that drops "below", > t_ref for
   one that drops "above"). Every other language with at least ``min_docs`` documents gets the
   threshold that alone drops the same share of its documents: threshold_lang =
   Q_lang(F_ref(t_ref)). Concretely, with the language's values sorted s_0 <= ... <= s_(n-1) and
   k = round(p n): s_k for "below" (the k values under it are dropped), s_(n-1-k) for "above". A
   derived threshold is always a value some document has; ties keep documents, so a language never
   loses more than its share.
3. Skip. A tail quantile cannot be estimated from a handful of documents: where the reference
   drops, or keeps, fewer than ``min_tail`` documents (default 5; p = 0 included), or the language's
   matched tail k (or the rest, n - k) holds fewer, the language keeps its current value; otherwise
   the cut would sit at the sample's extreme value and drop everything beyond it in later data. So
   does a language with fewer than ``min_docs`` documents (or values of a statistic).
4. Write. The derived values go to a JSON file: ``thresholds`` (language -> 'group.param' -> value;
   an n-gram limit as its group's whole list, the derived n's replaced) is what
   ``QualityConfig.thresholds_file`` reads; classifier score columns (``ScoreRule``, e.g.
   ``quality_score``) get the same matching, written under ``scores`` in the classifier's terms
   (``drop``, per-language ``thresholds``).
5. Dry run. ``dry_run`` applies the current and the derived config to the same documents through
   the quality rules themselves: per language, what each threshold alone drops and what the whole
   rule chain drops (first failing rule), current vs derived. The quality stage run with the
   written file drops exactly the derived chain's counts.

The statistics mirror the rules of ``tasks.quality`` one by one (``tests/test_thresholds.py`` checks
each against its rule); a statistic is None where its rule does not apply (no stop-word list, fewer
words than n, no lines left for FineWeb). Statistics are kept in memory (about 30 floats per
document): derive from a sample of shards, not from a whole crawl.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from tasks import dataset as ds
from tasks import text as tx
from tasks.atomic import atomic_write_json
from tasks.quality import (
    _BULLETS,
    _ELLIPSES,
    LanguageRules,
    Lines,
    Measures,
    QualityConfig,
    _duplicates,
    normalize_lang,
)

Drop = Literal["below", "above"]


class DerivationError(ValueError):
    """Input the derivation cannot use (too few reference documents, a missing column): one line."""


METHOD = "quantile matching to the reference language (tasks/thresholds.py)"


# ---------------------------------------------------------------------------------------------
# What each threshold is compared with


@dataclass
class Document:
    """One document as its language's rules see it, measured lazily."""

    rules: LanguageRules
    m: Measures

    @property
    def config(self) -> QualityConfig:
        return self.rules.config

    @cached_property
    def c4(self) -> tuple[str | None, Lines]:
        """C4's verdict and the lines FineWeb measures (all lines when C4 is off), as in the stage."""
        if not self.config.c4.enabled:
            return None, self.m.all_lines
        rejection, lines = self.rules._c4(self.m)
        return (rejection.rule if rejection else None), lines


@dataclass(frozen=True)
class Statistic:
    """What one threshold is compared with. ``key``: 'group.param', or 'group.param.n' for the
    n-gram limit of length n; ``drop``: a document is dropped below or above the threshold;
    ``rules``: the rules the threshold decides; ``measure``: the value (None: the rule does not
    apply to this document)."""

    key: str
    drop: Drop
    rules: tuple[str, ...]
    measure: Callable[[Document], float | None]


def _per_line(doc: Document, predicate: Callable[[str], bool]) -> float:
    lines = doc.m.lines
    return sum(1 for line in lines if predicate(line)) / len(lines)


def _mean_word_length(doc: Document) -> float | None:
    words, chars = doc.m.content_words
    return chars / words if words else None


def _stop_words(doc: Document) -> int | None:
    needed = len(tx.STOP_WORDS.get(doc.rules.lang, ())) + 1  # more than the list: an exact count
    return tx.stop_word_hits(doc.m.text, doc.m.words, doc.rules.lang, needed)


def _sentences(doc: Document) -> int | None:
    rule, lines = doc.c4
    if rule in ("c4_lorem_ipsum", "c4_curly_bracket"):  # they stop C4 before sentences count
        return None
    return sum(tx.count_sentences(line) for line in lines.lines)


def _fineweb_lines(measure: Callable[[Document, Lines], float | None]) -> Callable[[Document], float | None]:
    def on_lines(doc: Document) -> float | None:
        lines = doc.c4[1]
        return measure(doc, lines) if lines.lines else None

    return on_lines


def _line_punct(doc: Document, view: Lines) -> float | None:
    ratio = sum(1 for line in view.lines if line.rstrip().endswith(doc.rules.terminal)) / len(view.lines)
    return None if ratio == 0 and doc.config.fineweb.line_punct_exclude_zero else ratio


def _short_lines(doc: Document, view: Lines) -> float:
    limit = doc.config.fineweb.short_line_length
    return sum(1 for line in view.lines if len(line) <= limit) / len(view.lines)


def _ngram(kind: str, n: int) -> Callable[[Document], float | None]:
    def measure(doc: Document) -> float | None:
        m = doc.m
        if len(m.words) < n:
            return None
        chars = m.top_ngram_chars(n) if kind == "top" else m.duplicate_ngram_chars(n)
        return chars / len(m.text)

    return measure


def _fixed_statistics() -> list[Statistic]:
    g, r, c, f = "gopher_quality.", "gopher_repetition.", "c4.", "fineweb."
    return [
        Statistic(g + "min_doc_words", "below", ("gopher_short_document",), lambda d: d.m.content_words[0]),
        Statistic(g + "max_doc_words", "above", ("gopher_long_document",), lambda d: d.m.content_words[0]),
        Statistic(g + "min_avg_word_length", "below", ("gopher_avg_word_length",), _mean_word_length),
        Statistic(g + "max_avg_word_length", "above", ("gopher_avg_word_length",), _mean_word_length),
        Statistic(
            g + "max_symbol_word_ratio",
            "above",
            ("gopher_hash_ratio", "gopher_ellipsis_ratio"),  # one threshold for both ratios
            lambda d: max(d.m.text.count("#"), d.m.text.count("...") + d.m.text.count("…")) / len(d.m.words),
        ),
        Statistic(
            g + "max_bullet_lines_ratio",
            "above",
            ("gopher_bullet_lines",),
            lambda d: _per_line(d, lambda line: line.lstrip().startswith(_BULLETS)),
        ),
        Statistic(
            g + "max_ellipsis_lines_ratio",
            "above",
            ("gopher_ellipsis_lines",),
            lambda d: _per_line(d, lambda line: line.rstrip().endswith(_ELLIPSES)),
        ),
        Statistic(
            g + "min_alpha_words_ratio",
            "below",
            ("gopher_alpha_words",),
            lambda d: 1 - len(d.m.letterless_words) / len(d.m.words),
        ),
        Statistic(g + "min_stop_words", "below", ("gopher_stop_words",), _stop_words),
        Statistic(
            r + "dup_para_frac",
            "above",
            ("gopher_dup_para_frac",),
            lambda d: _duplicates(d.m.paragraphs)[0] / len(d.m.paragraphs),
        ),
        Statistic(
            r + "dup_para_char_frac",
            "above",
            ("gopher_dup_para_char_frac",),
            lambda d: _duplicates(d.m.paragraphs)[1] / len(d.m.text),
        ),
        Statistic(
            r + "dup_line_frac",
            "above",
            ("gopher_dup_line_frac",),
            lambda d: d.m.all_lines.duplicates[0] / len(d.m.lines),
        ),
        Statistic(
            r + "dup_line_char_frac",
            "above",
            ("gopher_dup_line_char_frac",),
            lambda d: d.m.all_lines.duplicates[1] / len(d.m.text),
        ),
        Statistic(c + "min_num_sentences", "below", ("c4_too_few_sentences",), _sentences),
        Statistic(f + "line_punct_thr", "below", ("fineweb_line_punct_ratio",), _fineweb_lines(_line_punct)),
        Statistic(f + "short_line_thr", "above", ("fineweb_short_line_ratio",), _fineweb_lines(_short_lines)),
        Statistic(
            f + "char_duplicates_ratio",
            "above",
            ("fineweb_char_dup_ratio",),
            _fineweb_lines(lambda _d, view: view.duplicates[1] / max(1, view.chars)),
        ),
        Statistic(
            f + "new_line_ratio",
            "above",
            ("fineweb_list_ratio",),
            _fineweb_lines(lambda _d, view: view.newlines / max(1, view.words)),
        ),
    ]


def statistics(config: QualityConfig) -> list[Statistic]:
    """Every threshold of ``config`` with its statistic (n-gram limits: one per n of its lists)."""
    stats = _fixed_statistics()
    repetition = config.gopher_repetition
    for limit in repetition.top_n_grams:
        key = f"gopher_repetition.top_n_grams.{limit.n}"
        stats.append(Statistic(key, "above", (f"gopher_top_{limit.n}gram",), _ngram("top", limit.n)))
    for limit in repetition.dup_n_grams:
        key = f"gopher_repetition.dup_n_grams.{limit.n}"
        stats.append(Statistic(key, "above", (f"gopher_dup_{limit.n}gram",), _ngram("dup", limit.n)))
    return stats


def _split_key(key: str) -> tuple[str, str, int | None]:
    group, param, *n = key.split(".")
    return group, param, int(n[0]) if n else None


def current_threshold(config: QualityConfig, key: str) -> float | None:
    """The threshold ``key`` in ``config`` (already for one language); None: off, or its group is."""
    group, param, n = _split_key(key)
    section = getattr(config, group)
    if not section.enabled:
        return None
    value = getattr(section, param)
    if n is None:
        return value
    return next((limit.max_char_frac for limit in value if limit.n == n), None)


def with_thresholds(config: QualityConfig, values: dict[str, float]) -> dict[str, Any]:
    """``values`` (statistic key -> threshold) as override parameters of ``config``: 'group.param' ->
    value, an n-gram limit as its whole list with the derived n's replaced."""
    params: dict[str, Any] = {}
    for key, value in sorted(values.items()):
        group, param, n = _split_key(key)
        if n is None:
            params[f"{group}.{param}"] = value
            continue
        limits = params.setdefault(
            f"{group}.{param}", [x.model_dump() for x in getattr(getattr(config, group), param)]
        )
        for limit in limits:
            if limit["n"] == n:
                limit["max_char_frac"] = value
    return params


def drops(values: np.ndarray, threshold: float, drop: Drop) -> int:
    """How many of ``values`` a threshold alone drops."""
    return int(np.count_nonzero(values < threshold if drop == "below" else values > threshold))


def match_quantile(
    reference: np.ndarray, threshold: float, drop: Drop, values: np.ndarray, min_tail: int = 1
) -> float | None:
    """The threshold that drops the same share of ``values`` as ``threshold`` drops of
    ``reference`` (module docstring, step 2); None when either side of the cut holds fewer than
    ``min_tail`` documents, in the reference or in ``values`` (step 3: nothing to match)."""
    dropped = drops(reference, threshold, drop)
    share = dropped / len(reference)
    k = math.floor(share * len(values) + 0.5)  # round half up
    if min(dropped, len(reference) - dropped, k, len(values) - k) < max(min_tail, 1):
        return None
    ordered = np.sort(values)
    value = ordered[k] if drop == "below" else ordered[len(ordered) - 1 - k]
    return value.item()


# ---------------------------------------------------------------------------------------------
# Measuring datasets


@dataclass(frozen=True)
class ScoreRule:
    """A classifier score column and the reference language's threshold on it (``drop`` as in the
    classifier stage's config: documents scoring below or above are dropped)."""

    column: str
    threshold: float
    drop: Drop = "below"

    @classmethod
    def parse(cls, spec: str) -> ScoreRule:
        """'COLUMN:THRESHOLD[:below|above]', e.g. 'quality_score:0.5'."""
        column, _, rest = spec.partition(":")
        threshold, _, drop = rest.partition(":")
        try:
            value = float(threshold)
        except ValueError:
            raise DerivationError(f"--score {spec!r}: expected COLUMN:THRESHOLD[:below|above]") from None
        if drop not in ("", "below", "above") or not column:
            raise DerivationError(f"--score {spec!r}: expected COLUMN:THRESHOLD[:below|above]")
        return cls(column, value, drop or "below")  # type: ignore[arg-type]


@dataclass
class Measured:
    """Per language: its document count and every statistic's (and score column's) values."""

    documents: Counter = field(default_factory=Counter)
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, lang: str, key: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(lang, {}).setdefault(key, []).append(value)

    def array(self, lang: str, key: str) -> np.ndarray:
        return np.asarray(self.values.get(lang, {}).get(key, []), dtype=np.float64)


def _rows(datasets: Iterable[Path], scores: list[ScoreRule]) -> Iterator[dict[str, Any]]:
    for dataset in datasets:
        names = {column["name"] for column in ds.read_manifest(dataset).schema_}
        missing = [s.column for s in scores if s.column not in names]
        if missing:
            raise DerivationError(f"{dataset}: no column {', '.join(missing)} (score columns to derive)")
        if "lang" not in names:
            raise DerivationError(f"{dataset}: no 'lang' column (derive from the quality stage's input)")
        yield from ds.iter_rows(dataset, columns=["text", "url", "lang", *[s.column for s in scores]])


class Rules:
    """``LanguageRules`` per language for one config, built once each."""

    def __init__(self, config: QualityConfig):
        self.config = config
        self._rules: dict[str, LanguageRules] = {}

    def __call__(self, lang: str) -> LanguageRules:
        if lang not in self._rules:
            self._rules[lang] = LanguageRules(self.config, lang)
        return self._rules[lang]


def measure(
    datasets: list[Path],
    config: QualityConfig,
    scores: list[ScoreRule] | None = None,
    hosts: list[str] | None = None,
) -> Measured:
    """Every statistic of every document with text, per language (module docstring, step 1);
    with ``hosts``, of the documents from those hosts only (e.g. one site in every language: then
    languages differ in language, not in what their pages are about)."""
    scores = scores or []
    stats = statistics(config)
    rules = Rules(config)
    measured = Measured()
    for row in _rows(datasets, scores):
        text, lang = row["text"], normalize_lang(row["lang"])
        if not isinstance(text, str) or not text.strip():
            continue  # the stage quarantines or drops it as empty, whatever the thresholds
        if hosts and urlsplit(row["url"] or "").hostname not in hosts:
            continue
        measured.documents[lang] += 1
        doc = Document(rules(lang), Measures(text))
        for stat in stats:
            measured.add(lang, stat.key, stat.measure(doc))
        for score in scores:
            measured.add(lang, f"score.{score.column}", row[score.column])
    return measured


# ---------------------------------------------------------------------------------------------
# Deriving, and what it would drop


@dataclass
class Derived:
    """What ``derive`` found: the file's content and, per language, each threshold's figures."""

    content: dict[str, Any]
    rows: list[dict[str, Any]]  # one per language and derived threshold: current vs derived


def derive(
    datasets: list[str | Path],
    config: QualityConfig | None = None,
    reference: str = "en",
    min_docs: int = 50,
    scores: list[ScoreRule] | None = None,
    hosts: list[str] | None = None,
    min_tail: int = 5,
    measured: Measured | None = None,
) -> Derived:
    """Per-language thresholds matched to ``reference``'s (module docstring, steps 1-4)."""
    config = config or QualityConfig()
    scores = scores or []
    paths = [ds.resolve_version(d) for d in datasets]
    measured = measured or measure(paths, config, scores, hosts)
    if measured.documents[reference] < min_docs:
        raise DerivationError(
            f"reference language {reference!r} has {measured.documents[reference]} documents in the "
            f"datasets; at least {min_docs} (min_docs) are needed"
        )
    ref_config = config.for_language(reference)
    targets = [
        (stat.key, stat.drop, current_threshold(ref_config, stat.key), current_threshold)
        for stat in statistics(config)
    ]
    targets += [(f"score.{s.column}", s.drop, s.threshold, lambda _c, _k, s=s: s.threshold) for s in scores]
    thresholds: dict[str, dict[str, Any]] = {}
    score_values: dict[str, dict[str, float]] = {s.column: {} for s in scores}
    rows = []
    for lang in sorted(measured.documents):
        if lang == reference or measured.documents[lang] < min_docs:
            continue
        lang_config = config.for_language(lang)
        derived: dict[str, float] = {}
        for key, drop, ref_threshold, current_of in targets:
            values, ref_values = measured.array(lang, key), measured.array(reference, key)
            current = current_of(lang_config, key)
            if ref_threshold is None or current is None or len(values) < min_docs or not len(ref_values):
                continue
            value = match_quantile(ref_values, ref_threshold, drop, values, min_tail)
            if value is None:
                continue
            if isinstance(current, int):  # counts (words, sentences, stop words) stay integers
                value = int(value)
            rows.append(
                {
                    "lang": lang,
                    "threshold": key,
                    "drop": drop,
                    "reference": ref_threshold,
                    "reference_share": drops(ref_values, ref_threshold, drop) / len(ref_values),
                    "documents": int(measured.documents[lang]),
                    "measured": len(values),
                    "current": current,
                    "current_drops": drops(values, current, drop),
                    "derived": value,
                    "derived_drops": drops(values, value, drop),
                }
            )
            if key.startswith("score."):
                score_values[key.removeprefix("score.")][lang] = value
            else:
                derived[key] = value
        if derived:
            thresholds[lang] = with_thresholds(lang_config, derived)
    content = {
        "method": METHOD,
        "reference": reference,
        "min_docs": min_docs,
        "min_tail": min_tail,
        "hosts": sorted(hosts or []),
        "datasets": [ds.dataset_digest(p) for p in paths],
        "documents": dict(sorted(measured.documents.items())),
        "thresholds": thresholds,
        "scores": {
            s.column: {
                "drop": s.drop,
                "reference_threshold": s.threshold,
                "thresholds": score_values[s.column],
            }
            for s in scores
        },
    }
    return Derived(content, rows)


def write_thresholds(derived: Derived, path: str | Path) -> Path:
    """Write the file ``QualityConfig.thresholds_file`` reads (atomic, key-sorted: same data, same bytes)."""
    atomic_write_json(path, derived.content)
    return Path(path)


@dataclass
class DryRun:
    """The whole rule chain over the same documents, current vs derived config: per language,
    documents and drops by the first failing rule."""

    documents: Counter = field(default_factory=Counter)
    current: dict[str, Counter] = field(default_factory=dict)
    derived: dict[str, Counter] = field(default_factory=dict)


def dry_run(datasets: list[str | Path], config: QualityConfig, derived_config: QualityConfig) -> DryRun:
    """What the quality stage drops with ``config`` and with ``derived_config`` (the same
    ``LanguageRules.evaluate`` the stage runs, so its counts are the stage's)."""
    result = DryRun()
    current, new = Rules(config), Rules(derived_config)
    for dataset in datasets:
        for row in ds.iter_rows(ds.resolve_version(dataset), columns=["text", "url", "lang"]):
            text, lang = row["text"], normalize_lang(row["lang"])
            if not isinstance(text, str):
                continue  # quarantined by the stage
            result.documents[lang] += 1
            for rules, counts in ((current, result.current), (new, result.derived)):
                rejection = rules(lang).evaluate(text, row["url"]).rejection
                if rejection is not None:
                    counts.setdefault(lang, Counter())[rejection.rule] += 1
    return result


def _share(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.1f}%)" if total else str(n)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def report_markdown(derived: Derived, run: DryRun | None = None) -> str:
    """The dry-run report: per language, each derived threshold against the current one, and
    what each drops alone; with ``run``, what the whole rule chain drops, current vs derived."""
    content = derived.content
    lines = [
        f"# Derived thresholds (reference: {content['reference']})",
        "",
        f"Method: {content['method']}; languages with at least {content['min_docs']} documents, "
        f"tails of at least {content['min_tail']}; "
        f"datasets {', '.join(d[:16] for d in content['datasets'])}"
        + (f"; matched on the documents of {', '.join(content['hosts'])}." if content["hosts"] else "."),
        "",
    ]
    if run is not None:
        lines += [
            "## Whole rule chain, per language",
            "",
            "| lang | documents | dropped now | dropped derived | top rules derived |",
            "|---|---:|---:|---:|---|",
        ]
        for lang in sorted(run.documents):
            n = run.documents[lang]
            now, new = run.current.get(lang, Counter()), run.derived.get(lang, Counter())
            top = ", ".join(f"{rule} {count}" for rule, count in new.most_common(3))
            lines.append(
                f"| {lang or '-'} | {n} | {_share(sum(now.values()), n)} | {_share(sum(new.values()), n)} | {top} |"
            )
        lines.append("")
    lines += [
        "## Each threshold alone",
        "",
        "Reference share: what the reference threshold drops of the reference language; drops: of "
        "the language's documents with a value (measured).",
        "",
        "| lang | threshold | drop | reference (share) | measured | current | drops | derived | drops |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in derived.rows:
        lines.append(
            f"| {r['lang']} | {r['threshold']} | {r['drop']} | {_fmt(r['reference'])} "
            f"({100 * r['reference_share']:.1f}%) | {r['measured']} | {_fmt(r['current'])} | "
            f"{_share(r['current_drops'], r['measured'])} | {_fmt(r['derived'])} | "
            f"{_share(r['derived_drops'], r['measured'])} |"
        )
    return "\n".join(lines) + "\n"


def apply(config: QualityConfig, content: dict[str, Any]) -> QualityConfig:
    """``config`` with the derived thresholds of ``content`` (a derived file's data) as its per-language
    overrides: what the quality stage applies when ``thresholds_file`` names that file."""
    data = config.model_dump(mode="json", exclude={"thresholds_sha256"})
    layers = (data["overrides"], config.derived_thresholds(), content["thresholds"])
    languages = sorted({lang for layer in layers for lang in layer})
    merged = {lang: {k: v for layer in layers for k, v in layer.get(lang, {}).items()} for lang in languages}
    return QualityConfig.model_validate({**data, "thresholds_file": None, "overrides": merged})
