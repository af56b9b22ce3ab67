"""hpo.data: every value a task reads is checked, naming the data file and line; one spelling per label;
very long texts are cut before tokenizing, to exactly the tokens of the whole text.

The one-line CLI errors of whole hostile files are in tests/broken_data/ (test_broken_data.py).
"""

import json
import random

import pandas as pd
import pytest
from conftest import DATA

from hpo import ConfigError, load_study
from hpo.data import load_examples
from hpo.trial.tokens import IGNORE, tokenize

SEQ, TOK, LM = "sequence-classification", "token-classification", "causal-lm"


def study(write_study, tmp_path, task=SEQ, train=None, eval=None, **data):
    """A study of ``task`` whose train/eval files are written from ``{name: content}`` (default: good ones)."""
    good = {SEQ: "train.csv", TOK: "ner_train.jsonl", LM: "train.csv" if "text_column" in data else "chat_train.jsonl"}[
        task
    ]
    paths = {}
    for split, files in (("train", train), ("eval", eval)):
        if files is None:
            paths[split] = str(DATA / good)
            continue
        ((name, content),) = files.items()
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[split] = str(tmp_path / name)
    if task == LM and "text_column" not in data:
        data = {"prompt_column": "prompt", "response_column": "response", **data}
    return load_study(write_study(task=task, data={**paths, "max_length": 16, **data}))


def error(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        load_examples(cfg)
    (line,) = str(e.value).splitlines()
    return line


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = {"text": "hello there", "label": "greeting"}
NER = {"tokens": ["i", "want", "pizza"], "tags": ["O", "O", "B-FOOD"]}
CHAT = {"prompt": "hello there", "response": "greeting"}

# (task, file name, content, line or location, message): other data of the kinds the corpus holds
BAD = [
    (SEQ, "a.jsonl", jsonl(GOOD, "", {"text": "cold", "label": None}), 3, "'label' is null"),  # blank lines count
    (SEQ, "a.jsonl", jsonl(GOOD, {"text": None, "label": "x"}), 2, "'text' is null"),
    (SEQ, "a.jsonl", jsonl(GOOD, {"label": "x"}), 2, "'text' missing"),
    (SEQ, "a.jsonl", jsonl(GOOD, {"text": "cold", "label": {"a": 1}}), 2, "'label' is an object"),
    (SEQ, "a.jsonl", jsonl(GOOD, {"text": "cold", "label": [1, 2]}), 2, "'label' is a list"),
    (SEQ, "a.jsonl", '{"text": "hi", "label": 1}\n{"text": "cold", "label": Infinity}\n', 2, "'label' is inf"),
    (SEQ, "a.jsonl", jsonl(GOOD, {"text": "  ", "label": "x"}), 2, "'text' is empty"),
    (SEQ, "a.jsonl", '{"text": "hi", "label": 1}\n{"text": "cold",\n "label": 2}\n', 2, "a record spans lines"),
    (
        SEQ,
        "a.jsonl",
        '{"text": "hi", "label": 1}\n{"text": "x", "label": 2}  {"text": "y"}\n',
        2,
        "not valid JSON: Extra data (column 28)",
    ),
    (
        SEQ,
        "a.json",
        '[\n {"text": "hi", "label": 1},\n\n {"text": "cold",\n  "label": null}]',
        "4: [1]",
        "'label' is null",
    ),
    (SEQ, "a.json", '[{"text": "hi", "label": 1}, 7]', "1: [1]", "expected a record {...}, found a number"),
    (SEQ, "a.json", '[{"text": "hi", "label": 1},\n {"text": "cold" "label": 2}]', 2, "not valid JSON"),
    (SEQ, "a.json", '{"rows": [{"text": "hi", "label": 1}]}', None, "expected a list of records"),
    (SEQ, "a.json", "[]", None, "the file has no rows"),
    # a quoted cell over two lines: the short row after it is on line 4, not "row 3"
    (SEQ, "a.csv", 'text,label\n"hello\nthere",greeting\ncold\n', 4, "1 cell, but the header (line 1) has 2"),
    (SEQ, "a.csv", "\ufefftext,label\r\nhello,greeting\r\ncold,weather,x\r\n", 3, "3 cells"),
    (SEQ, "a.csv", "text,label,text\nhello,greeting,x\n", 1, "column 'text' twice in the header"),
    (SEQ, "a.csv", "\n\n  \n", None, "the file is empty"),
    (SEQ, "a.csv", "text,label\nhola,saludo\ncaf\xe9,bebida\n".encode("cp1252"), 3, "not UTF-8 (byte 0xe9)"),
    (SEQ, "a.csv", "text,label\nhello,greeting\n".encode("utf-16-le"), None, "the file is UTF-16"),
    (TOK, "a.jsonl", jsonl(NER, {"tokens": "cold today", "tags": ["B-WX", "O"]}), 2, "'tokens' is a string"),
    (TOK, "a.jsonl", jsonl(NER, {"tokens": ["cold", "today"], "tags": ["B-WX", None]}), 2, "'tags[1]' is null"),
    (TOK, "a.jsonl", jsonl(NER, {"tokens": ["cold", 3], "tags": ["B-WX", "O"]}), 2, "'tokens[1]' is a number"),
    (TOK, "a.jsonl", jsonl(NER, {"tokens": ["cold"], "tags": ["b-wx"]}), 2, "tags[0]: 'b-wx' is not an IOB tag"),
    (TOK, "a.jsonl", jsonl(NER, {"tokens": ["cold"], "tags": ["B-"]}), 2, "tags[0]: 'B-' is not an IOB tag"),
    (TOK, "a.jsonl", jsonl(NER, {"tokens": ["cold"], "tags": ["U-WX"]}), 2, "tags[0]: 'U-WX' is not an IOB tag"),
    (
        TOK,
        "a.jsonl",
        jsonl(NER, {"tokens": ["cold", "today"], "tags": ["B-WX"]}),
        2,
        "'tokens' has 2 items, 'tags' has 1",
    ),
    (TOK, "a.jsonl", jsonl(NER, {"tokens": ["cold", " "], "tags": ["B-WX", "O"]}), 2, "'tokens[1]' is empty"),
    (TOK, "a.conll", "-DOCSTART- -X- O O\n\ni PRP x O\nwant VB x O\npizza NN x\n", 5, "3 columns, but line 3 has 4"),
    (TOK, "a.conll", "i O\nwant O\n\npizza B-FOOD\nsoup\n", 5, "one column ('soup')"),
    (TOK, "a.conll", "i O\nwant O\n\npizza B-FOOD\nsoup B_FOOD\n", 5, "tag: 'B_FOOD' is not an IOB tag"),
    (TOK, "a.conll", "-DOCSTART- O\n\n", None, "the file has no sentences"),
    (LM, "a.jsonl", jsonl(CHAT, {"prompt": None, "response": "x"}), 2, "'prompt' is null"),
    (LM, "a.jsonl", jsonl(CHAT, {"prompt": "hi", "response": [1]}), 2, "'response' is a list"),
    (LM, "a.jsonl", jsonl(CHAT, {"prompt": "hi"}), 2, "'response' missing"),
    (LM, "a.jsonl", jsonl(CHAT, {"prompt": "hi", "response": "\t"}), 2, "'response' is empty"),
    (LM, "a.jsonl", jsonl(CHAT, '{"prompt": "\\udfff", "response": "x"}'), 2, "'prompt': invalid Unicode"),
]


@pytest.mark.parametrize(
    ("task", "name", "content", "where", "message"), BAD, ids=[f"{i:02d}-{b[2][:24]!r}" for i, b in enumerate(BAD)]
)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_bad_value_names_the_file_and_line(write_study, tmp_path, task, name, content, where, message, split):
    cfg = study(write_study, tmp_path, task, **{split: {name: content}})
    found = error(cfg)
    place = f"{tmp_path / name}:{where}: " if where is not None else f"{tmp_path / name}: "
    assert f"data.{split}: {place}{message}" in found, found


def test_plain_text_must_not_be_empty_or_null(write_study, tmp_path):
    rows = {"a.jsonl": jsonl({"text": "hello there"}, {"text": None})}
    assert f"{tmp_path / 'a.jsonl'}:2: 'text' is null" in error(
        study(write_study, tmp_path, LM, train=rows, eval=rows, text_column="text")
    )
    rows = {"a.csv": "text,label\nhello,x\n,y\n"}
    assert f"{tmp_path / 'a.csv'}:3: 'text' is empty" in error(
        study(write_study, tmp_path, LM, eval=rows, text_column="text")
    )


def test_numbers_are_one_label_however_spelled(write_study, tmp_path):
    train = jsonl(*({"text": f"t{i}", "label": v} for i, v in enumerate([1, 1.0, "1.0", 0, 0.0, "-0", 2.5, "2.50"])))
    cfg = study(
        write_study, tmp_path, train={"train.jsonl": train}, eval={"eval.csv": "text,label\na,1\nb,0.0\nc,2.5\n"}
    )
    data = load_examples(cfg)
    assert data.labels == ["0", "1", "2.5"]
    assert [label for _, label in data.train] == [1, 1, 1, 0, 0, 0, 2, 2]
    assert [label for _, label in data.eval] == [1, 0, 2]


def test_booleans_stay_booleans_and_match_csv(write_study, tmp_path):
    # True is an int to Python: it must not become class "1"; JSON true and CSV "true" are one class
    train = jsonl(*({"text": f"t{i}", "label": v} for i, v in enumerate([True, False, " true", False])))
    cfg = study(write_study, tmp_path, train={"train.jsonl": train}, eval={"eval.csv": "text,label\na,true\nb,false\n"})
    data = load_examples(cfg)
    assert data.labels == ["false", "true"]
    assert [data.labels[label] for _, label in data.eval] == ["true", "false"]


def test_a_boolean_among_numeric_labels_is_an_error(write_study, tmp_path):
    # JSON true in a file of 0/1/2 labels is a typo, not a fourth class
    train = jsonl(*({"text": f"t{i}", "label": v} for i, v in enumerate([0, 1, 2, True, 1])))
    found = error(study(write_study, tmp_path, train={"train.jsonl": train}, eval={"eval.csv": "text,label\na,1\n"}))
    assert f"data.train: {tmp_path / 'train.jsonl'}:4: label 'true' among numbers ('0', '1', '2')" in found, found


def test_label_names():
    from hpo.data import label_name

    values = ["1.0", "1", "-0.0", "2.50", "1e3", "1.5e-07", " spam ", "007", "1.", "true", "", "1e999999999"]
    assert [label_name(v) for v in values] == [
        "1",
        "1",
        "0",
        "2.5",
        "1000",
        "0.00000015",
        "spam",
        "007",
        "1.",
        "true",
        "",
        "1e999999999",
    ]


def test_unseen_eval_labels_are_shown_as_repr_with_their_place(write_study, tmp_path):
    found = error(study(write_study, tmp_path, eval={"e.csv": "text,label\nhi,greeting\nhm,\nok,'x'\nno, \n"}))
    assert f"data.eval: eval labels not in train: '', \"'x'\" (the first at {tmp_path / 'e.csv'}:3)" in found, found


def test_max_rows_keep_the_same_sample_and_every_row_is_checked(write_study, tmp_path):
    rows = [{"text": f"text {i}", "label": i % 3} for i in range(40)]
    data = load_examples(
        study(write_study, tmp_path, train={"t.jsonl": jsonl(*rows)}, eval={"e.jsonl": jsonl(*rows)}, max_train_rows=7)
    )
    sample = pd.DataFrame(rows).sample(n=7, random_state=0)  # what earlier versions picked
    assert [text for text, _ in data.train] == sample["text"].tolist()
    rows[39]["label"] = None  # not in the sample, still a broken file
    found = error(study(write_study, tmp_path, train={"t.jsonl": jsonl(*rows)}, max_train_rows=7))
    assert f"{tmp_path / 't.jsonl'}:40: 'label' is null" in found


def test_a_secret_in_the_data_path_is_refused(write_study, tmp_path, monkeypatch):
    # It was masked in the data's errors; a path is printed and saved everywhere, so it cannot hold a secret.
    monkeypatch.setenv("HPO_DATA_TOKEN", "s3cr3t-Folder")
    (tmp_path / "s3cr3t-Folder").mkdir()
    (tmp_path / "s3cr3t-Folder" / "t.jsonl").write_text(jsonl(GOOD, {"text": "s3cr3t-Folder", "label": None}))
    with pytest.raises(ConfigError) as e:
        load_study(write_study(data={"train": "${HPO_DATA_TOKEN}/t.jsonl", "eval": str(DATA / "eval.csv")}))
    assert "data.train: ${HPO_DATA_TOKEN} is a secret" in str(e.value) and "s3cr3t" not in str(e.value)


@pytest.mark.parametrize("tag", ["b-FOOD", "BFOOD", "U-FOOD", "L-FOOD", "B-", "FOOD", "0", "o"])
def test_conll_takes_iob_and_iobes_tags_and_nothing_else(write_study, tmp_path, tag):
    train = "-DOCSTART- -X- O\n\ni PRP O\nwant VB O\nfresh JJ B-FOOD\nfish NN E-FOOD\n\nrain NN S-WX\n"
    data = load_examples(study(write_study, tmp_path, TOK, train={"t.conll": train}, eval={"e.conll": train}))
    assert data.labels == ["B-FOOD", "E-FOOD", "O", "S-WX"]
    assert data.eval[0] == (["i", "want", "fresh", "fish"], [2, 2, 0, 1])
    found = error(study(write_study, tmp_path, TOK, train={"t.conll": train.replace("E-FOOD", tag)}))
    assert f"{tmp_path / 't.conll'}:6: tag: {tag!r} is not an IOB tag" in found, found


# --- tokenizing: long texts are cut first, to the same tokens -------------------------------------------


def tokenize_whole(task, examples, tokenizer, max_length):
    """hpo.trial.tokens.tokenize before texts were cut: each text tokenized whole, then truncated (the reference)."""
    if task == SEQ:
        enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": label} for i, (_, label) in enumerate(examples)]
    if task == TOK:
        enc = tokenizer([t for t, _ in examples], is_split_into_words=True, truncation=True, max_length=max_length)
        rows = []
        for i, (_, tags) in enumerate(examples):
            words, previous, labels = enc.word_ids(i), None, []
            for w in words:
                labels.append(IGNORE if w is None or w == previous else tags[w])
                previous = w
            rows.append({**{k: v[i] for k, v in enc.items()}, "labels": labels})
        return rows
    rows = []
    for prompt, response in examples:
        if not response:
            ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
            continue
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(
            {
                "input_ids": (head + tail)[:max_length],
                "attention_mask": [1] * min(len(head + tail), max_length),
                "labels": ([IGNORE] * len(head) + tail)[:max_length],
            }
        )
    return rows


MAX_LENGTH = 16  # characters kept before tokenizing: 50 per token, 800 here


def long_texts() -> list[str]:
    rng = random.Random(0)
    vocab = [w for line in (DATA / "train.csv").read_text().splitlines()[1:] for w in line.split(",")[0].split()]
    words = lambda n, sep=" ": sep.join(rng.choice(vocab + ["zebra", "café", "über,", "x.y", "中文"]) for _ in range(n))
    return [
        "hello there",
        "",
        words(30),
        words(400),
        words(400, "  \t"),
        words(300, "\n\n"),
        words(300, ", "),
        words(150) + " " + "x" * 1000 + " " + words(150),
    ]


def pathological_texts() -> list[str]:
    # Cuts that give too few tokens, so the cut grows until it is the whole text: a word of thousands of
    # letters (WordPiece: one [UNK]) where the cut falls, pages of blanks, characters a normalizer erases.
    return [
        "a" * 5000 + " hello there cold and windy please " * 3,
        " " * 5000 + "hello there " * 40,
        "hello " + "\u200b " * 3000 + "cold and windy",
        "é" * 900 + " " + "hello there " * 100,
        "hello there " * 60 + "unknownword" * 200 + " hello",
        "x" * 70_000 + " end",
    ]


@pytest.mark.parametrize("task", [SEQ, LM, "prompt-response", TOK])
def test_cut_texts_give_the_tokens_of_whole_texts(tokenizer, task):
    texts = long_texts()
    if task == SEQ:
        examples = [(t, i % 2) for i, t in enumerate(texts)]
    elif task == LM:
        examples = [(t, "") for t in texts if t]
    elif task == "prompt-response":
        examples = [(a, b) for a in texts for b in texts[2:5]]
        task = LM
    else:
        examples = [(t.split(), [i % 3 for i in range(len(t.split()))]) for t in texts if t]
        examples += [(["hello"] * 20 + ["there" * 1000], [1] * 21)]  # a long word past max_length words: dropped
    type(tokenizer).seen.clear()
    rows = tokenize(task, examples, tokenizer, MAX_LENGTH)
    assert max(type(tokenizer).seen) <= 50 * MAX_LENGTH, "no long text reaches the tokenizer whole"
    assert rows == tokenize_whole(task, examples, tokenizer, MAX_LENGTH)
    if task != TOK:
        examples = [(t, i % 2 if task == SEQ else "") for i, t in enumerate(pathological_texts())]
    else:
        examples = [(t.split(" "), [0] * len(t.split(" "))) for t in pathological_texts()]
        examples += [([t], [0]) for t in pathological_texts()] + [
            (["\u200b"] * 40 + ["cold", "rain"], [0] * 42),
            (["x" * 900, "hello", "there"], [0, 1, 2]),
        ]
    assert tokenize(task, examples, tokenizer, MAX_LENGTH) == tokenize_whole(task, examples, tokenizer, MAX_LENGTH)
