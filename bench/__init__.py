"""stdit.bench: benchmark harnesses, cost model and reports (issue: benchmarks)."""
