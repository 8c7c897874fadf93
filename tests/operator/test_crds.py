"""The CRDs agree with the code: the segment enum with segments.NAMES, the LatencyTraceNode schema with
the contract models (field by field), and the chart ships the repository's CRDs, not a copy."""

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from latencytrace.node_agent import contract, segments

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"


def crd(name):
    return yaml.safe_load((CRDS / f"latencytrace.io_{name}.yaml").read_text())


def schema(name):
    return crd(name)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_segment_enums_equal_the_segment_table():
    trace = schema("latencytraces")["properties"]["spec"]["properties"]
    assert tuple(trace["segments"]["items"]["enum"]) == segments.NAMES
    node = schema("latencytracenodes")["properties"]["spec"]["properties"]["traces"]["items"]["properties"]
    assert tuple(node["segments"]["items"]["enum"]) == segments.NAMES


def _model_of(annotation):
    for arg in getattr(annotation, "__args__", ()) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        inner = _model_of(arg) if getattr(arg, "__args__", None) else None
        if inner:
            return inner
    return None


def mismatches(model: type[BaseModel], sch: dict, path: str) -> list[str]:
    """Fields of `model` and properties of `sch` that do not correspond, recursively."""
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    props = sch.get("properties", {})
    out = [f"{path}.{k}: in {model.__name__}, not in the CRD" for k in fields.keys() - props.keys()]
    out += [f"{path}.{k}: in the CRD, not in {model.__name__}" for k in props.keys() - fields.keys()]
    for key in fields.keys() & props.keys():
        sub = _model_of(fields[key].annotation)
        if sub is not None:
            prop = props[key]
            out += mismatches(sub, prop["items"] if prop.get("type") == "array" else prop, f"{path}.{key}")
    return out


@pytest.mark.parametrize("model, part", [(contract.NodeSpec, "spec"), (contract.NodeStatus, "status")])
def test_node_schema_matches_the_contract(model, part):
    assert mismatches(model, schema("latencytracenodes")["properties"][part], part) == []


def test_names_match_the_contract():
    kinds = [(k.plural, k.kind) for k in contract.TRACE_KINDS] + [(contract.NODE_PLURAL, contract.NODE_KIND)]
    for plural, kind in kinds:
        doc = crd(plural)
        assert doc["spec"]["group"] == contract.GROUP and doc["spec"]["names"]["kind"] == kind
        assert [v["name"] for v in doc["spec"]["versions"]] == [contract.VERSION]
        assert doc["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_chart_is_self_contained_and_the_repository_crds_link_to_it():
    chart_crds = ROOT / "charts" / "latencytrace" / "crds"
    assert not chart_crds.is_symlink()
    files = sorted(p.name for p in chart_crds.glob("*.yaml"))
    assert files == ["latencytrace.io_clusterlatencytraces.yaml", "latencytrace.io_latencytracenodes.yaml",
                     "latencytrace.io_latencytraces.yaml"]
    for name in files:
        assert not (chart_crds / name).is_symlink()
        assert (CRDS / name).resolve() == (chart_crds / name).resolve()


def test_otlp_endpoint_pattern_is_the_agent_and_operator_check():
    from latencytrace.node_agent import endpoints

    trace = schema("latencytraces")["properties"]["spec"]["properties"]["export"]["properties"]["otlpEndpoint"]
    node = schema("latencytracenodes")["properties"]["spec"]["properties"]["traces"]["items"]["properties"]
    for field in (trace, node["export"]["properties"]["otlpEndpoint"]):
        assert field["pattern"] == endpoints.PATTERN and field["maxLength"] == endpoints.MAX_LENGTH


def test_the_cluster_kind_is_generated_from_the_namespaced_one():
    """One spec schema for both kinds: the ClusterLatencyTrace CRD is crdgen's output from the LatencyTrace CRD,
    which differs only in scope, the selection rules and a few descriptions."""
    from . import crdgen

    assert yaml.safe_load(crdgen.TARGET.read_text()) == yaml.safe_load(crdgen.render()), \
        "run python -m tests.operator.crdgen"
    ns, cl = crd(contract.TRACE_PLURAL), crd(contract.CLUSTER_TRACE_PLURAL)
    assert (ns["spec"]["scope"], cl["spec"]["scope"]) == ("Namespaced", "Cluster")
    assert cl["spec"]["names"]["shortNames"] == ["clt"]

    def strip(doc):  # the schema without descriptions and the scope's own rules
        sch = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        out = yaml.safe_load(yaml.safe_dump(sch).replace("description:", "x-description:"))
        rules = out["properties"]["spec"]["x-kubernetes-validations"]
        out["properties"]["spec"]["x-kubernetes-validations"] = [r for r in rules if r not in
                                                                   sum(crdgen.SCOPE_RULES.values(), [])]
        return _without(out, "x-description")

    assert strip(ns) == strip(cl)
    assert ns["spec"]["versions"][0]["additionalPrinterColumns"] == cl["spec"]["versions"][0]["additionalPrinterColumns"]


def _without(doc, key):
    if isinstance(doc, dict):
        return {k: _without(v, key) for k, v in doc.items() if k != key}
    if isinstance(doc, list):
        return [_without(v, key) for v in doc]
    return doc
