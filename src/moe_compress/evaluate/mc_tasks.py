"""Multiple-choice tasks built from the bundled held-out text, for lm-evaluation-harness.

Why our own tasks: the reference models are trained on three narrow domains (Python docs, a
dictionary, man pages), so public benchmarks say nothing about them, and offline runs cannot
download those anyway. These tasks use only the *test* split of the bundled corpus, which no
model was trained or calibrated on:

* ``moec_continuation_<domain>`` -- a context of 22-30 words (about 40-60 tokens) cut from a
  document, then four candidate continuations of 10 words: the real one and three spans of
  other documents (other sources) of the same domain, picked closest in length to the real one
  so that a length prior alone does not win.
* ``moec_definition`` -- a dictionary headword ("Cremate:") and four definitions: its own and
  three of other headwords, again of similar length.

Every choice carries the whitespace that separates it from the context (so ``target_delimiter``
is empty and all four choices start the same way). The builder is a pure function of the
bundled test files and a seed; ``python -m moe_compress.evaluate.mc_tasks`` rewrites the shipped
``tasks/`` directory (jsonl data and lm-eval YAML) byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.texts import BUNDLED_DATA

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GROUP = "moec"
DOMAINS = ("pydoc", "dictionary", "manpages")
DEFINITION_TASK = "moec_definition"
CHOICES = 4
CONTEXT_WORDS = (22, 30)  # inclusive range; about 1.8-2.1 tokens per word with the bundled tokenizer
CONTINUATION_WORDS = 10
DEFINITION_WORDS = 20  # definitions are cut to at most this many words
DISTRACTOR_POOL = 24  # random candidates per item; the closest in length become the distractors
_WORD = re.compile(r"\S+")
_BRACKETS = re.compile(r"\s*\[[^\]]*\]")


def continuation_task(domain: str) -> str:
    return f"moec_continuation_{domain}"


def task_names() -> list[str]:
    return [continuation_task(d) for d in DOMAINS] + [DEFINITION_TASK]


@dataclass(frozen=True)
class MCItem:
    """One question: the model scores each choice as a continuation of `context`."""

    id: str
    context: str
    choices: list[str]
    label: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    words: list[tuple[int, int]]  # (start, end) character offsets of whitespace-separated words

    @property
    def source(self) -> str:
        """Chunks of one source (``page#003``) share it; distractors must come from another source."""
        return self.id.partition("#")[0]

    def span(self, first: int, count: int) -> str:
        return self.text[self.words[first][0] : self.words[first + count - 1][1]]


def read_documents(domain: str, data_dir: Path = BUNDLED_DATA, split: str = "test") -> list[Document]:
    documents = []
    for line in (data_dir / domain / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            text = record["text"]
            documents.append(Document(record["id"], text, [m.span() for m in _WORD.finditer(text)]))
    return documents


def _pick_distractors(rng: random.Random, real: str, candidates: list[str], forbidden: str) -> list[str] | None:
    """The CHOICES-1 candidates closest in length to `real`, distinct, and not found in `forbidden`.

    `forbidden` is the item's own text: a span that also occurs there could be a correct answer too.
    """
    fresh = []
    for candidate in candidates:
        if candidate != real and candidate not in fresh and candidate not in forbidden:
            fresh.append(candidate)
    if len(fresh) < CHOICES - 1:
        return None
    fresh.sort(key=lambda c: abs(len(c) - len(real)))  # stable: ties keep the random order
    return fresh[: CHOICES - 1]


def _shuffled_item(rng: random.Random, item_id: str, context: str, separator: str, real: str, distractors: list[str]) -> MCItem:
    choices = [real, *distractors]
    rng.shuffle(choices)
    return MCItem(item_id, context, [separator + c for c in choices], choices.index(real))


def continuation_items(documents: list[Document], count: int, seed: int, from_start: bool = False) -> list[MCItem]:
    """`count` continuation questions; contexts start at a line start (or at the document start).

    Windows never overlap within a document and each document gives at most a fair share, so the
    items spread over the whole split; the list is in random order, so a `--limit` prefix does too.
    """
    rng = random.Random(f"moec-continuation-{seed}")
    shortest = CONTEXT_WORDS[0] + CONTINUATION_WORDS
    candidates = []
    for d, doc in enumerate(documents):
        starts = [0] if from_start else [i for i, (s, _) in enumerate(doc.words) if s == 0 or doc.text[s - 1] == "\n"]
        candidates += [(d, i) for i in starts if i + shortest <= len(doc.words)]
    rng.shuffle(candidates)
    per_document = max(1, 2 * -(-count // max(1, len({d for d, _ in candidates}))))
    taken: dict[int, list[tuple[int, int]]] = {}
    items = []
    for d, first in candidates:
        if len(items) == count:
            break
        doc = documents[d]
        context_words = min(rng.randint(*CONTEXT_WORDS), len(doc.words) - first - CONTINUATION_WORDS)
        end = first + context_words + CONTINUATION_WORDS
        used = taken.setdefault(d, [])
        if len(used) >= per_document or any(first < b and a < end for a, b in used):
            continue
        others = [o for o in documents if o.source != doc.source and len(o.words) >= CONTINUATION_WORDS]
        pool = []
        for _ in range(DISTRACTOR_POOL):
            other = rng.choice(others)
            pool.append(other.span(rng.randrange(len(other.words) - CONTINUATION_WORDS + 1), CONTINUATION_WORDS))
        real = doc.span(first + context_words, CONTINUATION_WORDS)
        distractors = _pick_distractors(rng, real, pool, doc.text)
        if distractors is None:
            continue
        used.append((first, end))
        cut = doc.words[first + context_words - 1][1]
        separator = doc.text[cut : doc.words[first + context_words][0]]
        items.append(_shuffled_item(rng, f"{doc.id}@{first}", doc.text[doc.words[first][0] : cut], separator, real, distractors))
    return items


def _definition(doc: Document) -> tuple[str, str] | None:
    """(headword, first definition line) of a dictionary entry, or None for entries unfit to ask about.

    Bracketed etymologies are dropped (they spell out the word's roots, which makes the question
    about spelling, not meaning); cross-references ("See Scissel.") and definitions that contain
    the headword itself are skipped, because they give the answer away.
    """
    head, colon, rest = doc.text.partition(":")
    if not colon or not head.strip() or "\\" in doc.text:
        return None
    head = head.strip()
    words = _BRACKETS.sub("", rest.split("\n", 1)[0]).split()
    if len(words) < 4 or "See" in words[:4] or head.lower() in " ".join(words).lower():
        return None
    return head, " ".join(words[:DEFINITION_WORDS])


def definition_items(documents: list[Document], count: int, seed: int) -> list[MCItem]:
    """`count` questions "which of these four definitions belongs to this headword"."""
    rng = random.Random(f"moec-definition-{seed}")
    entries = [(doc.id, *parsed) for doc in documents if (parsed := _definition(doc)) is not None]
    order = list(range(len(entries)))
    rng.shuffle(order)
    items = []
    for index in order:
        if len(items) == count:
            break
        item_id, head, real = entries[index]
        pool = [entries[rng.randrange(len(entries))][2] for _ in range(DISTRACTOR_POOL)]
        # A distractor must not name the headword, nor be the definition of an entry with the same headword.
        pool = [p for p in pool if head.lower() not in p.lower()]
        distractors = _pick_distractors(rng, real, pool, forbidden="")
        if distractors is not None:
            items.append(_shuffled_item(rng, item_id, f"{head}:", " ", real, distractors))
    return items


def build_tasks(data_dir: Path = BUNDLED_DATA, count: int = 250, seed: int = 0) -> dict[str, list[MCItem]]:
    """Task name -> items, a pure function of the test split files, `count` and `seed`."""
    tasks = {}
    for domain in DOMAINS:
        documents = read_documents(domain, data_dir)
        tasks[continuation_task(domain)] = continuation_items(documents, count, seed, from_start=domain == "dictionary")
        if domain == "dictionary":
            tasks[DEFINITION_TASK] = definition_items(documents, count, seed)
    return tasks


_TASK_YAML = """\
# Generated by `python -m moe_compress.evaluate.mc_tasks` from the bundled test split; do not edit.
# data_files is relative to this directory: moe_compress.evaluate.harness makes it absolute. With the
# plain lm_eval CLI, run it from this directory with `--include_path .`.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task}.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "{description}"
"""

_GROUP_YAML = """\
# Generated by `python -m moe_compress.evaluate.mc_tasks`; do not edit.
group: {group}
task:
{members}
aggregate_metric_list:
  - metric: acc
    weight_by_size: false
  - metric: acc_norm
    weight_by_size: false
metadata:
  version: 1.0
"""


def _description(task: str) -> str:
    if task == DEFINITION_TASK:
        return "dictionary headword -> which of 4 definitions is its own"
    return f"{task.rsplit('_', 1)[1]} context -> which of 4 continuations is the real one"


def write_tasks(out_dir: Path = TASKS_DIR, data_dir: Path = BUNDLED_DATA, count: int = 250, seed: int = 0) -> list[Path]:
    """Write one jsonl + YAML per task and the group YAML; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    tasks = build_tasks(data_dir, count, seed)
    for task, items in tasks.items():
        data = out_dir / f"{task}.jsonl"
        data.write_text("".join(item.to_json() + "\n" for item in items), encoding="utf-8")
        spec = out_dir / f"{task}.yaml"
        spec.write_text(_TASK_YAML.format(task=task, description=_description(task)), encoding="utf-8")
        written += [data, spec]
    group = out_dir / f"_{GROUP}.yaml"
    group.write_text(_GROUP_YAML.format(group=GROUP, members="\n".join(f"  - {t}" for t in tasks)), encoding="utf-8")
    return [*written, group]


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild the moec multiple-choice tasks from the bundled test split.")
    parser.add_argument("--out", type=Path, default=TASKS_DIR, help="directory for the jsonl + YAML files")
    parser.add_argument("--items", type=int, default=250, help="questions per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_tasks(args.out, count=args.items, seed=args.seed):
        print(f"{path.stat().st_size:>8} {path}")


if __name__ == "__main__":
    main()
