"""Writes the causal-LM study's data and tokenizer: python studies/data/chat/make_chat.py

Prompt/response pairs: each request from the intents data set gets the
assistant's reply for its intent, so a model can learn to answer. The loss is
on the response only. The same pairs as conversations (conversations_*.jsonl,
for studies/chat_lora.yaml): a system line, every third one after an earlier
exchange. A byte-level BPE tokenizer (GPT-2 style, 2,000 tokens)
is trained on these texts and saved in tokenizer/, so the study's small GPT-2
(built from a config) needs no download. Deterministic.
"""

import csv
import json
from pathlib import Path

REPLIES = {
    "weather": "Here is the forecast you asked for.",
    "play_music": "Sure, playing that now.",
    "alarm": "Your alarm is set.",
    "book_restaurant": "I found a table for you.",
    "transfer_money": "The transfer is on its way.",
    "smart_home": "Done, the device is updated.",
}


def main() -> None:
    here = Path(__file__).parent
    intents = here.parent / "intents"
    texts = []
    for split in ("train", "eval"):
        with open(intents / f"{split}.csv") as f:
            rows = [{"prompt": r["text"], "response": REPLIES[r["label"]]} for r in csv.DictReader(f)]
        (here / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts += [r["prompt"] for r in rows] + [r["response"] for r in rows]
        conversations = [{"messages": _conversation(rows, i)} for i in range(len(rows))]
        (here / f"conversations_{split}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=2000, min_frequency=1, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(here / "tokenizer")


SYSTEM = "You are a home assistant. Answer in one sentence."


def _conversation(rows: list[dict], i: int) -> list[dict]:
    """Row ``i`` as a chat (studies/chat_lora.yaml): a system line, and every third one the row before it as an
    earlier exchange, so that the last assistant turn is what a finalist generates."""
    earlier = rows[i - 1] if i % 3 == 2 else None
    turns = [{"role": "system", "content": SYSTEM}]
    if earlier:
        turns += [{"role": "user", "content": earlier["prompt"]}, {"role": "assistant", "content": earlier["response"]}]
    return turns + [{"role": "user", "content": rows[i]["prompt"]}, {"role": "assistant", "content": rows[i]["response"]}]


if __name__ == "__main__":
    main()
