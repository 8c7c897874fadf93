"""Local Kubernetes control plane (etcd + kube-* + kwok) and Jaeger for tests.

Binaries are built from pinned Go module versions by build.sh into a cache
outside the repository; see versions.env.
"""
