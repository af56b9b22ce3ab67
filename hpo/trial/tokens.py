"""Tokenizing checked examples per task; a huge text is cut to a few characters per token of ``max_length`` first.

Labels follow the task: one per row (sequence classification), one per word on its first sub-word
(token classification), or the response's tokens with the prompt masked (causal LM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # the label that loss functions skip: special tokens, sub-words after the first, prompts
CHARS_PER_TOKEN = 50  # characters of a long text kept per token of max_length before tokenizing it
SLACK_TOKENS = 16  # tokens a cut text must give past max_length: a cut changes at most the last few tokens


def _cut(text: str, n_chars: int) -> str:
    """About the first ``n_chars`` characters of ``text``, ended before a blank when one is near the end."""
    end = n_chars
    while end > n_chars // 2 and not text[end].isspace():
        end -= 1
    return text[:end].rstrip() if text[end].isspace() else text[:n_chars]


def _capped(texts: list[Any], max_length: int, count: Any) -> list[Any]:
    """``texts`` with each very long one cut short where that cannot change its first ``max_length`` tokens.

    Tokenizing a 50 MB text whole to keep 128 tokens took minutes and GBs. A cut at a blank changes
    at most the last few tokens of the cut text (tokenizers split on blanks first and merge only
    within a word), so a cut that still gives ``max_length + SLACK_TOKENS`` tokens (``count``) gives
    the first ``max_length`` tokens of the whole text exactly. A cut that gives fewer (one huge "word",
    pages of blanks) grows 4x until it is the whole text.
    """
    out = list(texts)
    n_chars = CHARS_PER_TOKEN * max_length
    todo = [i for i, text in enumerate(texts) if len(text) > n_chars]
    while todo:
        cuts = [_cut(texts[i], n_chars) for i in todo]
        short = []
        for i, cut, n in zip(todo, cuts, count(cuts), strict=True):
            if n >= max_length + SLACK_TOKENS:
                out[i] = cut
            else:
                short.append(i)
        n_chars *= 4
        todo = [i for i in short if len(texts[i]) > n_chars]  # the others stay whole
    return out


def _counter(tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> Any:
    """A function from texts (or word lists, with ``is_split_into_words=True``) to their token counts."""

    def count(texts: list[Any]) -> list[int]:
        if not texts:
            return []
        enc = tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, **kwargs
        )
        return [len(ids) for ids in enc["input_ids"]]

    return count


def _capped_words(examples: list[list[str]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[list[str]]:
    # Each word is tokenized alone (is_split_into_words), so a word boundary is a hard one: a row keeps its
    # first max_length words when they give max_length tokens or more (a word gives at least one token,
    # unless the tokenizer's normalizer erases it), and each very long word is cut alone, as a text.
    words = _counter(tokenizer, is_split_into_words=True)
    n_chars = CHARS_PER_TOKEN * max_length

    def cap(rows: dict[int, list[str]]) -> dict[int, list[str]]:
        long = [(i, j) for i, row in rows.items() for j, w in enumerate(row) if len(w) > n_chars]
        cut = _capped([rows[i][j] for i, j in long], max_length, lambda texts: words([[t] for t in texts]))
        for (i, j), word in zip(long, cut, strict=True):
            rows[i][j] = word
        return rows

    out = list(examples)
    heads = cap(
        {
            i: row[:max_length]
            for i, row in enumerate(examples)
            if len(row) > max_length or any(len(w) > n_chars for w in row)
        }
    )
    rest = {}
    for (i, head), n in zip(heads.items(), words(list(heads.values())), strict=True):
        if len(examples[i]) <= max_length or n >= max_length:
            out[i] = head
        else:
            rest[i] = list(examples[i])
    for i, row in cap(rest).items():
        out[i] = row
    return out


class ChatTemplateError(ValueError):
    """The chat template cannot show where a conversation's assistant turns are, or cannot render it."""


def chat_rows(conversations: list[list[dict[str, str]]], tokenizer: PreTrainedTokenizerBase, max_length: int):
    """Conversations rendered with the tokenizer's chat template; the labels are the assistant turns' tokens.

    Each assistant turn is the text its template adds after the conversation before it with the generation prompt
    (the turn's content and end marker), found by rendering those prefixes: character spans of the whole rendering,
    mapped to the tokens that overlap them through the fast tokenizer's offsets (as transformers' own assistant
    mask counts them). The template writes its own special tokens.

    Raises:
        ChatTemplateError: the template failed on a conversation; or a prefix's rendering is not the start of the
            whole one (a template that marks the last turn: Qwen3's ``<think>``, Phi-3's end token), or the turn's
            span does not hold its content: the assistant turns cannot be found.
    """
    rows = []
    for messages in conversations:
        try:
            spans, text = _assistant_spans(messages, tokenizer.apply_chat_template)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"the conversation that starts {_opening(messages)}: {e}") from None
        except Exception as e:  # noqa: BLE001 - Jinja's errors, a template's raise_exception, its TypeErrors
            raise ChatTemplateError(
                f"the conversation that starts {_opening(messages)}: {type(e).__name__}: {e}"
            ) from None
        enc = tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
        )
        ids = enc["input_ids"]
        overlaps = [any(start < b and end > a for a, b in spans) for start, end in enc["offset_mapping"]]
        labels = [t if inside else IGNORE for t, inside in zip(ids, overlaps, strict=True)]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def _assistant_spans(messages: list[dict[str, str]], render: Any) -> tuple[list[tuple[int, int]], str]:
    text = render(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True)
        through = render(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(f"its turn {i} renders otherwise alone than in the whole conversation")
        if m["content"].strip() not in through[len(before) :]:
            raise ChatTemplateError(f"the template does not write turn {i}'s content where the turn is")
        spans.append((len(before), len(through)))
    return spans, text


def _opening(messages: list[dict[str, str]]) -> str:
    first = messages[0]["content"]
    return repr(first[:60] + ("…" if len(first) > 60 else ""))


def tokenize(
    task: str, examples: list[tuple[Any, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[dict[str, Any]]:
    """Tokenized rows without padding (the task's collator pads each batch to its longest row).

    token-classification labels the first sub-word of each word and ignores the rest; causal-lm
    predicts every token of a text, or only the response's tokens after a prompt, or a conversation's assistant turns
    (:func:`chat_rows`). Very long texts and word lists are cut before tokenizing, to the same result (see
    :func:`_capped`).
    """
    if task == "causal-lm" and examples and isinstance(examples[0][0], list):
        return chat_rows([m for m, _ in examples], tokenizer, max_length)
    count = _counter(tokenizer)
    if task == "sequence-classification":
        texts = _capped([t for t, _ in examples], max_length, count)
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": label} for i, (_, label) in enumerate(examples)]
    if task == "token-classification":
        words = _capped_words([w for w, _ in examples], tokenizer, max_length)
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        rows = []
        for i, (_, tags) in enumerate(examples):
            word_ids, previous, labels = enc.word_ids(i), None, []
            for w in word_ids:
                labels.append(IGNORE if w is None or w == previous else tags[w])
                previous = w
            rows.append({**{k: v[i] for k, v in enc.items()}, "labels": labels})
        return rows
    prompts = _capped([p for p, _ in examples], max_length, count)
    responses = _capped([r for _, r in examples], max_length, count)
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        if not response:  # plain text: predict every token
            ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
            continue
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (head + tail)[:max_length]
        labels = ([IGNORE] * len(head) + tail)[:max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows
