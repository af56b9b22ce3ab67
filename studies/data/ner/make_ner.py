"""Writes the token-classification study's data: python studies/data/ner/make_ner.py

Travel and meeting requests with person (PER), city (LOC), organisation (ORG)
and date (DATE) entities, tagged IOB2, written for hpo from templates and slot
values (no third-party data). Multi-word entities ("New York", "next Friday")
make entity-level F1 stricter than token accuracy. Deterministic (seed 0).
train.jsonl: 320 sentences, eval.jsonl: 80; eval.conll holds eval in CoNLL form.
"""

import json
import random
from pathlib import Path

SLOTS = {
    "PER": ["Anna Weber", "Luis", "Priya Raman", "Tom", "Mei Chen", "Kofi Mensah", "Sara", "Jonas Berg", "Olga",
            "Ahmed Ali", "Grace", "Diego Torres"],
    "LOC": ["Paris", "New York", "Berlin", "Tokyo", "Lisbon", "San Francisco", "Nairobi", "Oslo", "Buenos Aires",
            "Seoul", "Cairo", "Hong Kong"],
    "ORG": ["Acme", "the city council", "Globex", "Initech", "the Red Cross", "Umbrella Labs", "Stark Industries",
            "the university"],
    "DATE": ["Monday", "next Friday", "tomorrow", "June 3", "the weekend", "March 14", "next week", "Tuesday morning"],
}
TEMPLATES = [
    "book a flight from {LOC} to {LOC} on {DATE}",
    "set up a meeting with {PER} on {DATE}",
    "{PER} flies to {LOC} {DATE}",
    "remind me to call {PER} from {ORG} {DATE}",
    "is {ORG} open in {LOC} on {DATE}",
    "send the report to {PER} at {ORG}",
    "find a hotel in {LOC} for {PER}",
    "{PER} joins {ORG} in {LOC} on {DATE}",
    "what is the weather in {LOC} {DATE}",
    "cancel my trip to {LOC}",
    "email {PER} and {PER} about the {ORG} visit",
    "move the review with {ORG} to {DATE}",
]


def sentence(rng: random.Random) -> dict:
    tokens, tags = [], []
    for word in rng.choice(TEMPLATES).split():
        kind = word.strip("{}") if word.startswith("{") else None
        if kind:
            entity = rng.choice(SLOTS[kind]).split()
            tokens += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def main() -> None:
    here, rng = Path(__file__).parent, random.Random(0)
    train, dev = [sentence(rng) for _ in range(320)], [sentence(rng) for _ in range(80)]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", dev)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (here / "eval.conll").write_text("".join(
        "".join(f"{t} {g}\n" for t, g in zip(r["tokens"], r["tags"])) + "\n" for r in dev))


if __name__ == "__main__":
    main()
