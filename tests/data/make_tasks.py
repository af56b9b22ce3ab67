"""Writes the token-classification and causal-LM test data: python tests/data/make_tasks.py

Words come from train.csv's vocabulary, so the tests' tiny WordPiece tokenizer knows them all.
Entities: FOOD (``fresh fish``, ``pizza``) and WX, weather (``cold``, ``rain``).
"""

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
FOOD = [["pizza"], ["pasta"], ["sushi"], ["soup"], ["fresh", "fish"], ["fresh", "bread"], ["salad"]]
WEATHER = [["rain"], ["snow"], ["storm"], ["cold"], ["hot"], ["cloudy", "skies"], ["sunny"], ["windy"]]
FRAMES = [
    "i want {F} today",
    "make {F} for dinner please",
    "{W} tomorrow maybe",
    "is it {W} today",
    "i want {F} and {F}",
    "{W} and {W} today",
    "order {F} if it is {W}",
    "hello friend i want {F}",
]


def sentence(rng: random.Random) -> dict:
    tokens, tags = [], []
    for word in rng.choice(FRAMES).split():
        if word in ("{F}", "{W}"):
            entity, kind = (rng.choice(FOOD), "FOOD") if word == "{F}" else (rng.choice(WEATHER), "WX")
            tokens += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def main() -> None:
    rng = random.Random(0)
    train, dev = [sentence(rng) for _ in range(48)], [sentence(rng) for _ in range(16)]
    for name, rows in (("ner_train.jsonl", train), ("ner_eval.jsonl", dev)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (HERE / "ner_eval.conll").write_text(
        "-DOCSTART- O\n\n"
        + "".join("".join(f"{t} {g}\n" for t, g in zip(r["tokens"], r["tags"], strict=False)) + "\n" for r in dev)
    )
    for split in ("train", "eval"):  # causal-LM pairs: the reply is the intent
        with open(HERE / f"{split}.csv") as f:
            rows = [{"prompt": r["text"], "response": r["label"]} for r in csv.DictReader(f)]
        (HERE / f"chat_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
