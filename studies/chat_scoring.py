"""A scoring function of a user's own, for studies/chat_lora.yaml's finalists (``chat_scoring:first_words``).

hpo imports it from the study file's folder, once, and calls it with every finalist's generations and the
references: ``(predictions, references) -> float``, higher is better.
"""


def first_words(predictions: list[str], references: list[str]) -> float:
    """The share of generations that start with their reference's first two words: the right kind of answer,
    even where the rest of the sentence differs."""
    hits = [p.split()[:2] == r.split()[:2] for p, r in zip(predictions, references, strict=True)]
    return sum(hits) / len(hits)
