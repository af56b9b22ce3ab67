"""The base of every model of a study file (:mod:`hpo.config.sections`, :mod:`hpo.config.clusters`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from hpo.space import no_boolean_numbers


# Every model of a study file: an unknown key is an error, NaN and infinity are refused, and so is a boolean
# where a number goes.
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _no_boolean_numbers = field_validator("*", mode="before")(no_boolean_numbers)
