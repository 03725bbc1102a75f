"""What the tests share: collectors and CLI runs, raw protocol clients, scrapes, small trainings,
a throwaway PKI, float64 references, seeded golden-test inputs and hostile-input strategies.

Importable as `helpers` because pyproject's pytest settings put tests/ on the path; the
benchmarks in tests/bench/ put it there themselves.
"""
