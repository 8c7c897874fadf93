"""A LatencyTrace's spec, typed, with the checks its schema cannot make and the defaults it relies on.

The CRD schema rejects most mistakes at the API server; this module re-checks what the operator depends
on (the schema can be older than the operator, or bypassed), and adds what a schema cannot express:
label syntax, the operator's own duration policy. `parse` raises SpecError with every problem found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from latencytrace.node_agent import segments
from latencytrace.node_agent.contract import ExportOverrides, TraceSettings


class SpecError(ValueError):
    pass


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class Requirement(_Model):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


class LabelSelector(_Model):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: tuple[Requirement, ...] = ()


class TraceSpec(_Model):
    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None
    pod_names: tuple[str, ...] | None = None
    directions: tuple[Literal["receive", "transmit"], ...] = ("receive", "transmit")
    segments: tuple[str, ...] = ()
    slow_threshold_microseconds: int = Field(default=1000, ge=1)
    spans_per_second: int = Field(default=10, ge=0)
    sample_one_in: int = Field(default=0, ge=0)
    duration: str | None = None
    export: ExportOverrides = Field(default_factory=ExportOverrides)

    def settings(self) -> TraceSettings:
        """What every agent tracing one of the selected pods gets (contract.TraceSettings)."""
        return TraceSettings(directions=list(self.directions), segments=sorted(self.segments, key=_segment_order),
                             slow_threshold_microseconds=self.slow_threshold_microseconds,
                             spans_per_second=self.spans_per_second, sample_one_in=self.sample_one_in,
                             export=self.export)

    def duration_seconds(self) -> float | None:
        return None if self.duration is None else parse_duration(self.duration)


def _segment_order(name: str) -> int:
    return segments.BY_NAME[name].id if name in segments.BY_NAME else len(segments.NAMES)


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Kubernetes (Go) duration string such as 1h30m or 90s."""
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise SpecError(f"duration {text!r} is not a duration such as 30s, 15m or 1h30m")
    return total


_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY = re.compile(rf"^(({_DNS_SUBDOMAIN})/)?{_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")


def label_problems(where: str, sel: LabelSelector) -> list[str]:
    problems = []

    def key_ok(key: str) -> bool:
        prefix, _, name = key.rpartition("/")
        return bool(_LABEL_KEY.match(key)) and len(name) <= 63 and len(prefix) <= 253

    for key, value in sel.match_labels.items():
        if not key_ok(key):
            problems.append(f"{where}.matchLabels: {key!r} is not a valid label key")
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"{where}.matchLabels[{key}]: {value!r} is not a valid label value")
    for i, req in enumerate(sel.match_expressions):
        at = f"{where}.matchExpressions[{i}]"
        if not key_ok(req.key):
            problems.append(f"{at}.key: {req.key!r} is not a valid label key")
        if req.operator in ("In", "NotIn") and not req.values:
            problems.append(f"{at}: {req.operator} needs at least one value")
        if req.operator in ("Exists", "DoesNotExist") and req.values:
            problems.append(f"{at}: {req.operator} takes no values")
        problems += [f"{at}.values: {v!r} is not a valid label value"
                     for v in req.values if len(v) > 63 or not _LABEL_VALUE.match(v)]
    return problems


def parse(raw: Mapping, max_duration_seconds: float) -> TraceSpec:
    """The typed spec, or SpecError naming every problem (field paths as in the manifest)."""
    try:
        spec = TraceSpec.model_validate(dict(raw))
    except ValidationError as e:
        raise SpecError("; ".join(
            f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())) from None
    problems: list[str] = []
    by_selector = spec.pod_selector is not None or spec.namespace_selector is not None
    if by_selector == (spec.pod_names is not None):
        problems.append("spec: select pods in exactly one way: podSelector and/or namespaceSelector, or podNames")
    for where, sel in (("spec.podSelector", spec.pod_selector), ("spec.namespaceSelector", spec.namespace_selector)):
        if sel is not None:
            problems += label_problems(where, sel)
    if not spec.directions:
        problems.append("spec.directions: trace at least one direction")
    for name in spec.segments:
        seg = segments.BY_NAME.get(name)
        if seg is None:
            problems.append(f"spec.segments: unknown segment {name!r}; known: {', '.join(segments.NAMES)}")
        elif seg.direction.otel not in spec.directions:
            problems.append(f"spec.segments: {name} is a {seg.direction.otel} segment, "
                            f"but {seg.direction.otel} is not in spec.directions")
    if spec.duration is not None:
        try:
            seconds = parse_duration(spec.duration)
            if seconds > max_duration_seconds:
                problems.append(f"spec.duration: {spec.duration} is longer than this cluster allows "
                                f"({timedelta(seconds=max_duration_seconds)})")
        except SpecError as e:
            problems.append(f"spec.{e}")
    if problems:
        raise SpecError("; ".join(problems))
    return spec


def deadline(spec: TraceSpec, start: datetime | None) -> datetime | None:
    """When the trace completes by itself, or None (no duration, or not started)."""
    seconds = spec.duration_seconds()
    if seconds is None or start is None:
        return None
    return start + timedelta(seconds=seconds)
