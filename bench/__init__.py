"""stdit.bench: benchmark suites, timing, results and reports (`stdit bench`, `stdit report`, `pytest bench/`)."""
