"""A finalist's generations (``finalists:``): each row's prompt generated on, and scored against its reference.

A row's reference is its last learned span (the response of a prompt/response pair, a conversation's last assistant
turn) and its prompt every token before it, as the trial trained on it: the same template, the same truncation.
Generation is transformers' ``generate``, batched (left-padded) with the KV cache; greedy unless a temperature is set.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from hpo.config.finalists import BUILTIN, Generate, scorer
from hpo.trial.tokens import IGNORE

SAMPLES = 3  # generations kept on the trial beside its scores, to read


def turn_end(tokenizer: Any) -> str | None:
    """What the chat template writes after an assistant turn's content (``<|im_end|>``), found by rendering one: a
    reference ends there, and so does a generation (a template that only ends the line: there). None: nothing but the
    end-of-sequence token."""
    sentinel = "\ue000hpo\ue000"  # a private-use character: in no template's own text
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    end = text[text.rindex(sentinel) + len(sentinel) :]
    end = end.strip() or end  # "<|im_end|>\n" ends at its marker; "role: content\n" at its line's end
    return end if end and end != tokenizer.eos_token else None


def _until(text: str, end: str | None) -> str:
    return (text.split(end)[0] if end else text).strip()


def prompts(
    rows: list[dict[str, Any]], tokenizer: Any, max_rows: int | None, end: str | None, max_length: int
) -> tuple[list[list[int]], list[str]]:
    """Each row's prompt (token ids) and reference (text, up to ``end``, :func:`turn_end`). Left out: rows with no
    prompt before their last span, and rows whose span ``max_length`` may have cut (it reaches the row's last
    token at that length): a cut reference no generation can match."""
    found, references = [], []
    for row in rows:
        labels = row["labels"]
        learned = [i for i, label in enumerate(labels) if label != IGNORE]
        if not learned:
            continue
        stop = start = learned[-1] + 1
        while start > 0 and labels[start - 1] != IGNORE:
            start -= 1
        if start == 0 or stop >= max_length:
            continue
        found.append(list(row["input_ids"][:start]))
        references.append(_until(tokenizer.decode(row["input_ids"][start:stop], skip_special_tokens=True), end))
        if len(found) == max_rows:
            break
    return found, references


@torch.inference_mode()
def generate(
    model: Any, tokenizer: Any, batch: list[list[int]], settings: Generate, seed: int, end: str | None = None
) -> list[str]:
    """The text ``model`` generates after each prompt of ``batch``, up to ``end`` (special tokens dropped, spaces
    stripped): at most ``max_new_tokens``, never past the model's positions (prompts go in length order, so that
    a batch's longest prompt shortens the others' room little)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling = settings.temperature > 0
    # Every decoding setting given: the model's own generation_config (a repetition penalty, top_k) fills the
    # ones left unset, and greedy would not be greedy.
    options = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": settings.num_beams}
    if sampling:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    was_training = model.training
    model.eval()
    transformers.set_seed(seed)  # a sampled generation is the same on every run
    texts: list[str] = []
    try:
        for i in range(0, len(batch), settings.batch_size):
            part = batch[i : i + settings.batch_size]
            width = max(len(p) for p in part)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in part], device=device)  # left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part], device=device)
            room = settings.max_new_tokens if positions is None else min(settings.max_new_tokens, positions - width)
            if room < 1:
                raise ValueError(f"a prompt of {width} tokens leaves no room in the model's {positions} positions")
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=room,  # never past the model's positions
                do_sample=sampling,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,  # the data's (a model built from a config knows another)
                use_cache=True,
                **({"stop_strings": [end], "tokenizer": tokenizer} if end else {}),
                **options,
            )
            texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [_until(t, end) for t in texts]


def score(names: list[str], predictions: list[str], references: list[str], root: Path) -> dict[str, float]:
    """Each metric of ``names`` over the generations: the built-in ones (means over rows), or the user's function."""
    out: dict[str, float] = {}
    rouge = [n for n in names if n in BUILTIN and n.startswith("rouge")]
    if rouge:
        from rouge_score import rouge_scorer

        scorer_ = rouge_scorer.RougeScorer(rouge, tokenizer=_Words())
        scored = [scorer_.score(r, p) for p, r in zip(predictions, references, strict=True)]
        out.update({n: statistics.fmean(s[n].fmeasure for s in scored) for n in rouge})
    for name in names:
        if name == "exact_match":
            out[name] = statistics.fmean(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
        elif name not in BUILTIN:
            value = _user(name, root)(list(predictions), list(references))
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} returned {value!r}, not a finite number")
            out[name] = float(value)
    return {n: round(out[n], 6) for n in names}


class _Words:
    """ROUGE's tokens: lowercased words of any script, and Chinese, Japanese and Korean characters one by one
    (rouge-score's own tokenizer keeps ASCII letters and digits only: it scores "привет мир" against itself 0)."""

    _pattern = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|[^\W_\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]+")

    def tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text.lower())


@functools.cache
def _user(name: str, root: Path):
    return scorer(name, root)  # imported once per process


def finalist_metrics(bench: Any, model: Any, seed: int) -> dict[str, Any]:
    """The finalist's scores on its rows, the settings they were made with, the time its generation and scoring
    took, and its first few generations."""
    f = bench.cfg.finalists
    rows = bench.test_rows if f.split == "test" else bench.eval_rows
    end = turn_end(bench.tokenizer) if bench.cfg.data.format == "chat" else None
    batch, references = prompts(rows, bench.tokenizer, f.generate.max_rows, end, bench.cfg.data.max_length)
    if not batch:
        raise ValueError(f"no {f.split} row has a prompt before a whole response (data.max_length cuts them?)")
    order = sorted(range(len(batch)), key=lambda i: len(batch[i]))  # batches of like prompts: like room, padding
    batch, references = [batch[i] for i in order], [references[i] for i in order]
    started = time.perf_counter()
    predictions = generate(model, bench.tokenizer, batch, f.generate, seed, end)
    scores = score(f.metrics, predictions, references, bench.cfg.root)
    seconds = time.perf_counter() - started
    return {
        "scores": scores,
        "settings": f.settings(),
        "rank_by": f.rank_by,
        "top": f.top,
        "generate_seconds": round(seconds, 3),
        "rows": len(batch),
        "samples": [
            {"prediction": p[:300], "reference": r[:300]}
            for p, r in zip(predictions[:SAMPLES], references[:SAMPLES], strict=True)
        ],
    }
