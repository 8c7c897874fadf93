module latencytrace.test/workload

go 1.22
