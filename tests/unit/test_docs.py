"""The README and docs/ hold together: every relative link and #anchor resolves; the README stays short; what
they say of the study file and the corpus is what the code and the files hold.

File reading, and the typed config's models (no training).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260  # the README is an introduction; the reference lives in docs/

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped, spaces → '-'.

    >>> slug("1. Same work: hpo, `Trainer.hyperparameter_search`, a plain loop")
    '1-same-work-hpo-trainerhyperparameter_search-a-plain-loop'
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a linked heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub makes for ``page``'s headings, with -1, -2 … for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text(encoding="utf-8")))


def _local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto: …


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in filter(_local, links(page)):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in filter(_local, links(README))}
    unlinked = [p.relative_to(ROOT) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move reference to docs/"


def test_link_checker_sees_what_github_sees(tmp_path: Path):
    """The checker itself: links in code are ignored, repeats get -1, a missing anchor is found."""
    page = tmp_path / "p.md"
    page.write_text(
        "# A title\n## Notes\n## Notes\n```\n# not a heading\n[x](nowhere.md)\n```\n"
        "See `[y](nowhere.md)` and [z](p.md#notes-1), [w](#a-title), [v](https://example.com).\n",
        encoding="utf-8",
    )
    assert anchors(page) == {"a-title", "notes", "notes-1"}
    assert links(page) == ["p.md#notes-1", "#a-title", "https://example.com"]
    assert slug("Errors and `hpo validate`") == "errors-and-hpo-validate"
    assert slug("Faults: what hpo guarantees") == "faults-what-hpo-guarantees"
    assert (
        slug('Nothing finished is lost, and "best" is never wrong')
        == "nothing-finished-is-lost-and-best-is-never-wrong"
    )


YAML_BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.M | re.S)
SHIPPED = re.compile(r"\b(?:studies|search_spaces)/[\w-]+\.ya?ml")
WILDCARD = "..."  # `{...}` in an excerpt: what is left out


def yaml_blocks() -> list[tuple[str, dict, str | None]]:
    """Every ```yaml block of the README and docs/ (each a study-file excerpt): where, its mapping, and the shipped
    file it claims to be, named on its first line or in the paragraph just above it (None: no claim)."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in YAML_BLOCK.finditer(text):
            body = m.group(1)
            above = text[: m.start()].rstrip().rsplit("\n\n", 1)[-1]
            named = SHIPPED.findall(body.splitlines()[0]) or SHIPPED.findall(above)
            where = f"{page.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 2}"
            out.append((where, yaml.safe_load(body), named[-1] if named else None))
    return out


def _models(annotation) -> list[type]:
    """The pydantic models an annotation holds (``Objective | None`` → [Objective])."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _fields(model) -> dict[str, Any]:
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def unknown_keys(value: Any, model, path: str = "") -> list[str]:
    """The key paths of ``value`` (a study-file excerpt) that ``model`` has no field for, through nested models
    and mappings of models (``search_space``'s parameters)."""
    if not isinstance(value, dict):
        return []
    fields, bad = _fields(model), []
    for key, sub in value.items():
        if key == WILDCARD:
            continue
        if key not in fields:
            if model.model_config.get("extra") != "allow":  # sampler/pruner: the Optuna class's own arguments
                bad.append(f"{path}{key}")
            continue
        annotation = fields[key].annotation
        if typing.get_origin(annotation) is dict:  # {name: model}: search_space's parameters
            for inner in _models(typing.get_args(annotation)[1]):
                for name, item in sub.items():
                    bad += unknown_keys(item, inner, f"{path}{key}.{name}.")
        else:
            for inner in _models(annotation):
                bad += unknown_keys(sub, inner, f"{path}{key}.")
    return bad


def _default(model, path: list[str]) -> Any:
    """The default of the field at ``path`` under ``model``, as a study file writes it; KeyError: none."""
    from pydantic import BaseModel

    field = _fields(model)[path[0]]
    if len(path) > 1:
        inner = _models(field.annotation) if typing.get_origin(field.annotation) is not dict else []
        if len(inner) != 1:  # a mapping (search_space, train, environments): no default per name
            raise KeyError(".".join(path))
        return _default(inner[0], path[1:])
    if field.is_required():
        raise KeyError(path[0])
    value = field.get_default(call_default_factory=True)
    return value.model_dump(exclude_none=False) if isinstance(value, BaseModel) else value


def mismatches(excerpt: Any, shipped: Any, model, path: list[str]) -> list[str]:
    """Where ``excerpt`` says another value than ``shipped`` (or, for a key the file does not set, than the
    key's default)."""
    if excerpt == WILDCARD or (isinstance(excerpt, dict) and set(excerpt) == {WILDCARD}):
        return []
    if excerpt == {} and isinstance(shipped, dict) and shipped:  # `environments: {}` where the file has some
        return [f"{'.'.join(path)}: {{}}, but the shipped file has {sorted(shipped)}"]
    if isinstance(excerpt, dict) and (isinstance(shipped, dict) or shipped is None):
        out = []
        for key, value in excerpt.items():
            if isinstance(shipped, dict) and key in shipped:
                out += mismatches(value, shipped[key], model, [*path, key])
            else:
                out += mismatches(value, _Unset, model, [*path, key])
        return out
    if shipped is _Unset:
        try:
            default = _default(model, path)
        except KeyError:
            return [f"{'.'.join(path)}: {excerpt!r}, but the shipped file does not set it"]
        if isinstance(excerpt, dict) and isinstance(default, dict):
            return mismatches(excerpt, default, model, path)
        return [] if excerpt == default else [f"{'.'.join(path)}: {excerpt!r}, but its default is {default!r}"]
    return [] if excerpt == shipped else [f"{'.'.join(path)}: {excerpt!r}, but the shipped file has {shipped!r}"]


_Unset = object()


def test_every_key_the_docs_show_is_a_key_of_the_study_file():
    from hpo.config.models import StudyConfig

    blocks = yaml_blocks()
    assert any("study-file.md" in where for where, *_ in blocks)  # the reference's "Every key" block is seen
    bad = [f"{where}: {key}" for where, excerpt, _ in blocks for key in unknown_keys(excerpt, StudyConfig)]
    assert not bad, "keys the docs show that the study file has no field for:\n" + "\n".join(bad)


def test_every_key_of_the_study_file_is_documented():
    from hpo.config.models import StudyConfig

    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    missing, seen = [], set()

    def walk(model, prefix: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for key, field in _fields(model).items():
            if not re.search(rf"`{re.escape(key)}\b|^\s*{re.escape(key)}:|[{{,]\s*{re.escape(key)}:", text, re.M):
                missing.append(prefix + key)
            for inner in _models(field.annotation):
                walk(inner, f"{prefix}{key}.")

    walk(StudyConfig, "")
    assert not missing, f"study-file keys no page of the docs names (as `key` or key:): {missing}"


def test_excerpts_of_shipped_files_say_what_the_files_hold():
    from hpo.config.models import StudyConfig

    claims = [(where, excerpt, name) for where, excerpt, name in yaml_blocks() if name]
    assert len(claims) >= 2  # the README's quickstart and the reference's "Every key"
    bad = []
    for where, excerpt, name in claims:
        shipped = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
        bad += [f"{where} ({name}): {m}" for m in mismatches(excerpt, shipped, StudyConfig, [])]
    assert not bad, "excerpts that differ from the file they show:\n" + "\n".join(bad)


#: "N <noun>" in the docs next to the folder it counts, and what it counts there.
COUNTS = {
    "tests/broken/": ("broken study files", lambda: len(list((ROOT / "tests" / "broken").glob("*.yaml")))),
    "tests/broken_data/": ("broken data", lambda: len(list((ROOT / "tests" / "broken_data").glob("*.yaml")))),
    "search_spaces/": ("search spaces", lambda: len(list((ROOT / "search_spaces").glob("*.yaml")))),
    "studies/": ("study files", lambda: len(list((ROOT / "studies").glob("*.yaml")))),
}


def quoted_counts(text: str) -> list[tuple[str, int]]:
    """(folder, number) for each "`folder` holds N <noun>" and "N <noun> in `folder`" the text says."""
    found = []
    for folder, (noun, _) in COUNTS.items():
        f, n = re.escape(folder), re.escape(noun)
        for pattern in (rf"`{f}`[^.]{{0,40}}?\b(\d+) {n}", rf"\b(\d+) {n}[^.]{{0,40}}?`{f}`"):
            found += [(folder, int(m)) for m in re.findall(pattern, text)]
    return found


def test_corpus_counts_the_docs_quote_match_the_folders():
    quoted = [(p.relative_to(ROOT), folder, n) for p in PAGES for folder, n in quoted_counts(p.read_text("utf-8"))]
    assert any(folder == "tests/broken/" for _, folder, _ in quoted)  # docs/study-file.md quotes it
    bad = [
        f"{page}: {n} in {folder}, which holds {COUNTS[folder][1]()}"
        for page, folder, n in quoted
        if n != COUNTS[folder][1]()
    ]
    assert not bad, "\n".join(bad)


def test_the_doc_checkers_catch_what_drifted():
    """The checkers themselves, on the statements that had drifted: a key the models lack, a value the shipped
    file does not have (the quickstart's old enqueue:), a stale count."""
    from hpo.config.models import StudyConfig

    assert unknown_keys({"data": {"train": "x", "max_rows": 1}, "search_space": {"lr": {"lo": 1}}}, StudyConfig) == [
        "data.max_rows",
        "search_space.lr.lo",
    ]
    shipped = {"study": "q", "pruner": {"name": "median", "n_startup_trials": 3}}
    assert mismatches({"enqueue": [{"learning_rate": 2e-5}]}, shipped, StudyConfig, []) == [
        "enqueue: [{'learning_rate': 2e-05}], but its default is []"
    ]
    assert mismatches({"environments": {"dev": {"n_trials": 3}}}, shipped, StudyConfig, []) != []
    assert mismatches({"pruner": {}}, shipped, StudyConfig, []) != []
    assert (
        mismatches({"pruner": {"name": "median"}, "repeats": 1, "objective": {"at": "last"}}, shipped, StudyConfig, [])
        == []
    )
    assert quoted_counts("`tests/broken/` holds 116 broken study files, each of") == [("tests/broken/", 116)]


#: Statements the docs made that the code no longer does, and why each is wrong now.
RETIRED = {
    "No per-trial checkpoints": "checkpoint_every saves them (hpo/trial/checkpoints.py)",
    "metric at the last evaluation": "the objective is at the scored evaluation: objective.at, last or best",
    "metrics at the last evaluation": "a trial's task metrics are from the scored evaluation (hpo/trial/finetune.py)",
    "`hpo train --best` run in one process": "it runs the trial's launcher (hpo/results/export.py)",
    "per example at the last evaluation": "eval_latency_ms is measured at the scored evaluation",
}


def test_no_page_repeats_a_retired_statement():
    said = [
        f"{p.relative_to(ROOT)}: {phrase!r} ({why})"
        for p in PAGES
        for phrase, why in RETIRED.items()
        if phrase.lower() in " ".join(p.read_text(encoding="utf-8").split()).lower()
    ]
    assert not said, "\n".join(said)
