"""The saved form of module records: one declared schema per record kind, checked on load.

A record is the JSON object ``{"kind": KIND, ...}`` a stage writes under
``state.modules["<component>/<module name>"]`` and a reload replays. Its fields are part of the
saved format, like ``KIND``. Records stay plain JSON dicts in memory because stages fill them in
steps (a format search writes the chosen format after the layer exists); what a typed record would
add at load (unknown or missing keys, wrong types, named before anything is built) the schema
here gives, in one place per kind, without a dict <-> object conversion on every read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffsqueeze.errors import ModelLoadError


@dataclass(frozen=True)
class RecordSchema:
    """The keys a record kind may hold: ``required`` and ``optional`` map a key to the JSON types its
    value may take (``None`` in a type tuple allows null); ``act`` keys are checked against
    :data:`ACT_SCHEMA`."""

    required: dict[str, tuple] = field(default_factory=dict)
    optional: dict[str, tuple] = field(default_factory=dict)

    def problem(self, record: dict[str, Any]) -> str | None:
        """Why ``record`` does not fit this schema, or None."""
        allowed = {"kind", *self.required, *self.optional}
        unknown = sorted(set(record) - allowed)
        if unknown:
            return f"unknown key(s) {', '.join(unknown)} (a newer diffsqueeze wrote it?)"
        missing = sorted(k for k in self.required if k not in record)
        if missing:
            return f"missing key(s) {', '.join(missing)}"
        for key, value in record.items():
            if key == "kind":
                continue
            types = self.required.get(key) or self.optional[key]
            if not _fits(value, types):
                return f"'{key}' is {value!r}, expected {_type_names(types)}"
            if key == "act" and value is not None:
                problem = ACT_SCHEMA.problem(value)
                if problem:
                    return f"act: {problem}"
        return None


def _fits(value: Any, types: tuple) -> bool:
    if value is None:
        return None in types
    if isinstance(value, bool):  # a JSON bool is not an int here
        return bool in types
    return any(t is not None and t is not bool and isinstance(value, t) for t in types)


def _type_names(types: tuple) -> str:
    return " or ".join("null" if t is None else t.__name__ for t in types)


ACT_SCHEMA = RecordSchema(
    required={"format": (str,), "shape": (list,)},
    optional={"groups": (int,), "n_timesteps": (int,), "group_size": (int,), "format_2": (str,)},
)
"""An activation quantizer's record (the ``act`` of quantized and binary layers)."""

QUANT_LAYER_SCHEMA = RecordSchema(
    optional={"weight_format": (str, None), "act": (dict, None), "group_size": (int, None), "split": (int, None), "weight_format_2": (str, None),
              "lowrank": (int,), "smooth": (bool,)},
)
"""``QuantLinear`` / ``QuantConv2d``: weight format(s), group size, input-channel split, the
activation quantizer, low-rank branch rank and smoothing. Every key is optional: a layer whose
weights (or activations) stay float has no ``weight_format`` (or ``act``); older exports omit them."""

BINARY_LAYER_SCHEMA = RecordSchema(
    required={"order": (int,)},
    optional={"masked": (bool,), "act": (dict, None), "group": (int,)},
)
"""``BinaryLinear`` / ``BinaryConv2d``: number of binary bases, whether a pruning mask applies, the
activation quantizer and the layer's group in the stage's plan."""

SOFTMAX_SCHEMA = RecordSchema(required={"bits": (int,)})
"""A quantized attention softmax."""

ATTENTION_SCHEMA = RecordSchema(required={"bits": (int,), "prob_bits": (int,)})
"""LSQ quantizers of an attention's q, k, probabilities and v."""


def check_records(records: dict[str, dict], schemas: dict[str, RecordSchema],
                  error: type[Exception] = ModelLoadError, why: str = "the compressed model is damaged or "
                  "from another diffsqueeze version") -> None:
    """Check every record against its kind's schema (on load: before a module is rebuilt; on export:
    before a file is written).

    Raises:
        error: naming the record and what is wrong with it (not an object, unknown kind,
            unknown/missing key, wrong type), followed by ``why``.
    """
    for key, record in records.items():
        if not isinstance(record, dict):
            raise error(f"module record '{key}' is not an object: {record!r}; {why}")
        kind = record.get("kind")
        if kind not in schemas:
            raise error(f"module '{key}' has unknown kind {kind!r}; known: {', '.join(sorted(schemas))}; {why}")
        problem = schemas[kind].problem(record)
        if problem:
            raise error(f"module record '{key}' ({kind}): {problem}; {why}")
