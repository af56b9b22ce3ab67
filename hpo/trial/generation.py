"""A finalist's generations (``finalists:``): each row's prompt generated on, and scored against its reference.

A row's reference is its last learned span (the response of a prompt/response pair, a conversation's last assistant
turn) and its prompt every token before it, as the trial trained on it: the same template, the same truncation.
Generation is transformers' ``generate``, batched (left-padded) with the KV cache; greedy unless a temperature is set.
"""

from __future__ import annotations

import functools
import math
import numbers
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
    rows: list[dict[str, Any]], tokenizer: Any, max_rows: int | None, end: str | None = None
) -> tuple[list[list[int]], list[str]]:
    """Each row's prompt (token ids) and reference (text, up to ``end``, :func:`turn_end`); rows with no prompt before
    their last span are left out."""
    found, references = [], []
    for row in rows[:max_rows]:
        labels = row["labels"]
        learned = [i for i, label in enumerate(labels) if label != IGNORE]
        if not learned:
            continue
        stop = start = learned[-1] + 1
        while start > 0 and labels[start - 1] != IGNORE:
            start -= 1
        if start == 0:
            continue
        found.append(list(row["input_ids"][:start]))
        references.append(_until(tokenizer.decode(row["input_ids"][start:stop], skip_special_tokens=True), end))
    return found, references


@torch.inference_mode()
def generate(
    model: Any, tokenizer: Any, batch: list[list[int]], settings: Generate, seed: int, end: str | None = None
) -> list[str]:
    """The text ``model`` generates after each prompt of ``batch``, up to ``end`` (special tokens dropped, spaces
    stripped): at most ``max_new_tokens``, never past the model's positions."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling = settings.temperature > 0
    options = {"temperature": settings.temperature, "top_p": settings.top_p} if sampling else {}
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
                num_beams=settings.num_beams,
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
    rouge = [n for n in names if n.startswith("rouge")]
    if rouge:
        from rouge_score import rouge_scorer

        scored = [rouge_scorer.RougeScorer(rouge).score(r, p) for p, r in zip(predictions, references, strict=True)]
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


@functools.cache
def _user(name: str, root: Path):
    return scorer(name, root)  # imported once per process


def finalist_metrics(bench: Any, model: Any, seed: int) -> dict[str, Any]:
    """The finalist's scores on its rows, the time its generation took, and its first few generations."""
    f = bench.cfg.finalists
    rows = bench.test_rows if f.split == "test" else bench.eval_rows
    end = turn_end(bench.tokenizer) if bench.cfg.data.format == "chat" else None
    batch, references = prompts(rows, bench.tokenizer, f.generate.max_rows, end)
    if not batch:
        raise ValueError(f"no {f.split} row has a prompt before its response")
    started = time.perf_counter()
    predictions = generate(model, bench.tokenizer, batch, f.generate, seed, end)
    seconds = time.perf_counter() - started
    return {
        "scores": score(f.metrics, predictions, references, bench.cfg.root),
        "rank_by": f.rank_by,
        "top": f.top,
        "generate_seconds": round(seconds, 3),
        "rows": len(batch),
        "samples": [
            {"prediction": p[:300], "reference": r[:300]}
            for p, r in zip(predictions[:SAMPLES], references[:SAMPLES], strict=True)
        ],
    }
