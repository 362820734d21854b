"""The base of every config section and the error every config problem raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem found before any work starts; the message names key, value and fix."""


class _Strict(BaseModel):
    # allow_inf_nan=False: nan/inf fail every range check with a misleading message ("less than
    # or equal to 1"); rejecting them first names the real problem.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
