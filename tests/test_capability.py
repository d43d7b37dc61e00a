"""Capability tasks: the lm-evaluation-harness layout, lm-eval's scoring, our corpus tasks built
deterministically from validation documents, chance for an untrained model and more for a trained one."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.capability import (
    Item,
    Task,
    TaskError,
    encode_requests,
    evaluate_tasks,
    load_task,
    load_tasks,
    loglikelihoods,
    task_metrics,
    task_result,
)
from model.generate import read_prompts
from model.model import Transformer, model_config
from tasks import build_eval_tasks as bet
from tasks import pack
from tasks import tokenizer as tk
from tests.test_generate import EOT, byte_bpe
from tests.test_tokenizer import SMALL, build_lid_dataset

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- a synthetic corpus where both tasks are learnable ----------------------------------------------
#
# Two "languages" of four topics each; a page uses the six words of its topic. A sentence is five
# words and ends with . ! or ?, and the next sentence opens with a word of that mark's pair:
# page_continuation is learnable from topic words, next_sentence from the (mark, opener) bigram,
# word_order from where the opener and the mark stand. No word repeats within a sentence: an untrained
# model favours a token repeated right after itself, which would tell true orders (topic words
# together) from shuffled ones (broken up by the opener and the mark).

OPENERS = {".": ["so", "then"], "!": ["wow", "yes"], "?": ["who", "why"]}


def topic_words() -> list[list[str]]:
    rng = random.Random(0)
    words: set[str] = set()
    while len(words) < 48:
        words.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2)))
    ordered = sorted(words)
    return [ordered[i * 6 : (i + 1) * 6] for i in range(8)]


def synthetic_pages(seed: int, n: int) -> list[bet.Document]:
    rng = random.Random(seed)
    topics = topic_words()
    pages = []
    for page in range(n):
        topic = rng.randrange(8)
        sentences, mark = [], None
        for _ in range(rng.randint(8, 10)):
            first = rng.choice(OPENERS[mark]) if mark else rng.choice(topics[topic])
            mark = rng.choice(".!?")
            sentences.append(" ".join([first, *rng.sample(topics[topic], 4)]) + mark)
        pages.append(bet.Document(f"doc-{seed}-{page:05d}", "xa" if topic < 4 else "xb", " ".join(sentences)))
    return pages


@pytest.fixture(scope="module")
def corpus_tasks(tmp_path_factory) -> tuple[Path, list[Task]]:
    folder = tmp_path_factory.mktemp("tasks")
    bet.write_task_folder(synthetic_pages(2, 120), folder)
    return folder, load_tasks(folder)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe([page.text for page in synthetic_pages(1, 200)], vocab_size=400)


def untrained(tokenizer) -> Transformer:
    model = Transformer(model_config("tiny", vocab_size=tokenizer.get_vocab_size(), max_seq_len=256))
    model.init_weights(seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tokenizer) -> Transformer:
    """The tiny model after 60 AdamW steps on 1000 training pages (distinct from the task pages)."""
    eot = tokenizer.token_to_id(EOT)
    stream = []
    for page in synthetic_pages(1, 1000):
        stream += [eot, *tokenizer.encode(page.text).ids]
    stream = torch.tensor(stream)
    model = untrained(tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(stream) - 65, (16,), generator=generator)
        windows = torch.stack([stream[s : s + 65] for s in starts.tolist()])
        loss = model(windows[:, :-1], windows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def binomial_bound(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_an_untrained_model_scores_at_chance(corpus_tasks, tokenizer):
    _, tasks = corpus_tasks
    results = evaluate_tasks(untrained(tokenizer), tokenizer, tasks, prefix_id=tokenizer.token_to_id(EOT))
    assert sorted(results) == ["next_sentence", "page_continuation", "word_order"]
    for result in results.values():
        assert result.items == 120 and result.chance == 0.25
        for acc in (result.acc, result.acc_norm):
            assert abs(acc - result.chance) <= binomial_bound(result.chance, result.items), result


def test_a_trained_model_scores_above_chance(corpus_tasks, tokenizer, trained):
    _, tasks = corpus_tasks
    results = evaluate_tasks(trained, tokenizer, tasks, prefix_id=tokenizer.token_to_id(EOT))
    for result in results.values():
        floor = result.chance + binomial_bound(result.chance, result.items)
        assert result.acc > floor and result.acc_norm > floor, result
    metrics = task_metrics(results)
    assert set(metrics) == {f"task/{t}/{m}" for t in bet.TASKS for m in ("acc", "acc_norm")}
    assert metrics["task/page_continuation/acc"] == results["page_continuation"].acc


# -- building our tasks -----------------------------------------------------------------------------


def test_the_build_is_deterministic_and_its_items_come_from_the_documents(tmp_path):
    pages = synthetic_pages(3, 60)
    first, second = tmp_path / "a", tmp_path / "b"
    info = bet.write_task_folder(pages, first, max_items=50)
    bet.write_task_folder(pages, second, max_items=50)
    names = sorted(p.name for p in first.iterdir())
    assert names == [
        "build.json",
        "next_sentence.jsonl",
        "next_sentence.yaml",
        "page_continuation.jsonl",
        "page_continuation.yaml",
        "prompts.jsonl",
        "word_order.jsonl",
        "word_order.yaml",
    ]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    for task in bet.TASKS:
        assert (first / f"{task}.yaml").read_bytes() == (REPO / "evals" / f"{task}.yaml").read_bytes()
        assert info["tasks"][task]["items"] == 50
        assert info["tasks"][task]["languages"]["xa"] in (24, 25, 26)  # round-robin over languages

    text_of = {page.doc_id: page for page in pages}
    for row in map(json.loads, (first / "next_sentence.jsonl").read_text().splitlines()):
        page = text_of[row["id"]]
        truth = row["choices"][row["label"]]
        assert len(set(row["choices"])) == 4
        assert row["context"] + truth in page.text  # the true sentence follows the context on the page
        for choice in row["choices"]:
            assert page.text.index(choice) >= page.text.index(row["context"]) + len(row["context"])
    labels = []
    for row in map(json.loads, (first / "page_continuation.jsonl").read_text().splitlines()):
        page = text_of[row["id"]]
        assert page.text.startswith(row["context"] + row["choices"][row["label"]])
        others = [c for i, c in enumerate(row["choices"]) if i != row["label"]]
        same_language = [p for p in pages if p.lang == page.lang and p.doc_id != page.doc_id]
        assert all(any(c in p.text for p in same_language) for c in others)
        labels.append(row["label"])
    assert set(labels) == {0, 1, 2, 3}
    for row in map(json.loads, (first / "word_order.jsonl").read_text().splitlines()):
        truth = row["choices"][row["label"]]
        assert row["context"] + truth in text_of[row["id"]].text and len(set(row["choices"])) == 4
        for choice in row["choices"]:  # the same words, in another order
            assert sorted(choice.split(" ")) == sorted(truth.split(" ")) and len(choice) == len(truth)
    prompts = read_prompts(first / "prompts.jsonl")
    assert [p.lang for p in prompts] == ["xa"] * 3 + ["xb"] * 3


def test_the_build_reads_the_validation_documents_of_a_packed_dataset(corpus, tmp_path):
    source = build_lid_dataset(corpus, tmp_path / "input", limit=300, shards=2)
    tokenizer_dir = tmp_path / "tokenizer"
    tk.train_tokenizer([source], tokenizer_dir, SMALL)
    packed = tmp_path / "packed"
    pack.pack_datasets([source], tokenizer_dir, packed, pack.PackConfig(seq_len=64, validation_fraction=0.3))
    documents = bet.read_validation_documents(packed)
    texts = {}
    for line in (corpus / "lid-dev.jsonl").read_text(encoding="utf-8").splitlines()[:300]:
        row = json.loads(line)
        texts[row["text"]] = row["lang"]
    assert 40 < len(documents) < 150
    assert [d.doc_id for d in documents] == sorted(d.doc_id for d in documents)
    assert all(texts[d.text] == d.lang for d in documents)

    output = tmp_path / "eval-tasks"
    bet.main(["--packed", str(packed), "--output", str(output), "--max-items", "30"])
    build = json.loads((output / "build.json").read_text())
    assert build["source"]["packed_digest"] and build["tasks"]["next_sentence"]["items"] == 30
    tasks = load_tasks(output)
    assert [t.name for t in tasks] == ["next_sentence", "page_continuation", "word_order"]
    with pytest.raises(SystemExit, match="build_eval_tasks: "):
        bet.main(["--packed", str(tmp_path / "missing"), "--output", str(output)])


# -- the lm-evaluation-harness layout ---------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


ARC_YAML = """\
task: arc_mini
dataset_path: json
dataset_kwargs:
  data_files:
    train: arc_train.jsonl
    test: arc_test.jsonl
validation_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list:
  - metric: acc
"""

PIQA_BASE = """\
dataset_path: json
output_type: multiple_choice
doc_to_text: !function utils.piqa_text
doc_to_choice: "{{[sol1, sol2]}}"
doc_to_target: label
description: "Pick a solution.\\n\\n"
"""

PIQA_YAML = """\
include: _piqa_base.yaml
task: piqa_mini
dataset_kwargs:
  data_files: piqa.jsonl
"""

LAMBADA_YAML = """\
task: lambada_mini
dataset_path: json
dataset_kwargs:
  data_files: {test: lambada.jsonl}
test_split: test
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
"""


def test_tasks_load_from_the_lm_eval_layout(tmp_path):
    folder = tmp_path / "tasks"
    (folder / "piqa").mkdir(parents=True)
    (folder / "arc.yaml").write_text(ARC_YAML)
    question = {"question": "What melts ice?", "choices": {"text": ["heat", "cold"], "label": ["A", "B"]}}
    write_jsonl(folder / "arc_test.jsonl", [{**question, "answerKey": "A"}, {**question, "answerKey": "B"}])
    write_jsonl(folder / "arc_train.jsonl", [{**question, "answerKey": "B"}])
    (folder / "piqa" / "_piqa_base.yaml").write_text(PIQA_BASE)
    (folder / "piqa" / "piqa.yaml").write_text(PIQA_YAML)
    (folder / "piqa" / "utils.py").write_text(
        "def piqa_text(doc):\n    return 'Goal: ' + doc['goal'] + '\\nSolution:'\n"
    )
    write_jsonl(
        folder / "piqa" / "piqa.jsonl", [{"goal": "open a jar", "sol1": "twist", "sol2": "sing", "label": 0}]
    )
    (folder / "lambada.yaml").write_text(LAMBADA_YAML)
    write_jsonl(folder / "lambada.jsonl", [{"text": "the cat sat on the mat"}])
    (folder / "group.yaml").write_text("group: mini\ntask: [arc_mini, piqa_mini]\n")  # a group: skipped

    arc, lambada, piqa = load_tasks(folder)
    assert arc.name == "arc_mini" and arc.target_delimiter == " "
    assert arc.items == [  # the test split, as lm-eval takes it before validation
        Item("Question: What melts ice?\nAnswer:", ["heat", "cold"], 0),
        Item("Question: What melts ice?\nAnswer:", ["heat", "cold"], 1),
    ]
    assert piqa.items == [Item("Pick a solution.\n\nGoal: open a jar\nSolution:", ["twist", "sing"], 0)]
    assert lambada.output_type == "loglikelihood"
    assert lambada.items == [Item("the cat sat on the", [" mat"], 0)]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("task: t\ndataset_path: allenai/ai2_arc\noutput_type: multiple_choice\n", "only local data"),
        (
            "task: t\ndataset_path: json\ndataset_kwargs: {data_files: d.jsonl}\noutput_type: generate_until\n",
            "not scored",
        ),
        (
            "task: t\ndataset_path: json\ndataset_kwargs: {data_files: d.jsonl}\noutput_type: multiple_choice\n"
            "doc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: c\n",
            "not one of the choices",
        ),
        (
            "task: t\ndataset_path: json\ndataset_kwargs: {data_files: d.jsonl}\noutput_type: multiple_choice\n"
            "doc_to_text: '{{missing}}'\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n",
            "UndefinedError",
        ),
        (
            "task: t\ndataset_path: json\ndataset_kwargs: {data_files: d.jsonl}\noutput_type: multiple_choice\n"
            "num_fewshot: 5\n",
            "few-shot",
        ),
        (
            "task: t\ndataset_path: json\ndataset_kwargs: {data_files: gone.jsonl}\noutput_type: multiple_choice\n",
            "cannot read data file",
        ),
        ("task: t\ninclude: t.yaml\n", "include cycle"),
        ("task: [unclosed\n", "unreadable YAML"),
    ],
)
def test_bad_task_definitions_are_one_line_errors(tmp_path, yaml_text, message):
    (tmp_path / "t.yaml").write_text(yaml_text)
    write_jsonl(tmp_path / "d.jsonl", [{"q": "question", "c": "neither"}])
    with pytest.raises(TaskError, match=message) as error:
        load_task(tmp_path / "t.yaml")
    assert "\n" not in str(error.value) and str(tmp_path / "t.yaml") in str(error.value)


# -- scoring ----------------------------------------------------------------------------------------


def test_requests_are_split_like_lm_eval(tokenizer):
    eot = tokenizer.token_to_id(EOT)
    [(context, continuation)] = encode_requests(tokenizer, [("so kuve mini ", "gupu.")], prefix_id=eot)
    # the context's trailing space moves into the continuation: " gupu" stays one word token
    assert context == [eot, *tokenizer.encode("so kuve mini").ids]
    assert context[1:] + continuation == tokenizer.encode("so kuve mini gupu.").ids
    assert tokenizer.decode(continuation) == " gupu."


def test_loglikelihoods_are_the_continuation_log_probabilities_whatever_the_batching(tokenizer):
    model = untrained(tokenizer)
    pairs = [("so kuve", " mini gupu."), ("why", " kodu."), ("then kuve mini gupu kodu", " kuve mini!")]
    requests = encode_requests(tokenizer, pairs, prefix_id=tokenizer.token_to_id(EOT))
    batched = loglikelihoods(model, requests, batch_tokens=4096)
    one_by_one = loglikelihoods(model, requests, batch_tokens=1)
    for (context, continuation), (ll, greedy), (ll_single, _) in zip(
        requests, batched, one_by_one, strict=True
    ):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids[:, :-1])[0].float(), -1)[len(context) - 1 :]
        targets = torch.tensor(continuation)
        assert ll == pytest.approx(float(logprobs.gather(-1, targets[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == targets).all())
        assert ll == pytest.approx(ll_single, abs=1e-4)


def test_choices_sharing_a_context_score_as_if_each_ran_alone():
    """One pass per context (left-padded in a KV cache, choices after it) gives each request's own
    full-forward log-likelihood: contexts of several lengths in one batch, one-token continuations,
    and a context longer than the window cut to leave room for its longest continuation."""
    model = Transformer(model_config("tiny", vocab_size=300, max_seq_len=48))
    model.init_weights(seed=3)
    model.eval()
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(1, 300, (n,), generator=gen).tolist()

    contexts = [ids(5), ids(17), ids(1), ids(60)]  # the last is longer than the window
    requests = [(c, ids(n)) for c in contexts for n in (1, 4, 9, 2)]
    short = ids(2)  # with a long continuation: never in one batch with the long context (no room)
    requests += [(short, ids(30)), (short, ids(3))]
    random.Random(0).shuffle(requests)
    for batch_tokens in (4096, 1):
        scored = loglikelihoods(model, requests, batch_tokens=batch_tokens)
        for (context, continuation), (ll, greedy) in zip(requests, scored, strict=True):
            longest = max(len(x) for c, x in requests if c == context)
            kept = context[-(48 + 1 - longest) :]
            with torch.no_grad():
                logits = model(torch.tensor([kept + continuation[:-1]]))[0]
            logprobs = F.log_softmax(logits.float(), -1)[len(kept) - 1 :]
            targets = torch.tensor(continuation)
            assert ll == pytest.approx(float(logprobs.gather(-1, targets[:, None]).sum()), abs=1e-4)
            assert greedy == bool((logprobs.argmax(-1) == targets).all())


def test_acc_ranks_by_loglikelihood_and_acc_norm_by_loglikelihood_per_character():
    task = Task("t", "multiple_choice", " ", [], Path("t.yaml"))
    items = [Item("c", ["a", "a much longer choice"], 1), Item("c", ["x", "y", "zzz"], 0)]
    scores = [[(-2.0, False), (-10.0, False)], [(-1.0, True), (-1.0, False), (-5.0, False)]]
    # item 1: acc picks "a" (-2 > -10), acc_norm the long one (-10/20 > -2/1); item 2: ties go to the first
    result = task_result(task, items, scores)
    assert (result.acc, result.acc_norm, result.chance) == (0.5, 1.0, pytest.approx((1 / 2 + 1 / 3) / 2))
    lambada = Task("l", "loglikelihood", " ", [], Path("l.yaml"))
    result = task_result(lambada, [Item("c", [" a"], 0)] * 2, [[(-1.0, True)], [(-3.0, False)]])
    assert result.acc == 0.5 and result.perplexity == pytest.approx(math.exp(2.0)) and result.acc_norm is None
    assert result.metrics() == {"task/l/acc": 0.5, "task/l/perplexity": pytest.approx(math.exp(2.0))}
