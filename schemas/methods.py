"""The one vocabulary of methods: refresh, reader, serving, evaluation, export and the CLI use these names.

Two levels, with one mapping between them:

- ``Method``: how a request is personalised at serving time (``generate --method``, a serving
  request's ``method``, ``export --method``, the evaluation's settings).
- ``Family``: which computation of the refresh produced an artifact; what the store records
  (``users.methods``, the manifest's ``methods``, the ``vectors.method`` column).

``style_vector`` and ``influence`` both use SteerX artifacts; ``population`` uses the CAA
family's population row. A style vector has a ``Source`` (what its contrast was computed from).
``recommended`` is no computation of its own: serving resolves it per user and condition to the method
and strength the store's ``recommended`` table (or the manifest's population choice) names.
"""

from __future__ import annotations

from enum import StrEnum


class Method(StrEnum):
    NONE = "none"  # no personalisation
    CAA = "caa"  # the user's CAA direction (shrunk toward the population), added to the residual stream
    BT = "bt"  # the user's Bradley-Terry ideal point composed with the version's basis
    POPULATION = "population"  # the one population CAA direction
    STYLE_VECTOR = "style_vector"  # the user's SteerX style vector
    INFLUENCE = "influence"  # SteerX influence decoding with the user's style description
    DPS = "dps"  # contrastive decoding against the model with the user's preference heads ablated
    # the method and strength the refresh chose for this user on their held-out items (per condition: the prompt
    # alone, or on top of retrieved history), else the population's choice; resolves to one of the methods above
    RECOMMENDED = "recommended"


class Family(StrEnum):
    CAA = "caa"
    BT = "bt"
    DPS = "dps"
    STEERX = "steerx"


class Source(StrEnum):
    HISTORY = "history"  # the user's own responses vs style-agnostic ones
    DESCRIPTION = "description"  # with vs without the style description S
    BLEND = "blend"  # the mean of the two


FAMILY_OF: dict[Method, Family | None] = {
    Method.NONE: None, Method.CAA: Family.CAA, Method.BT: Family.BT, Method.POPULATION: Family.CAA,
    Method.STYLE_VECTOR: Family.STEERX, Method.INFLUENCE: Family.STEERX, Method.DPS: Family.DPS,
    Method.RECOMMENDED: None,  # a per-user choice among the others, not an artifact of its own
}
# methods that add a vector to the residual stream (exportable to engines; they take layers and a scale)
VECTOR_METHODS: tuple[Method, ...] = (Method.CAA, Method.BT, Method.POPULATION, Method.STYLE_VECTOR)
# the name of each method's strength in the docs and reports (none has none; recommended takes the one it resolves to)
STRENGTH: dict[Method, str] = {Method.CAA: "alpha", Method.BT: "alpha", Method.POPULATION: "alpha",
                               Method.STYLE_VECTOR: "gamma", Method.INFLUENCE: "lambda", Method.DPS: "gamma"}
# the evaluation's prompting baseline: BM25-retrieved history items in the prompt (not a steering method)
HISTORY_PROMPT = "history_prompt"


def setting(method: Method | str, source: Source | str | None = None) -> str:
    """An evaluated setting's name: the method, with the style vector's source (``style_vector:history``)."""
    return f"{method}:{source}" if source else str(method)
