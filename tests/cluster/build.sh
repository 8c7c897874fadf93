#!/usr/bin/env bash
# Builds the pinned control-plane tools from Go modules into a cache outside the
# repository, one directory per tool and version, so a machine builds each version
# once:  ${LATENCYTRACE_CACHE:-/var/cache/latencytrace}/bin/<tool>-<version>/<tool>
#
# Usage: build.sh [all|kubernetes|kwok|helm|jaeger|etcd|cni|crictl|prometheus|otelcol]...   (default: all)
# Idempotent: a tool whose binary exists is skipped. Safe to run concurrently
# (one flock serialises builds). Versions come from versions.env beside this file.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$HERE/versions.env"

CACHE=${LATENCYTRACE_CACHE:-/var/cache/latencytrace}
BIN=$CACHE/bin
LOGS=$CACHE/logs
mkdir -p "$BIN" "$LOGS"

# A private Go environment under the cache: module downloads and compiled packages
# are reused by later builds (and by other versions), and never touch the repo or ~/go.
export GOPATH=$CACHE/gopath GOMODCACHE=$CACHE/gomod GOCACHE=$CACHE/gocache
# -mod=mod lets the throwaway wrapper module fill in go.sum as it resolves.
export GOFLAGS=-mod=mod
# Static binaries, as the upstream release builds are; no C toolchain needed.
export CGO_ENABLED=0
# Honour a caller's GOTOOLCHAIN (e.g. go1.27.3 for a version that needs it); else local.
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

say() { echo "[build] $*" >&2; }

bin_path() { echo "$BIN/$1-$2/$1"; }

have() { [[ -x $(bin_path "$1" "$2") ]]; }

# Streams `go build -v` output (one package name per compiled package) into a
# progress line every 15 s, also while one big package or the linker runs silent;
# everything goes to a log file, shown on failure.
progress() {
  local label=$1 total=$2 log=$3 n=0 last=$SECONDS line partial="" rc
  while :; do
    if IFS= read -r -t 5 line; then
      line=$partial$line partial=""
      printf '%s\n' "$line" >>"$log"
      case $line in
        "go: downloading "*) ;;
        *" "*|*:*) ;;          # not a package path (errors, notes): only logged
        *) n=$((n + 1)) ;;
      esac
    else
      rc=$?
      (( rc > 128 )) || break  # EOF: go build is done
      partial+=$line           # timed out mid-line: keep what arrived
    fi
    if (( SECONDS - last >= 15 )); then
      last=$SECONDS
      say "  $label: compiled $n of ~$total packages, $((SECONDS / 60))m$((SECONDS % 60))s elapsed"
    fi
  done
  [[ -z $partial ]] || printf '%s\n' "$partial" >>"$log"
}

# Builds main packages of MODULE@VERSION through a throwaway wrapper module in a temp
# dir. The wrapper is needed because `go install pkg@version` refuses a module whose
# go.mod has replace directives (k8s.io/kubernetes points ./staging/..., jaeger pins
# sarama). The wrapper requires the module and copies its go/godebug/replace/exclude
# directives from the module's own go.mod, so no list is kept by hand here.
#   wrapper_build LABEL MODULE VERSION LOCAL_REPLACE_VERSION LDFLAGS OUTDIR PKG...
# LOCAL_REPLACE_VERSION: version used for directory replaces (k8s staging repos are
# published as k8s.io/<name> v0.MINOR.PATCH); empty if the module has none.
wrapper_build() (  # subshell: the temp dir's cleanup trap stays local
  local label=$1 module=$2 version=$3 local_version=$4 ldflags=$5 outdir=$6
  shift 6
  local work gomod args total rc log=$LOGS/$label-$version.log
  work=$(mktemp -d "${TMPDIR:-/tmp}/latencytrace-build.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  : >"$log"

  say "  $label: fetching go.mod of $module@$version"
  gomod=$(cd "$work" && go mod download -json "$module@$version" | jq -r .GoMod)

  # Translate the module's go.mod into `go mod edit` flags for the wrapper.
  local edits
  edits=$(go mod edit -json "$gomod" | jq -r --arg lv "$local_version" '
    (if .Go then "-go=" + .Go else empty end),
    (.GoDebug // [] | .[] | "-godebug=" + .Key + "=" + .Value),
    (.Exclude // [] | .[] | "-exclude=" + .Path + "@" + .Version),
    ([.Require // [] | .[].Path] as $required |
     .Replace // [] | .[] |
      .Old.Path as $path |
      ($path + (if .Old.Version then "@" + .Old.Version else "" end)) as $old |
      if (.New.Path | startswith(".") or startswith("/")) then
        # A directory replace of a module the go.mod does not require is a guard
        # or an unused sibling (etcd FORBIDDEN_DEPENDENCY, k8s sample-*): dropped.
        if ($required | index($path)) == null then empty
        elif $lv == "" then error("directory replace of \(.Old.Path) but no published version given")
        else "-replace=" + $old + "=" + $path + "@" + $lv end
      else "-replace=" + $old + "=" + .New.Path + "@" + .New.Version end)')
  args=()
  [[ -z $edits ]] || mapfile -t args <<<"$edits"
  say "  $label: wrapper module gets: ${args[*]:0:3}${args[3]:+ ... (${#args[@]} directives)}"

  cd "$work"
  go mod init latencytrace.local/build-wrapper >/dev/null 2>&1
  go mod edit -require="$module@$version" "${args[@]}"
  say "  $label: resolving dependencies (downloads modules on a new machine)"
  if ! total=$(set -o pipefail; go list -deps "$@" 2>>"$log" | wc -l); then
    say "  $label: resolving failed (full log: $log); last lines:"
    tail -n 30 "$log" >&2
    exit 1
  fi
  say "  $label: compiling up to $total packages with $(nproc) cores"
  mkdir -p "$outdir"
  set +e
  go build -v -trimpath -ldflags "-s -w $ldflags" -o "$outdir/" "$@" 2>&1 |
    progress "$label" "$total" "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if (( rc != 0 )); then
    say "  $label: go build failed (full log: $log); last lines:"
    tail -n 40 "$log" >&2
    exit "$rc"
  fi
)

# Moves freshly built binaries into their versioned dirs; the rename makes a binary
# appear whole or not at all, so an interrupted build is simply redone.
install_bins() {
  local from=$1 version=$2
  shift 2
  local tool
  for tool in "$@"; do
    mkdir -p "$BIN/$tool-$version"
    mv -f "$from/$tool" "$BIN/$tool-$version/$tool.tmp"
    mv -f "$BIN/$tool-$version/$tool.tmp" "$BIN/$tool-$version/$tool"
  done
}

# kubelet and kube-proxy run the real node (tests/cluster/node.py); one version for all.
K8S_TOOLS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

build_kubernetes() {
  local v=$KUBERNETES_VERSION missing=() t
  for t in "${K8S_TOOLS[@]}"; do have "$t" "$v" || missing+=("$t"); done
  (( ${#missing[@]} )) || return 0
  say "${missing[*]} $v (first build takes ~4-5 min on 2 cores) ..."
  local start=$SECONDS out minor patch staging pkgs=() commit_time vpkg
  out=$(mktemp -d "${TMPDIR:-/tmp}/latencytrace-out.XXXXXX")
  # v1.MINOR.PATCH -> staging modules (k8s.io/api, client-go, ...) v0.MINOR.PATCH
  IFS=. read -r _ minor patch <<<"$v"
  staging=v0.$minor.$patch
  for t in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$t"); done
  commit_time=$(go mod download -json "k8s.io/kubernetes@$v" | jq -r .Time)
  # Stamp the version the way upstream's hack/lib/version.sh does; unstamped binaries
  # report v0.0.0-master, which breaks helm kubeVersion checks and kubectl skew checks.
  local ldflags=""
  for vpkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $vpkg.gitVersion=$v -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
    ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=$commit_time"
  done
  # One go build for all four: they share most packages, so each compiles once.
  wrapper_build kubernetes k8s.io/kubernetes "$v" "$staging" "$ldflags" "$out" "${pkgs[@]}"
  install_bins "$out" "$v" "${missing[@]}"
  rm -rf "$out"
  say "  kubernetes $v built in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
}

# Generic single-binary build:
#   build_one TOOL MODULE VERSION PKG LDFLAGS MINUTES [LOCAL_REPLACE_VERSION]
build_one() {
  local tool=$1 module=$2 v=$3 pkg=$4 ldflags=$5 minutes=$6 local_version=${7:-}
  have "$tool" "$v" && return 0
  say "$tool $v (first build takes ~$minutes min) ..."
  local start=$SECONDS out built
  out=$(mktemp -d "${TMPDIR:-/tmp}/latencytrace-out.XXXXXX")
  wrapper_build "$tool" "$module" "$v" "$local_version" "$ldflags" "$out" "$pkg"
  # go names the binary after the package path (etcd's is ".../server/v3" ->
  # "server"); there is exactly one file, whatever its name.
  built=$(find "$out" -maxdepth 1 -type f | head -n 1)
  [[ $built == "$out/$tool" ]] || mv "$built" "$out/$tool"
  install_bins "$out" "$v" "$tool"
  rm -rf "$out"
  say "  $tool $v built in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
}

build_kwok() {
  build_one kwok sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok "" 1
}

build_helm() {
  # Stamp the version and the Kubernetes version `helm template` assumes by default,
  # as helm's Makefile does (otherwise it reports v3.22 and assumes Kubernetes 1.20).
  local minor
  minor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION")
  build_one helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean
     -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor
     -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" 1
}

build_jaeger() {
  build_one jaeger github.com/jaegertracing/jaeger "$JAEGER_VERSION" \
    github.com/jaegertracing/jaeger/cmd/jaeger "" 3
}

# etcd from its Go module rather than Debian's etcd-server: bookworm ships 3.4.23,
# older than the 3.4.29+/3.5.11+ that Kubernetes >= 1.31 needs, and without the
# watch progress notifications behind the apiserver's streaming watch-list; with it
# kwok's informers fail, re-list and see new pods only seconds to a minute late.
# go.etcd.io/etcd/server/v3 is the etcd main package; its sibling modules
# (api, client, pkg) are published at the same version.
build_etcd() {
  build_one etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 "" 2 \
    "$ETCD_VERSION"
}

# CNI plugins for the real node's pod network: bridge (pods on a host bridge), host-local
# (their addresses), loopback (lo in each pod) and portmap (hostPort). One go build for all four.
CNI_PLUGINS=(bridge host-local loopback portmap)
build_cni() {
  local v=$CNI_PLUGINS_VERSION missing=() t pkgs=()
  for t in "${CNI_PLUGINS[@]}"; do have "$t" "$v" || missing+=("$t"); done
  (( ${#missing[@]} )) || return 0
  say "CNI plugins ${missing[*]} $v (first build takes ~1 min) ..."
  local start=$SECONDS out
  out=$(mktemp -d "${TMPDIR:-/tmp}/latencytrace-out.XXXXXX")
  for t in "${missing[@]}"; do
    case $t in
      bridge|loopback) pkgs+=("github.com/containernetworking/plugins/plugins/main/$t") ;;
      host-local) pkgs+=("github.com/containernetworking/plugins/plugins/ipam/$t") ;;
      portmap) pkgs+=("github.com/containernetworking/plugins/plugins/meta/$t") ;;
    esac
  done
  wrapper_build cni github.com/containernetworking/plugins "$v" "" "" "$out" "${pkgs[@]}"
  install_bins "$out" "$v" "${missing[@]}"
  rm -rf "$out"
  say "  CNI plugins $v built in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
}

# crictl, the CRI client: the real node's teardown stops and removes every pod sandbox through the
# runtime (which runs CNI DEL for each: veths, IP reservations, portmap rules), even with no API server.
build_crictl() {
  build_one crictl sigs.k8s.io/cri-tools "$CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl "" 1
}

# Prometheus 3 (the module is versioned v0.3MINOR.PATCH for 3.MINOR.PATCH). Tags:
# remove_all_sd leaves out every service-discovery plugin (cloud SDKs, Kubernetes client):
# the tests push OTLP into it and scrape nothing, and those plugins are most of its
# packages. Without the builtinassets tag the binary carries no UI assets (the HTTP API
# is all the tests and the demo use), so no npm build either.
build_prometheus() {
  local v=$PROMETHEUS_VERSION
  have prometheus "$v" && return 0
  say "prometheus $v (first build takes ~4 min on 2 cores) ..."
  local start=$SECONDS out ver
  ver=${v#v0.}; ver=3.${ver#3}   # v0.316.0 -> 3.16.0
  out=$(mktemp -d "${TMPDIR:-/tmp}/latencytrace-out.XXXXXX")
  GOFLAGS="$GOFLAGS -tags=remove_all_sd" wrapper_build prometheus github.com/prometheus/prometheus "$v" "" \
    "-X github.com/prometheus/common/version.Version=$ver -X github.com/prometheus/common/version.Branch=HEAD" \
    "$out" github.com/prometheus/prometheus/cmd/prometheus
  install_bins "$out" "$v" prometheus
  rm -rf "$out"
  say "  prometheus $v built in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
}

# An OpenTelemetry Collector with only what the canonical deployment (agents ->
# collector -> Jaeger and Prometheus) needs, made by the collector builder (ocb):
# the builder itself is built from its module, generates a main package from the
# manifest below (its sources and go.mod); then go build compiles it as the other tools are.
# All core components are at one release (OTELCOL_VERSION; the stable modules'
# v1.x versions are resolved by the builder). No contrib module is needed: Prometheus
# takes OTLP over HTTP itself, so the core otlphttp exporter keeps exponential
# histograms (stored as native histograms) and exemplars as they are.
OTELCOL_COMPONENTS=(
  receivers:go.opentelemetry.io/collector/receiver/otlpreceiver
  processors:go.opentelemetry.io/collector/processor/batchprocessor
  processors:go.opentelemetry.io/collector/processor/memorylimiterprocessor
  exporters:go.opentelemetry.io/collector/exporter/otlpexporter
  exporters:go.opentelemetry.io/collector/exporter/otlphttpexporter
)
build_otelcol() {
  local v=$OTELCOL_VERSION
  have otelcol "$v" && return 0
  say "otelcol $v (collector builder, then the collector; first build takes ~4 min) ..."
  local start=$SECONDS out work manifest entry kind
  out=$(mktemp -d "${TMPDIR:-/tmp}/latencytrace-out.XXXXXX")
  have ocb "$v" || {
    wrapper_build ocb go.opentelemetry.io/collector/cmd/builder "$v" "" "" "$out" \
      go.opentelemetry.io/collector/cmd/builder
    mv "$out/builder" "$out/ocb"
    install_bins "$out" "$v" ocb
  }
  work=$(mktemp -d "${TMPDIR:-/tmp}/latencytrace-ocb.XXXXXX")
  manifest=$work/manifest.yaml
  {
    echo "dist:"
    echo "  name: otelcol"
    echo "  description: OpenTelemetry Collector for latencytrace tests (OTLP in; batch, memory_limiter; OTLP out)"
    echo "  output_path: $out/src"
    echo "  version: ${v#v}"
    for kind in receivers processors exporters; do
      echo "$kind:"
      for entry in "${OTELCOL_COMPONENTS[@]}"; do
        [[ ${entry%%:*} == "$kind" ]] && echo "  - gomod: ${entry#*:} $v"
      done
    done
  } >"$manifest"
  local log=$LOGS/otelcol-$v.log total rc
  : >"$log"
  # The builder writes the main package and resolves its modules; compiling is left to the same
  # `go build` as every other tool here (-trimpath, -s -w, progress lines).
  say "  otelcol: generating the collector's sources (log: $log)"
  if ! (cd "$work" && "$(bin_path ocb "$v")" --config="$manifest" --skip-compilation >>"$log" 2>&1); then
    say "  otelcol: builder failed (full log: $log); last lines:"
    tail -n 40 "$log" >&2
    rm -rf "$work" "$out"
    exit 1
  fi
  total=$(cd "$out/src" && go list -deps . 2>>"$log" | wc -l)
  say "  otelcol: compiling up to $total packages with $(nproc) cores"
  set +e
  (cd "$out/src" && go build -v -trimpath -ldflags "-s -w" -o otelcol . 2>&1) | progress otelcol "$total" "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if (( rc != 0 )); then
    say "  otelcol: go build failed (full log: $log); last lines:"
    tail -n 40 "$log" >&2
    rm -rf "$work" "$out"
    exit "$rc"
  fi
  mv "$out/src/otelcol" "$out/otelcol"
  install_bins "$out" "$v" otelcol
  rm -rf "$work" "$out"
  say "  otelcol $v built in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
}

ensure_go() {
  command -v go >/dev/null || { say "go is not on PATH"; exit 1; }
  command -v jq >/dev/null && return 0
  say "jq missing: installing Debian package jq"
  DEBIAN_FRONTEND=noninteractive apt-get install -y jq >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y jq >&2; }
}

main() {
  local targets=("$@")
  (( ${#targets[@]} )) || targets=(all)
  [[ ${targets[0]} == all ]] && targets=(etcd kubernetes kwok helm jaeger cni crictl prometheus otelcol)
  # One build at a time per cache (parallel test workers may all call this).
  exec 9>"$CACHE/.build.lock"
  flock 9
  local t start=$SECONDS
  for t in "${targets[@]}"; do
    case $t in
      etcd|kubernetes|kwok|helm|jaeger|cni|crictl|prometheus|otelcol) ensure_go; "build_$t" ;;
      *) say "unknown target '$t' (want all|kubernetes|kwok|helm|jaeger|etcd|cni|crictl|prometheus|otelcol)"; exit 2 ;;
    esac
  done
  (( SECONDS - start > 5 )) && say "done in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
  return 0
}

main "$@"; exit $?  # one line: bash reads a script as it runs; edits cannot hit a live run
