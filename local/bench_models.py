"""The bench's own look at the tables: the pynamodb models of the process's settings."""

from __future__ import annotations

from chalicelib import config
from chalicelib.store.models import Models, models_for


def models() -> Models:
    settings = config.get()
    return models_for(settings.tables, settings.aws_region)
