"""The ClusterLatencyTrace CRD, generated from the LatencyTrace CRD: one spec schema for both kinds.

    python -m tests.operator.crdgen          # rewrite charts/latencytrace/crds/latencytrace.io_clusterlatencytraces.yaml

The two kinds differ only in scope (names, `scope: Cluster`), in the rules that say how pods are selected
(SCOPE_RULES: a LatencyTrace selects pods of its own namespace, by podSelector or podNames; a
ClusterLatencyTrace needs namespaceSelector and takes no podNames) and in a few descriptions
(CLUSTER_DESCRIPTIONS). Every field, bound, default and other rule is the LatencyTrace's, so a bound
added there reaches both (test_crds checks that the file is this function's output). The operator makes
the same distinction from the kind (operator/spec.py `parse(..., kind)`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from latencytrace.node_agent import contract

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "charts" / "latencytrace" / "crds"
SOURCE = CRDS / f"latencytrace.io_{contract.TRACE_PLURAL}.yaml"
TARGET = CRDS / f"latencytrace.io_{contract.CLUSTER_TRACE_PLURAL}.yaml"

NS_SELECTOR_RULE = "!has(self.namespaceSelector)"
SCOPE_RULES = {
    contract.TRACE_KIND: [
        {"rule": "has(self.podNames) != has(self.podSelector)",
         "message": "select pods in exactly one way: podSelector or podNames"},
        {"rule": NS_SELECTOR_RULE,
         "message": "a LatencyTrace selects pods of its own namespace only: namespaceSelector is for a "
                    "ClusterLatencyTrace, which a cluster administrator creates"},
    ],
    contract.CLUSTER_TRACE_KIND: [
        {"rule": "has(self.namespaceSelector)",
         "message": "a ClusterLatencyTrace selects pods with namespaceSelector ({} is every namespace) and "
                    "optionally podSelector"},
        {"rule": "!has(self.podNames)",
         "message": "podNames name pods of one namespace: use a LatencyTrace in that namespace"},
    ],
}
CLUSTER_DESCRIPTIONS = {
    (): "Traces the Linux network stack latency of the selected pods in the selected namespaces, per stack "
        "segment. Cluster-scoped: an administrator's act (tenants use the namespaced LatencyTrace).",
    ("spec",): "Which pods to trace and how: the pods matching podSelector (every pod without one) in the "
               "namespaces matching namespaceSelector.",
    ("spec", "namespaceSelector"): "Namespaces whose pods are selected (with podSelector, if given, applied in "
                                   "each); {} selects every namespace. Required.",
    ("spec", "podNames"): "Not allowed in a ClusterLatencyTrace (pod names belong to one namespace: use a "
                          "LatencyTrace there).",
}
HEADER = f"""# GENERATED from {SOURCE.name} by `python -m tests.operator.crdgen`; do not edit.
# ClusterLatencyTrace: a LatencyTrace across namespaces, cluster-scoped, for administrators only (the chart's
# aggregated roles give namespace users the namespaced kind and nothing of this one).
"""


def _schema_at(schema: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        schema = schema["properties"][key]
    return schema


def generate(source: dict) -> dict:
    """The ClusterLatencyTrace CRD from the LatencyTrace CRD (parsed)."""
    crd = copy.deepcopy(source)
    kind = contract.CLUSTER
    crd["metadata"]["name"] = f"{kind.plural}.{contract.GROUP}"
    crd["spec"]["names"] = {"kind": kind.kind, "listKind": f"{kind.kind}List", "plural": kind.plural,
                            "singular": kind.kind.lower(), "shortNames": ["clt"],
                            "categories": source["spec"]["names"]["categories"]}
    crd["spec"]["scope"] = "Cluster"
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        spec = schema["properties"]["spec"]
        rules = spec["x-kubernetes-validations"]
        namespaced = SCOPE_RULES[contract.TRACE_KIND]
        missing = [r for r in namespaced if r not in rules]
        if missing:
            raise ValueError(f"{SOURCE.name} lacks the namespaced rules {missing}: update SCOPE_RULES with it")
        spec["x-kubernetes-validations"] = SCOPE_RULES[kind.kind] + [r for r in rules if r not in namespaced]
        for path, text in CLUSTER_DESCRIPTIONS.items():
            _schema_at(schema, path)["description"] = text
    return crd


def render() -> str:
    return HEADER + yaml.safe_dump(generate(yaml.safe_load(SOURCE.read_text())), sort_keys=False, width=110)


def main() -> int:
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
