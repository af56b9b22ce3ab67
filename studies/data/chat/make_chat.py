"""Writes the causal-LM study's data and tokenizer: python studies/data/chat/make_chat.py

Prompt/response pairs: each request from the intents data set gets the
assistant's reply for its intent, so a model can learn to answer. The loss is
on the response only. A byte-level BPE tokenizer (GPT-2 style, 2,000 tokens)
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

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=2000, min_frequency=1, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(here / "tokenizer")


if __name__ == "__main__":
    main()
