"""A LatencyTrace's spec, typed, with the checks its schema cannot make and the defaults it relies on.

The CRD schema rejects most mistakes at the API server; this module re-checks every one of its limits
(the schema can be older than the operator, or bypassed: whatever this accepts, the schema accepts too, a
generated-input test holds it to that), and adds what a schema cannot express: label syntax and the
cluster administrator's policy (`Limits`: durations, the cost knobs a trace may ask for, the export
destinations it may name). Both kinds of trace are parsed here: the kind decides how pods may be
selected (a LatencyTrace: its own namespace only; a ClusterLatencyTrace: across namespaces). `parse`
raises SpecError with every problem found, and nothing else, whatever the input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from latencytrace.node_agent import endpoints, segments
from latencytrace.node_agent.contract import NAMESPACED, ExportOverrides, TraceKind, TraceSettings

MIN_DURATION_SECONDS = 10.0  # as the CRD's CEL rule
MAX_DURATION_SECONDS = 168 * 3600.0  # as the CRD's CEL rule


@dataclass(frozen=True)
class Limits:
    """The administrator's policy (chart values `limits.*` and `otlp.*`, via LATENCYTRACE_OPERATOR_*).

    The defaults are the CRD's own bounds: no policy beyond the schema.
    """

    max_duration_seconds: float = MAX_DURATION_SECONDS
    # Applied when a trace gives no duration; None: the maximum (omitting it never escapes the maximum).
    default_duration_seconds: float | None = None
    min_slow_threshold_microseconds: int = 1
    max_spans_per_second: int = 1000
    min_sample_one_in: int = 0  # 0 (no sampling) is always allowed; 1..N-1 are refused
    min_time_one_in: int = 1  # timing 1 packet in fewer than this many is refused (1: every packet allowed)
    # Endpoints a trace may name in spec.export.otlpEndpoint (the default endpoint among them); None: any.
    allowed_endpoints: frozenset[str] | None = None
    # Segments a trace may ask for; None: any. With a list, a trace must name its segments (all of them by
    # default would escape it). What the node-wide ones cost every pod of a node: README "Only what is asked
    # for is attached".
    allowed_segments: frozenset[str] | None = None
    traces_per_namespace: int = 0  # LatencyTraces that run per namespace (the oldest); 0: no limit
    pods_per_trace: int = 0  # pods one trace traces (the first by namespace and name); 0: no limit

    @property
    def duration_when_omitted(self) -> float:
        return min(self.default_duration_seconds or self.max_duration_seconds, self.max_duration_seconds)


def same_endpoint(a: str, b: str) -> bool:
    """Endpoints compare as written, but for a trailing slash."""
    return a.rstrip("/") == b.rstrip("/")


def _int(lo: int, hi: int):
    """An integer in [lo, hi], as the schema's `type: integer` (no strings, floats or booleans)."""
    return Annotated[int, Field(strict=True, ge=lo, le=hi)]


def _str(max_length: int):
    return Annotated[str, Field(strict=True, max_length=max_length)]


class SpecError(ValueError):
    def __init__(self, message: str, reason: str = "InvalidSpec"):
        super().__init__(message)
        self.reason = reason  # the Accepted condition's: InvalidSpec, or NotAllowed (the administrator's policy)


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class Requirement(_Model):
    key: _str(317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[_str(63), ...] = Field(default=(), max_length=64)


class LabelSelector(_Model):
    match_labels: dict[str, _str(63)] = Field(default_factory=dict, max_length=64)
    match_expressions: tuple[Requirement, ...] = Field(default=(), max_length=32)


class Export(_Model):
    otlp_endpoint: _str(endpoints.MAX_LENGTH) | None = None
    resource_attributes: dict[_str(128), _str(256)] = Field(default_factory=dict, max_length=32)


class TraceSpec(_Model):
    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None
    pod_names: tuple[_str(253), ...] | None = Field(default=None, min_length=1, max_length=256)
    directions: tuple[Literal["receive", "transmit"], ...] = Field(default=("receive", "transmit"), max_length=2)
    segments: tuple[_str(32), ...] = Field(default=(), max_length=len(segments.NAMES))
    slow_threshold_microseconds: _int(1, 60_000_000) = 1000
    spans_per_second: _int(0, 1000) = 10
    sample_one_in: _int(0, 1_000_000) = 0
    time_one_in: _int(1, 1_000_000) = 1
    duration: _str(32) | None = None
    export: Export = Field(default_factory=Export)

    def settings(self) -> TraceSettings:
        """What every agent tracing one of the selected pods gets (contract.TraceSettings)."""
        return TraceSettings(directions=list(self.directions), segments=sorted(self.segments, key=_segment_order),
                             slow_threshold_microseconds=self.slow_threshold_microseconds,
                             spans_per_second=self.spans_per_second, sample_one_in=self.sample_one_in,
                             time_one_in=self.time_one_in,
                             export=ExportOverrides(otlp_endpoint=self.export.otlp_endpoint,
                                                    resource_attributes=dict(self.export.resource_attributes)))

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
        raise SpecError(f"duration {endpoints.shown(text)} is not a duration such as 30s, 15m or 1h30m")
    return total


_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY = re.compile(rf"(({_DNS_SUBDOMAIN})/)?{_NAME}")  # always fullmatch: $ would let a newline through
_LABEL_VALUE = re.compile(rf"({_NAME})?")
_POD_NAME = re.compile(_DNS_SUBDOMAIN)


def label_problems(where: str, sel: LabelSelector) -> list[str]:
    problems = []

    def key_ok(key: str) -> bool:
        prefix, _, name = key.rpartition("/")
        return bool(_LABEL_KEY.fullmatch(key)) and len(name) <= 63 and len(prefix) <= 253

    for key, value in sel.match_labels.items():
        if not key_ok(key):
            problems.append(f"{where}.matchLabels: {endpoints.shown(key)} is not a valid label key")
        if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            problems.append(f"{where}.matchLabels[{endpoints.shown(key)}]: {endpoints.shown(value)} "
                            "is not a valid label value")
    for i, req in enumerate(sel.match_expressions):
        at = f"{where}.matchExpressions[{i}]"
        if not key_ok(req.key):
            problems.append(f"{at}.key: {endpoints.shown(req.key)} is not a valid label key")
        if req.operator in ("In", "NotIn") and not req.values:
            problems.append(f"{at}: {req.operator} needs at least one value")
        if req.operator in ("Exists", "DoesNotExist") and req.values:
            problems.append(f"{at}: {req.operator} takes no values")
        problems += [f"{at}.values: {endpoints.shown(v)} is not a valid label value"
                     for v in req.values if len(v) > 63 or not _LABEL_VALUE.fullmatch(v)]
    return problems


def parse(raw: Mapping, limits: Limits = Limits(), kind: TraceKind = NAMESPACED) -> TraceSpec:
    """The typed spec of a trace of `kind` under the administrator's `limits`, with the cluster's default
    duration filled in when it has none; or SpecError naming every problem (field paths as in the
    manifest)."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"spec must be an object, not {type(raw).__name__}")
    try:
        spec = TraceSpec.model_validate(dict(raw))
    except ValidationError as e:
        raise SpecError("; ".join(
            f"spec.{'.'.join(endpoints.shown(str(p), 40).strip(chr(39)) for p in err['loc'])}: {err['msg']}"
            for err in e.errors(include_input=False)[:20])) from None
    problems = selection_problems(spec, kind)
    policy = limit_problems(spec, limits)
    if kind.namespaced and spec.namespace_selector is not None:
        policy.insert(0, problems.pop())
    for where, sel in (("spec.podSelector", spec.pod_selector), ("spec.namespaceSelector", spec.namespace_selector)):
        if sel is not None:
            problems += label_problems(where, sel)
    if not spec.directions:
        problems.append("spec.directions: trace at least one direction")
    for field, items in (("podNames", spec.pod_names or ()), ("directions", spec.directions),
                         ("segments", spec.segments)):
        if len(set(items)) != len(items):
            problems.append(f"spec.{field}: each entry at most once")
    problems += [f"spec.podNames: {endpoints.shown(n)} is not a pod name (lowercase DNS subdomain)"
                 for n in spec.pod_names or () if not _POD_NAME.fullmatch(n)]
    if spec.export.otlp_endpoint is not None:
        why = endpoints.problem(spec.export.otlp_endpoint)
        if why:
            problems.append(f"spec.export.otlpEndpoint: {why}")
    problems += [f"spec.export.resourceAttributes: {endpoints.shown(k)}: keys starting with k8s. are set by the agent"
                 for k in spec.export.resource_attributes if k.startswith("k8s.")]
    for name in spec.segments:
        seg = segments.BY_NAME.get(name)
        if seg is None:
            problems.append(f"spec.segments: unknown segment {endpoints.shown(name)}; known: {', '.join(segments.NAMES)}")
        elif seg.direction.otel not in spec.directions:
            problems.append(f"spec.segments: {name} is a {seg.direction.otel} segment, "
                            f"but {seg.direction.otel} is not in spec.directions")
    if spec.duration is not None:
        try:
            seconds = parse_duration(spec.duration)
            if seconds < MIN_DURATION_SECONDS:
                problems.append(f"spec.duration: {spec.duration} is shorter than {MIN_DURATION_SECONDS:g}s")
            elif seconds > limits.max_duration_seconds:
                problems.append(f"spec.duration: {spec.duration} is longer than this cluster allows "
                                f"({timedelta(seconds=limits.max_duration_seconds)})")
        except SpecError as e:
            problems.append(f"spec.{e}")
    if problems or policy:
        raise SpecError("; ".join(problems + policy), "InvalidSpec" if problems else "NotAllowed")
    if spec.duration is None:
        spec = spec.model_copy(update={"duration": format_duration(limits.duration_when_omitted)})
    return spec


def selection_problems(spec: TraceSpec, kind: TraceKind) -> list[str]:
    """How pods may be selected depends on the kind (the CRDs' scope rules, tests/operator/crdgen.py)."""
    problems = []
    if kind.namespaced:
        if (spec.pod_selector is not None) == (spec.pod_names is not None):
            problems.append("spec: select pods in exactly one way: podSelector or podNames")
        if spec.namespace_selector is not None:
            problems.append("spec.namespaceSelector: a LatencyTrace selects pods of its own namespace only: "
                            "namespaceSelector is for a ClusterLatencyTrace, which a cluster administrator creates")
        return problems
    if spec.namespace_selector is None:
        problems.append("spec: a ClusterLatencyTrace selects pods with namespaceSelector ({} is every namespace) "
                        "and optionally podSelector")
    if spec.pod_names is not None:
        problems.append("spec.podNames: podNames name pods of one namespace: use a LatencyTrace in that namespace")
    return problems


def limit_problems(spec: TraceSpec, limits: Limits) -> list[str]:
    """What this cluster's administrator does not allow a trace to ask for."""
    problems = []
    if spec.slow_threshold_microseconds < limits.min_slow_threshold_microseconds:
        problems.append(f"spec.slowThresholdMicroseconds: {spec.slow_threshold_microseconds} is below this "
                        f"cluster's minimum ({limits.min_slow_threshold_microseconds})")
    if spec.spans_per_second > limits.max_spans_per_second:
        problems.append(f"spec.spansPerSecond: {spec.spans_per_second} is above this cluster's maximum "
                        f"({limits.max_spans_per_second})")
    if 0 < spec.sample_one_in < limits.min_sample_one_in:
        problems.append(f"spec.sampleOneIn: 1 in {spec.sample_one_in} is more often than this cluster allows "
                        f"(0, or at least {limits.min_sample_one_in})")
    if spec.time_one_in < limits.min_time_one_in:
        problems.append(f"spec.timeOneIn: timing 1 packet in {spec.time_one_in} is more often than this cluster "
                        f"allows (at least 1 in {limits.min_time_one_in})")
    if limits.allowed_segments is not None:
        allowed = ", ".join(n for n in segments.NAMES if n in limits.allowed_segments)
        if not spec.segments:
            problems.append(f"spec.segments: this cluster's administrator allows traces only some segments: "
                            f"list the ones to trace (allowed: {allowed})")
        elif refused := [n for n in spec.segments if n in segments.BY_NAME and n not in limits.allowed_segments]:
            what = "is not a segment" if len(refused) == 1 else "are not segments"
            problems.append(f"spec.segments: {', '.join(refused)} {what} this cluster's administrator allows "
                            f"traces to ask for (allowed: {allowed})")
    url = spec.export.otlp_endpoint
    if url is not None and limits.allowed_endpoints is not None and endpoints.problem(url) is None \
            and not any(same_endpoint(url, a) for a in limits.allowed_endpoints):
        allowed = ", ".join(sorted(limits.allowed_endpoints)) or "none"
        problems.append(f"spec.export.otlpEndpoint: {endpoints.shown(url)} is not an endpoint this cluster's "
                        f"administrator allows traces to export to (allowed: {endpoints.shown(allowed, 400)})")
    return problems


def format_duration(seconds: float) -> str:
    """A duration string parse_duration reads back as `seconds` (whole seconds)."""
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def deadline(spec: TraceSpec, start: datetime | None) -> datetime | None:
    """When the trace completes by itself, or None (no duration, or not started)."""
    seconds = spec.duration_seconds()
    if seconds is None or start is None:
        return None
    return start + timedelta(seconds=seconds)
