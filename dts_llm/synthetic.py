"""A small synthetic instruction data set in raw Dolly format, generated from a seed.

The quickstart needs data that ships with the project (no network) and on which a small model can
become measurably good, so most task families have one checkable answer (list and word manipulation,
arithmetic word problems, format conversion, facts from the table below), and a free-text family
(short descriptions) keeps some open-endedness. Some records carry a ``context`` field, as Dolly's do.
Every record is ``{"instruction", "context", "response", "category"}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The fact table the open answers are built from: made-up items, so nothing is known in advance.
ITEMS = {
    "zorbel": {"colour": "blue", "home": "Kalmar", "food": "apples", "size": "small"},
    "quinta": {"colour": "red", "home": "Tarsis", "food": "fish", "size": "large"},
    "mipple": {"colour": "green", "home": "Oslan", "food": "seeds", "size": "tiny"},
    "dravok": {"colour": "black", "home": "Vemro", "food": "roots", "size": "huge"},
    "sellin": {"colour": "yellow", "home": "Pardo", "food": "honey", "size": "small"},
    "brusk": {"colour": "white", "home": "Kalmar", "food": "grass", "size": "large"},
    "tovin": {"colour": "orange", "home": "Oslan", "food": "berries", "size": "medium"},
    "plimo": {"colour": "purple", "home": "Tarsis", "food": "leaves", "size": "tiny"},
}
WORDS = (
    "apple river stone cloud lamp tiger paper window garden music silver orange planet bread "
    "candle forest winter yellow rabbit bottle mirror castle pencil summer ocean"
).split()
NAMES = "Anna Ben Carla David Emma Felix Grace Hugo Iris Jonas Lena Marco Nina Omar Paula".split()
CITIES = "Paris Lima Cairo Oslo Rome Tokyo Quito Dakar".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _words(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def sort_words(rng):
    words = _words(rng)
    return "Sort these words alphabetically.", ", ".join(words), ", ".join(sorted(words))


def reverse_list(rng):
    words = _words(rng)
    return "Reverse the order of this list.", ", ".join(words), ", ".join(reversed(words))


def count_words(rng):
    words = _words(rng, 2, 9)
    return f"How many words are in this list: {' '.join(words)}?", "", f"There are {len(words)} words."


def uppercase(rng):
    words = _words(rng, 2, 3)
    text = " ".join(words)
    return f"Write '{text}' in capital letters.", "", text.upper()


def first_letters(rng):
    words = _words(rng, 3, 5)
    return "Give the first letter of each word.", " ".join(words), "".join(w[0] for w in words)


def word_problem(rng):
    name, a, b = rng.choice(NAMES), rng.randint(2, 20), rng.randint(1, 9)
    thing = rng.choice(["apples", "books", "coins", "pens"])
    if rng.random() < 0.5:
        question = f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?"
        return question, "", f"{name} has {a + b} {thing} now."
    a = max(a, b + 1)
    question = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
    return question, "", f"{a - b} {thing} are left."


def to_json(rng):
    name, age, city = rng.choice(NAMES), rng.randint(18, 80), rng.choice(CITIES)
    source = f"name: {name}, age: {age}, city: {city}"
    return "Convert this record to JSON.", source, json.dumps({"name": name, "age": age, "city": city})


def number_to_word(rng):
    n = rng.randint(0, 10)
    return f"Write the number {n} as a word.", "", NUMBER_WORDS[n]


def fact_question(rng):
    item = rng.choice(sorted(ITEMS))
    key = rng.choice(["colour", "home", "food"])
    question = {
        "colour": f"What colour is a {item}?",
        "home": f"Where does the {item} live?",
        "food": f"What does a {item} eat?",
    }[key]
    answer = {
        "colour": f"A {item} is {ITEMS[item]['colour']}.",
        "home": f"The {item} lives in {ITEMS[item]['home']}.",
        "food": f"A {item} eats {ITEMS[item]['food']}.",
    }[key]
    return question, "", answer


def describe(rng):
    """Free text: the facts of one item in a varying order and wording."""
    item = rng.choice(sorted(ITEMS))
    facts = ITEMS[item]
    parts = [
        f"it is {facts['colour']}",
        f"it lives in {facts['home']}",
        f"it eats {facts['food']}",
        f"it is {facts['size']}",
    ]
    rng.shuffle(parts)
    opener = rng.choice(["The {0} is an animal:", "About the {0}:", "A {0} is a creature;"]).format(item)
    return f"Tell me about the {item}.", "", f"{opener} {', '.join(parts[:3])}."


FAMILIES = {
    "sort": sort_words,
    "reverse": reverse_list,
    "count": count_words,
    "uppercase": uppercase,
    "first_letters": first_letters,
    "word_problem": word_problem,
    "to_json": to_json,
    "number_word": number_to_word,
    "fact": fact_question,
    "describe": describe,
}


def generate(count: int, seed: int) -> list[dict]:
    """``count`` records, the families in turn in a random order; the same seed gives the same records."""
    rng = random.Random(seed)
    names = sorted(FAMILIES)
    records = []
    for _ in range(count):
        category = rng.choice(names)
        instruction, context, response = FAMILIES[category](rng)
        records.append({"instruction": instruction, "context": context, "response": response, "category": category})
    return records


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_splits(folder: str | Path, sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """``{split: count}`` written as ``folder/{split}.jsonl``, each split from its own seed; returns the paths."""
    paths = {}
    for offset, (split, count) in enumerate(sizes.items()):
        paths[split] = Path(folder) / f"{split}.jsonl"
        write_jsonl(paths[split], generate(count, seed=seed * 1000 + offset))
    return paths
