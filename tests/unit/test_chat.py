"""data.format: chat: conversations rendered with a chat template, the loss on the assistant's turns only, and every
way it cannot work said in one line. tests/data/conversations_*.jsonl: the chat pairs of chat_*.jsonl as one- and
two-exchange conversations, some with a system message."""

import json

import pytest
from conftest import CHATML, DATA, chat_study

from hpo import ConfigError, load_study
from hpo.data import load_examples
from hpo.trial.tokens import IGNORE
from hpo.trial.workbench import prepare


def test_the_loss_is_on_every_assistant_turn_and_nothing_else(write_study, tiny_bpe_tokenizer):
    bench = prepare(load_study(chat_study(write_study, tiny_bpe_tokenizer, template=CHATML)))
    rows = [json.loads(line)["messages"] for line in (DATA / "conversations_train.jsonl").read_text().splitlines()]
    assert len(bench.train_rows) == len(rows) == 36
    for messages, row in zip(rows, bench.train_rows, strict=True):
        learned = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE]
        assert [label for label in row["labels"] if label != IGNORE] == learned  # a label is its own token
        turns = "".join(f"{m['content']}<|im_end|>\n" for m in messages if m["role"] == "assistant")
        assert bench.tokenizer.decode(learned) == turns, messages  # each turn and its end marker, in order
        whole = bench.tokenizer.decode(row["input_ids"])
        assert whole.startswith("<|im_start|>") and whole.count("<|im_start|>") == len(messages)


def test_a_long_conversation_is_cut_at_max_length_with_its_labels(write_study, tiny_bpe_tokenizer):
    bench = prepare(load_study(chat_study(write_study, tiny_bpe_tokenizer, template=CHATML, max_length=120)))
    assert max(len(row["input_ids"]) for row in bench.train_rows) == 120  # the two-exchange ones are cut
    for row in bench.train_rows:
        assert len(row["input_ids"]) == len(row["labels"]) <= 120


def test_a_tokenizer_without_a_chat_template_needs_data_template(write_study, tiny_bpe_tokenizer):
    with pytest.raises(ConfigError, match=r"data.format: the tokenizer of .* has no chat template: give one as data"):
        prepare(load_study(chat_study(write_study, tiny_bpe_tokenizer)))


@pytest.mark.parametrize(
    "template, error",
    [
        # marks the last turn: a conversation's start renders otherwise alone, and the turns cannot be found
        (
            "{% for m in messages %}{{ m['content'] }}{% if loop.last %} END{% endif %}\n{% endfor %}",
            "renders otherwise alone than in the whole conversation",
        ),
        ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
        # Mistral's and Llama 2's templates refuse what they cannot render: which conversation, in one line
        (
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHATML,
            "the conversation that starts 'Name the kind of request.': TemplateError: no system role",
        ),
        # a template that drops the content (a content-parts template given strings): nothing to learn but markers
        (CHATML.replace("{{ m['content'] }}", ""), "the template does not write turn 2's content where the turn is"),
    ],
)
def test_a_template_that_cannot_mark_the_turns_is_one_line(write_study, tiny_bpe_tokenizer, template, error):
    with pytest.raises(ConfigError, match=rf"data.template: the chat template: .*{error}"):
        prepare(load_study(chat_study(write_study, tiny_bpe_tokenizer, template=template)))


@pytest.mark.parametrize(
    "row, error",
    [
        ({"messages": "hello"}, "'messages' is a string, expected a list of {role, content} messages"),
        ({"messages": []}, "'messages' is an empty list: no conversation"),
        ({"messages": [{"content": "hi"}]}, "messages[0] is not a message"),
        ({"messages": [{"role": "user"}]}, "messages[0]: 'content' missing"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "'messages' has no assistant turn with content: nothing to learn",
        ),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "'messages' starts with an assistant turn"),
        ({"text": "hi"}, "'messages' missing"),
    ],
)
def test_a_conversation_that_is_not_one_is_named_by_file_and_line(
    write_study, tiny_bpe_tokenizer, tmp_path, row, error
):
    good = (DATA / "conversations_train.jsonl").read_text().splitlines()[:3]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([*good, json.dumps(row)]) + "\n")
    with pytest.raises(ConfigError) as e:
        load_examples(load_study(chat_study(write_study, tiny_bpe_tokenizer, train=str(path), template=CHATML)))
    assert f"train.jsonl:4: {error}" in str(e.value), str(e.value)  # the file's line 4


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"task": "sequence-classification"}, "data.format: chat data trains a causal-lm"),
        ({"data": {"prompt_column": "p", "response_column": "r"}}, "data.prompt_column: format: chat learns"),
        ({"data": {"format": "text", "template": CHATML}}, "data.template: template goes with format: chat"),
        ({"data": {"format": "text", "messages_column": "turns"}}, "data.messages_column: messages_column goes with"),
    ],
)
def test_what_chat_data_cannot_go_with_is_refused(write_study, tiny_bpe_tokenizer, changes, error):
    import yaml

    path = chat_study(write_study, tiny_bpe_tokenizer)
    study = yaml.safe_load(path.read_text())
    study["data"].update(changes.pop("data", {}))
    study.update(changes)
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match=error):
        load_study(path)


def test_a_token_across_the_start_of_a_turn_is_learned(write_study, tiny_bpe_tokenizer):
    # A generation prompt that ends in a blank: byte-level BPE writes the blank into the turn's first token ("Ġthe"),
    # which starts one character before the turn. It was left out, and no row learned its first word.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}\n"
        "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    bench = prepare(load_study(chat_study(write_study, tiny_bpe_tokenizer, template=template)))
    answers = {json.loads(line)["messages"][-1]["content"] for line in (DATA / "conversations_train.jsonl").open()}
    for row in bench.train_rows:
        learned = bench.tokenizer.decode(
            [t for t, y in zip(row["input_ids"], row["labels"], strict=True) if y != IGNORE]
        )
        assert learned.split()[0] in answers, learned
