"""hpo.data: every value a task reads is checked, naming the data file and line; one spelling per label;
very long texts are cut before tokenizing, to exactly the tokens of the whole text.

The one-line CLI errors of whole hostile files are in tests/broken_data/ (test_broken_data.py).
"""

import json
import os
import sys
import textwrap
from pathlib import Path

from conftest import DATA
from measure import run_measured

SEQ, TOK, LM = "sequence-classification", "token-classification", "causal-lm"
ROOT = Path(__file__).parents[2]


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def test_checking_data_needs_no_torch_and_little_memory(write_study, tmp_path):
    # The lead's goal: `hpo run` fails on broken data in well under 5 s and 300 MB, before importing torch.
    rows = [{"text": f"hello there number {i}", "label": i % 2} for i in range(20_000)] + [{"text": "x", "label": None}]
    path = write_study(data={"train": str(tmp_path / "t.jsonl"), "eval": str(DATA / "eval.csv")})
    (tmp_path / "t.jsonl").write_text(jsonl(*rows))
    code = (
        "import sys\nfrom hpo import ConfigError, load_study\nfrom hpo.data import load_examples\n"
        "try:\n    load_examples(load_study(sys.argv[1]))\nexcept ConfigError as e:\n    print(e)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out, cpu_s, rss_mb = measured([sys.executable, "-c", code, str(path)], tmp_path)
    assert "data.train: t.jsonl:20001: 'label' is null" in out and "[]" in out, out  # run in tmp_path: relative
    assert cpu_s < 5 and rss_mb < 300, f"{cpu_s:.1f} s CPU, {rss_mb:.0f} MB"


def measured(args: list[str], cwd: Path, limit_cpu_s: int = 120, limit_mb: int = 4096) -> tuple[str, float, float]:
    """Run ``args`` under CPU and memory limits: its stdout, CPU seconds and peak RSS in MB (``os.wait4``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = run_measured(args, cwd, env, limit_cpu_s=limit_cpu_s, limit_mib=limit_mb)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout, result.cpu_s, result.rss_mib


def test_a_50_mb_cell_tokenizes_in_bounded_time_and_memory(tmp_path):
    # Before (33106b1, measured here): one 50 MB text took 51 s of CPU and 6 GB to tokenize, for 128 tokens.
    code = textwrap.dedent("""
        from transformers import BertTokenizerFast
        from hpo.trial.tokens import tokenize
        words = ["hello", "there", "cold", "and", "windy", "please", "pizza", "today"]
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])})
        text = " ".join(words * 1_000_000)[:50_000_000]  # 50 MB
        for task, rows in [("sequence-classification", [(text, 0)]), ("causal-lm", [(text, "")]),
                           ("causal-lm", [(text, text)]), ("token-classification", [(words * 200_000, [0] * 1_600_000)])]:
            (row,) = tokenize(task, rows, tok, 128)
            assert len(row["input_ids"]) == 128, (task, len(row["input_ids"]))
        """)
    _, cpu_s, rss_mb = measured([sys.executable, "-c", code], tmp_path, limit_cpu_s=60)
    print(f"50 MB cell: {cpu_s:.1f} s CPU, {rss_mb:.0f} MB")
    assert cpu_s < 30 and rss_mb < 1000, f"{cpu_s:.1f} s CPU, {rss_mb:.0f} MB"
