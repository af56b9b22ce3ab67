"""Study file (YAML) → typed, validated ``StudyConfig``; the module moves to hpo/config/models.py, to be split by stage."""

from hpo.config.models import *  # noqa: F403
from hpo.config.models import _deep_merge  # noqa: F401
