module metaemu.dev/benchmarks/go_baseline

go 1.26
