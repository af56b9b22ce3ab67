"""Study file (YAML) → typed, validated ``StudyConfig``: parse → compose → validate, one module per stage.

- :mod:`~hpo.config.parse`: one YAML file → data and the line of every key, refusing hostile input
  (size, nesting, alias bombs, encodings, duplicate keys).
- :mod:`~hpo.config.compose`: ``extends:`` chains, ``search_space: FILE``, absolute paths, the
  ``--env`` overlay, ``${VAR}`` and ``.env``, command-line overrides; secrets kept to :func:`mask`.
- :mod:`~hpo.config.sections` and :mod:`~hpo.config.models`: the pydantic models (each section, and
  :class:`StudyConfig` that holds them); the search-space entry :class:`~hpo.space.Param` lives in
  :mod:`hpo.space`, beside the names it may search.
- :mod:`~hpo.config.validate`: pydantic's errors as ``FILE:LINE: key.path: message`` problems, the
  checks across keys, ``derive:`` and ``constraints:`` evaluated at the corners of the space.
- :mod:`~hpo.config.load`: :func:`load_study`, the three stages for the chosen environment, and
  the other environments' own lines checked too.

A study is validated in three stages, each before any trial trains; ``hpo validate`` and ``hpo run``
run all three, in this order:

1. **This package** — the file itself: YAML, keys and types, ranges, names (TrainingArguments fields
   are read from transformers' source with ``ast``, not imported), the search space, sampler and
   pruner (built and run on a test study), expressions. It imports neither torch nor transformers.
   Its steps run in order — YAML, composition, types and values, checks across keys, expressions —
   each reporting all its problems at once, and each only once the steps before it pass.
2. :func:`hpo.data.load_examples` — the data files' contents: columns, every value the task reads,
   labels eval has that train lacks. Still no torch; it stops at the first bad file.
3. :func:`hpo.trial.workbench.prepare` — what needs transformers and peft: every ``train:``, searched and
   derived TrainingArguments value (:func:`hpo.trial.workbench.check_training_arguments`), loading the
   tokenizer and model config, ``max_length`` against the model's positions and LoRA
   ``target_modules`` against its modules (:func:`hpo.trial.workbench.check_model_fits`), and rows left with
   nothing to predict after tokenization.

Every problem is a :class:`~hpo.errors.ConfigError` whose lines read ``FILE:LINE: key.path: message``.
"""

from hpo.config.compose import PATH_KEYS, absolute_sqlite, mask
from hpo.config.compose import _deep_merge as _deep_merge  # for tests of the merge alone
from hpo.config.load import load_study
from hpo.config.models import StudyConfig
from hpo.config.parse import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, parse_yaml
from hpo.config.sections import (
    DATA_SUFFIXES,
    DataConfig,
    EvalEvery,
    EvalGrid,
    LoraSettings,
    ModelConfig,
    Objective,
    PrunerSpec,
    Quantization,
    Resources,
    SamplerSpec,
)
from hpo.errors import ConfigError, Problem
from hpo.space import Param

__all__ = [
    "DATA_SUFFIXES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "PATH_KEYS",
    "ConfigError",
    "DataConfig",
    "EvalEvery",
    "EvalGrid",
    "LoraSettings",
    "ModelConfig",
    "Objective",
    "Param",
    "Problem",
    "PrunerSpec",
    "Quantization",
    "Resources",
    "SamplerSpec",
    "StudyConfig",
    "absolute_sqlite",
    "load_study",
    "mask",
    "parse_yaml",
]
